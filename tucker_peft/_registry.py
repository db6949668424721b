"""Registration of tucker-peft as a PEFT method: a ``PeftType`` member added at import time, then PEFT's registry."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

METHOD_NAME = "tucker"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``PeftType.<name>`` (value ``name``) to PEFT's enum once; return the member (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


TUCKER_PEFT_TYPE = _add_peft_type_member(METHOD_NAME.upper())


def register(config_cls, model_cls) -> None:
    """Register the method with PEFT unless it already is (importing the package twice is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(TUCKER_PEFT_TYPE) is model_cls:
        return
    if TUCKER_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        raise RuntimeError(
            f"Another PEFT method is already registered as {TUCKER_PEFT_TYPE.value!r}; "
            "two different versions of tucker_peft seem to be imported."
        )
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls)
