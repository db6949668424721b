"""``TuckerLoraModel``: the PEFT tuner that injects Tucker adapters and saves/loads their per-module ranks."""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn

from .config import TuckerLoraConfig
from .layer import TuckerLayer, dispatch, unsupported_message, unsupported_reason
from .tensor_ops import weighted_tucker_sum

#: Default targets per transformers ``model_type``: attention and feed-forward projections where we know the names,
#: LoRA's defaults otherwise.
TRANSFORMERS_MODELS_TO_TUCKER_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "xlm-roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta": ["in_proj", "output.dense", "intermediate.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

_PEFT_MODEL_PREFIX = "base_model.model."


def iter_tucker_layers(model: nn.Module, adapter_name: str | None = None):
    """Yield ``(name, layer)`` for every Tucker layer (holding ``adapter_name``, if given) of ``model``.

    Names are relative to the adapted model: a ``PeftModel``'s ``base_model.model.`` prefix is removed, so the names
    are the ones used in ``rank_pattern`` / ``module_ranks``.
    """
    for name, module in model.named_modules():
        if isinstance(module, TuckerLayer) and (adapter_name is None or adapter_name in module.tucker_core):
            yield name.removeprefix(_PEFT_MODEL_PREFIX), module


def _pass_adapter_names(names: list[str], module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: hand one call's ``adapter_names`` to a layer's forward."""
    return args, kwargs | {"adapter_names": names}


class TuckerLoraModel(BaseTuner):
    """Injects Tucker adapters (``TuckerLoraConfig``) into a model; created by ``get_peft_model`` or
    ``inject_adapter_in_model`` (diffusers' ``add_adapter``), never directly."""

    prefix: str = "tucker_"
    tuner_layer_cls = TuckerLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_TUCKER_TARGET_MODULES_MAPPING

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """A new adapter ``adapter_name`` whose delta is ``sum_k weights[k] * delta_k`` of the Tucker ``adapters``, as
        PEFT's LoRA method of the same name builds one (the new adapter is not made active: ``set_adapter``).

        ``combination_type="cat"``: that sum exactly (per mode the bases are concatenated and re-orthonormalized,
        the weighted cores form a block core; directions at round-off are dropped).  ``"svd"`` (LoRA's default): the
        sum truncated to ``svd_rank`` per mode (default: the largest ``r`` of the adapters) by a HOSVD of its core,
        for linear layers the best approximation of that rank.  The adapters must adapt the same modules in the same
        ``conv_mode`` and have no ``modules_to_save``.
        """
        if combination_type not in ("cat", "svd"):
            raise NotImplementedError(
                f"combination_type={combination_type!r}: Tucker adapters combine by 'cat' (the exact weighted sum) or "
                "'svd' (the sum truncated to svd_rank per mode); LoRA's other combinations are not implemented."
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; choose another adapter_name.")
        unknown = [a for a in adapters if not isinstance(self.peft_config.get(a), TuckerLoraConfig)]
        finite = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)
        if not adapters or unknown or len(weights) != len(adapters) or not finite:
            raise ValueError(
                f"add_weighted_adapter needs existing Tucker adapters and one weight each; got adapters={adapters} "
                f"(not Tucker adapters of this model: {unknown}) and weights={weights} (finite numbers)."
            )
        configs = [self.peft_config[a] for a in adapters]
        if any(c.modules_to_save for c in configs) or len({c.conv_mode for c in configs}) > 1:
            raise ValueError(
                "add_weighted_adapter combines adapters without modules_to_save and of one conv_mode (as LoRA's); "
                f"got modules_to_save {[c.modules_to_save for c in configs]}, conv_mode {[c.conv_mode for c in configs]}."
            )
        layers = {a: dict(iter_tucker_layers(self.model, a)) for a in adapters}
        if any(layers[a].keys() != layers[adapters[0]].keys() for a in adapters):
            raise ValueError("add_weighted_adapter needs adapters on the same modules; these adapt different ones.")
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"`svd_rank` must be an integer >= 1 or None; got {svd_rank!r}.")
        limit = None if combination_type == "cat" else svd_rank or max(c.r for c in configs)
        sums = {}
        for name, layer in layers[adapters[0]].items():
            sums[name] = weighted_tucker_sum(
                [layer.core(a) for a in adapters],
                [layer.factors(a) for a in adapters],
                [w * layer.scaling[a] for w, a in zip(weights, adapters)],
                limit,
            )
        ranks = {name: [u.shape[1] for u in factors] for name, (_, factors) in sums.items()}
        top = max(r for rs in ranks.values() for r in rs)
        self.peft_config[adapter_name] = dataclasses.replace(
            configs[0], module_ranks=ranks, max_rank=max(configs[0].max_rank, top), init_weights=True
        )
        self.inject_adapter(self.model, adapter_name)
        for name, layer in iter_tucker_layers(self.model, adapter_name):
            core, factors = sums[name]
            like = layer.core(adapter_name)
            layer.set_factors(
                adapter_name,
                (core / layer.scaling[adapter_name]).to(like.dtype),
                [u.to(like.dtype) for u in factors],
            )

    # ------------------------------------------------------------------------------------------------------------
    # Mixed-adapter batches at inference: model(**batch, adapter_names=[...]), one adapter name per row, as in LoRA
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names`` (one per row; ``"__base__"``: no adapter) to every Tucker layer and to the
        ``modules_to_save`` copies for one forward or ``generate`` call, with LoRA's checks and its handling of beam
        search (each name repeated ``num_beams`` times, the encoder of an encoder-decoder model given the original
        list).  PEFT calls this around every forward; without ``adapter_names`` it does nothing."""
        adapter_names = kwargs.get("adapter_names")
        if kwargs.get("alora_offsets") is not None:
            raise ValueError("`alora_offsets` is an activated-LoRA option; Tucker adapters have no such variant.")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"`adapter_names` must be a list of str, one per input row; got {type(adapter_names)}.")
        known = {name for _, layer in iter_tucker_layers(self.model) for name in layer.tucker_core}
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; the model has "
                f"{sorted(known)} (and '__base__' for no adapter)."
            )
        names, handles = list(adapter_names), []

        def route(root: nn.Module, names: list[str]) -> None:
            for module in root.modules():
                if isinstance(module, (TuckerLayer, AuxiliaryTrainingWrapper)):
                    hook = partial(_pass_adapter_names, names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats every input num_beams times
            names = [name for name in adapter_names for _ in range(num_beams)]
        route(self.model, names)
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if names != list(adapter_names) and encoder is not None and encoder is not self.model:
            # the encoder runs once per input, not per beam: its hooks, registered later, override the names
            route(encoder, list(adapter_names))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------------------------
    # Checks before any module is replaced
    def _prepare_model(self, peft_config: TuckerLoraConfig, model: nn.Module) -> None:
        """Refuse, before anything is injected, a target list entry that matches nothing and an unsupported target."""
        names = [name for name, _ in model.named_modules() if name]
        inside_adapters = tuple(name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))
        targets = peft_config.target_modules
        if isinstance(targets, (set, list, tuple)):
            unknown = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
            if unknown:
                leaf_names = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and unsupported_reason(m) is None}
                )
                raise ValueError(
                    f"target_modules {unknown} match no module of {type(model).__name__}. Module names that can be "
                    f"targeted end in: {leaf_names[:40]}. Fix `target_modules` (exact names or name suffixes)."
                )
        if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            return
        bad = []
        for name, module in model.named_modules():
            if not name or name.startswith(inside_adapters) or isinstance(module, BaseTunerLayer):
                continue
            if self._check_target_module_exists(peft_config, name) and (reason := unsupported_reason(module)):
                bad.append(f"{name}: {reason}")
        if bad:
            raise ValueError(unsupported_message(bad))

    # ------------------------------------------------------------------------------------------------------------
    # Injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Inject with a config of the model's own: saving records the ranks in ``module_ranks``, and that must not
        reach the object the user passed (reused for the next model of a seed loop, it would start that model at
        the previous run's final ranks)."""
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(
        self,
        config: TuckerLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        kwargs = {
            "r": config.rank_pattern.get(r_key, config.r),
            "alpha": config.alpha_pattern.get(alpha_key, config.alpha),
            "dropout": config.dropout,
            "conv_mode": config.conv_mode,
            "ranks": config.module_ranks.get(current_key),
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }
        if isinstance(target, TuckerLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = dispatch(target, adapter_name, **kwargs)
            if new_module is None:
                base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
                raise ValueError(unsupported_message([f"{current_key}: {unsupported_reason(base)}"]))
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: TuckerLoraConfig, adapter_name: str) -> None:
        """A loaded rank record must name exactly the adapted modules: otherwise config and model disagree."""
        if not config.module_ranks:
            return
        adapted = {name for name, _ in iter_tucker_layers(model, adapter_name)}
        stray = sorted(set(config.module_ranks) - adapted)
        if stray:
            raise ValueError(
                f"adapter_config.json records ranks for modules that were not adapted: {stray[:5]}. The adapter was "
                "saved from a different model or its target_modules were edited; load it on the model it was "
                "trained on."
            )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Factors are made in float32; ``autocast_adapter_dtype=False`` gives them the base layer's dtype, as LoRA.

        PEFT calls this after creating or loading an adapter (``get_peft_model``, ``add_adapter``, ``load_adapter``,
        ``PeftModel.from_pretrained``), passing the user's ``autocast_adapter_dtype``.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for _, layer in iter_tucker_layers(self.model, adapter_name):
            dtype = layer.get_base_layer().weight.dtype
            if not dtype.is_floating_point:  # quantized base weights: keep float32, as LoRA does
                continue
            for name in layer.adapter_layer_names:
                store = getattr(layer, name)
                if adapter_name in store and store[adapter_name].dtype != dtype:
                    param = store[adapter_name]
                    store[adapter_name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)

    # ------------------------------------------------------------------------------------------------------------
    # Saving and loading
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: TuckerLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Select this adapter's tensors (active ranks) and write the current ranks into ``config.module_ranks``.

        ``config`` is the model's own copy (:meth:`inject_adapter`), which PEFT then writes to
        ``adapter_config.json``.  It is marked as a record of this model's saves: loading an earlier save of the same
        training run (``load_best_model_at_end``, resuming) may then bring other ranks."""
        config.module_ranks = {
            name: list(layer.ranks(adapter_name)) for name, layer in iter_tucker_layers(model, adapter_name)
        }
        config._module_ranks_from_save = True
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: TuckerLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and check every Tucker tensor before anything is loaded.

        - A missing tensor is an error (never silently skipped).
        - Shapes that differ from the model's: if the config's record of this module's ranks (``module_ranks``) was
          read with the checkpoint (an adapter built by ``PeftModel.from_pretrained``), the checkpoint and its config
          disagree: an error.  If the config has no record (an adapter created fresh, e.g. by a Trainer resuming from
          a checkpoint whose ranks changed during training) or its record comes from this model's own saves (the
          Trainer's ``load_best_model_at_end`` loads an earlier checkpoint of the same run), the layer is resized to
          the checkpoint's ranks when its tensors form a consistent Tucker tensor, and the ranks are recorded.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems, resize = [], []
        for name, module in model.named_modules():
            if not (isinstance(module, TuckerLayer) and adapter_name in module.tucker_core):
                continue
            prefix = f"{name}." if name else ""
            keys = [f"{prefix}{attr}.{adapter_name}" for attr in module.adapter_layer_names]
            params = [module.core(adapter_name), *module.factors(adapter_name)]
            keys = keys[: len(params)]
            missing = [k for k in keys if k not in remapped]
            if missing:
                problems += [f"{k}: missing from the checkpoint" for k in missing]
                continue
            loaded = [remapped[k] for k in keys]
            if all(t.shape == p.shape for t, p in zip(loaded, params)):
                continue
            module_name = name.removeprefix(_PEFT_MODEL_PREFIX)
            core, factors = loaded[0], loaded[1:]
            consistent = tuple(core.shape) == tuple(u.shape[1] for u in factors) + tuple(
                params[0].shape[len(factors) :]
            ) and all(u.dim() == 2 and u.shape[0] == p.shape[0] for u, p in zip(factors, params[1:]))
            recorded_with_checkpoint = module_name in config.module_ranks and not getattr(
                config, "_module_ranks_from_save", False
            )
            if recorded_with_checkpoint or not consistent:
                problems += [
                    f"{k}: checkpoint shape {tuple(t.shape)}, config (module_ranks) gives {tuple(p.shape)}"
                    for k, t, p in zip(keys, loaded, params)
                    if t.shape != p.shape
                ]
            else:
                resize.append((module_name, module, core, factors))
        if problems:
            raise ValueError(
                f"The checkpoint does not match its adapter config ({len(problems)} tensors):\n  "
                + "\n  ".join(problems[:10])
                + "\nSave and load the adapter together with its adapter_config.json (save_pretrained writes both); "
                "the weights and the config come from different saves or were edited."
            )
        for module_name, module, core, factors in resize:
            module.set_factors(adapter_name, core, list(factors))
            config.module_ranks[module_name] = [u.shape[1] for u in factors]
        return remapped


def current_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[int, ...]]:
    """Per-module current ranks of ``adapter_name`` (names as in ``module_ranks``)."""
    return {name: layer.ranks(adapter_name) for name, layer in iter_tucker_layers(model, adapter_name)}


def adapter_parameter_count(model: nn.Module, adapter_name: str = "default") -> int:
    """Number of Tucker adapter parameters (cores and factors, active ranks) of ``adapter_name``."""
    return sum(
        layer.core(adapter_name).numel() + sum(u.numel() for u in layer.factors(adapter_name))
        for _, layer in iter_tucker_layers(model, adapter_name)
    )
