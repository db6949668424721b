"""Let PEFT load a Tucker adapter without ``import tucker_peft`` (``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained``, ``AutoPeftModel...``, transformers' and diffusers' adapter loading).

Run at interpreter start by ``tucker_peft-autoload.pth``, which the package installs into site-packages.  It only puts
a finder on ``sys.meta_path``; nothing is imported until the program imports ``peft``.  Once ``peft`` has loaded, its
two places that turn an ``adapter_config.json``'s ``peft_type`` into a config class
(``PeftConfigMixin._get_peft_type`` and ``PeftConfigMixin.from_peft_type``) import ``tucker_peft`` first when the
type is ``"TUCKER"`` and not yet registered: the import registers the method.  Nothing is imported while ``peft`` or
``transformers`` are still initialising (which would be a circular import), and programs that never load a Tucker
adapter never import tucker_peft.  With ``TUCKER_PEFT_AUTOLOAD=0`` nothing is imported
automatically: loading a Tucker adapter then raises an error that says to ``import tucker_peft`` first (instead of
PEFT's bare ``KeyError: 'TUCKER'``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

PEFT_TYPE = "TUCKER"


def _register_if_needed(peft_type) -> None:
    if str(getattr(peft_type, "value", peft_type)) != PEFT_TYPE:
        return
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    if not _enabled():
        raise ValueError(
            "This adapter was trained with tucker-peft (peft_type 'TUCKER'): `import tucker_peft` before loading it "
            "(automatic registration is off: TUCKER_PEFT_AUTOLOAD=0)."
        )
    import tucker_peft  # noqa: F401  (registers the method)


def _enabled() -> bool:
    return os.environ.get("TUCKER_PEFT_AUTOLOAD", "1").strip().lower() not in ("0", "false", "no", "off")


def _patch(config_mixin) -> None:
    """Wrap the two class methods of ``peft.config.PeftConfigMixin`` that map a ``peft_type`` to a config class."""
    if getattr(config_mixin, "_tucker_peft_autoload", False):
        return
    get_peft_type = config_mixin._get_peft_type.__func__
    from_peft_type = config_mixin.from_peft_type.__func__

    def _get_peft_type(cls, *args, **kwargs):
        peft_type = get_peft_type(cls, *args, **kwargs)
        _register_if_needed(peft_type)
        return peft_type

    def _from_peft_type(cls, **kwargs):
        _register_if_needed(kwargs.get("peft_type"))
        return from_peft_type(cls, **kwargs)

    for wrapper, original in ((_get_peft_type, get_peft_type), (_from_peft_type, from_peft_type)):
        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = (
            original.__name__,
            original.__qualname__,
            original.__doc__,
        )
        setattr(config_mixin, original.__name__, classmethod(wrapper))
    config_mixin._tucker_peft_autoload = True


class _PatchPeftOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``peft`` so that :func:`_patch` runs right after it executes."""

    def __init__(self) -> None:
        self._looking = False

    def find_spec(self, name, path=None, target=None):
        # availability checks (`importlib.util.find_spec("peft")`) come here too: stay on sys.meta_path until peft is
        # actually executed, and wrap the loader of every spec handed out
        if name != "peft" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_module(module)
            try:
                _patch(sys.modules["peft.config"].PeftConfigMixin)
            except Exception as error:  # never break `import peft`
                import warnings

                warnings.warn(
                    f"tucker-peft could not hook into PEFT ({type(error).__name__}: {error}); "
                    "`import tucker_peft` before loading a Tucker adapter.",
                    RuntimeWarning,
                    stacklevel=2,
                )

        spec.loader.exec_module = exec_then_patch
        return spec


def install() -> None:
    """Called by the ``.pth`` file at interpreter start."""
    if "peft.config" in sys.modules:
        _patch(sys.modules["peft.config"].PeftConfigMixin)
    elif not any(isinstance(finder, _PatchPeftOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchPeftOnImport())
