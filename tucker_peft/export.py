"""Use a Tucker adapter anywhere LoRA is understood, and bring a LoRA adapter in.

Every Tucker delta is exactly a LoRA delta of a known rank (``s`` = the adapter's ``alpha / r``):

- Linear / Conv1D (``dW = s U_0 C U_1^T``, modes out, in): ``A = C U_1^T`` ``(r_0, n_in)``, ``B = s U_0``
  ``(n_out, r_0)``.
- Convolution, ``conv_mode="channels"`` (core ``(r_0, r_1, *k)``): ``A = C x_1 U_1`` ``(r_0, n_in, *k)``, the k x k
  convolution, and ``B = s U_0`` ``(n_out, r_0, 1, ...)``, the 1x1 convolution: PEFT's / diffusers' LoRA-conv
  layout.  ``conv_mode="full"``: the window factors are first multiplied into the core.

:func:`export_lora` writes these in four layouts; :func:`from_lora` goes the other way (an exact re-factorization of
``s B A``, then truncation at ``tau``).  Neither needs the base model: they work on the saved files.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import geometry
from .adapters_io import CONFIG_NAME, WEIGHTS_NAME
from .tensor_ops import mode_dot, multi_mode_dot, unfold

FORMATS = ("peft", "diffusers", "kohya", "lycoris")
_PEFT_MODEL_PREFIX = "base_model.model."
#: file names the consumers look for
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora.safetensors"
#: kohya / LyCORIS key prefixes per pipeline part
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}


# ------------------------------------------------------------------------------------------------------------------
# Reading a saved Tucker adapter
def read_tucker_adapter(directory: str) -> tuple[dict, dict[str, dict], dict[str, torch.Tensor]]:
    """``(config dict, {module: {"core", "factors", "scale"}}, other tensors)`` of a saved Tucker adapter.

    ``other tensors`` are the non-adapter weights saved with it (``modules_to_save``, e.g. a classifier head), under
    their saved keys.  Raises a ``ValueError`` naming the problem if ``directory`` is not a Tucker adapter."""
    config, state = _read_saved_adapter(
        directory, "TUCKER", "written by save_pretrained or tucker_peft.save_adapter", "not a tucker-peft one"
    )
    modules: dict[str, dict] = {}
    others = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.tucker_(core|U\d)", key)
        if match is None:
            others[key] = tensor
            continue
        name, part = match.groups()
        entry = modules.setdefault(name.removeprefix(_PEFT_MODEL_PREFIX), {"key_prefix": name, "factors": {}})
        if part == "core":
            entry["core"] = tensor
        else:
            entry["factors"][int(part[1:])] = tensor
    for name, entry in modules.items():
        factors = entry.pop("factors")
        if "core" not in entry or sorted(factors) != list(range(len(factors))) or len(factors) < 2:
            raise ValueError(f"{directory}: the tensors of {name!r} do not form a Tucker adapter (core, U0, U1, ...).")
        entry["factors"] = [factors[i] for i in range(len(factors))]
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        entry["scale"] = _pattern_value(config.get("alpha_pattern") or {}, name, config["alpha"]) / r
    return config, modules, others


def _read_saved_adapter(directory: str, peft_type: str, what: str, refusal: str) -> tuple[dict, dict]:
    """``(adapter_config.json as a dict, the safetensors weights)`` of a saved ``peft_type`` adapter, or a
    ``ValueError`` naming what ``directory`` lacks (``what``) or holds instead (``refusal``)."""
    config_path, weights_path = (os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ValueError(f"{directory} is not a saved adapter: it needs {CONFIG_NAME} and {WEIGHTS_NAME} ({what}).")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != peft_type:
        raise ValueError(
            f"{directory} holds a {config.get('peft_type')!r} adapter, {refusal} (peft_type {peft_type!r})."
        )
    return config, load_file(weights_path)


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_factors(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A`` (for convolutions: the 1x1 ``B`` after the k x k ``A``) equal to ``scale * dW``."""
    core, factors = core.float(), [u.float() for u in factors]
    if len(factors) > 2:  # full conv mode: the window modes first
        core = multi_mode_dot(core, factors[2:], range(2, len(factors)))
    a = mode_dot(core, factors[1], 1)  # (r_0, n_in, *k)
    b = scale * factors[0]
    return a.contiguous(), b.reshape(*b.shape, *(1,) * (a.dim() - 2)).contiguous()


# ------------------------------------------------------------------------------------------------------------------
# Export
def export_lora(model_or_dir: nn.Module | str, output_dir: str, format: str = "peft") -> str:
    """Write a Tucker adapter as a LoRA adapter that tools without tucker-peft load; returns ``output_dir``.

    Args:
        model_or_dir: a directory written by ``save_pretrained`` / :func:`tucker_peft.save_adapter`, a DreamBooth
            output directory (``unet/`` and optionally ``text_encoder/``, for ``diffusers``, ``kohya``,
            ``lycoris``), or a model holding a Tucker adapter (saved to a temporary directory first).
        format:
            - ``"peft"``: ``adapter_config.json`` (``peft_type: LORA``, per-module ``rank_pattern`` and
              ``alpha_pattern`` with ``alpha = r``, so LoRA's scale is 1 and ``s`` sits in ``B``) and
              ``adapter_model.safetensors``; ``PeftModel.from_pretrained`` loads it with plain PEFT.
              ``modules_to_save`` (a classifier head) are carried over.
            - ``"diffusers"``: ``pytorch_lora_weights.safetensors`` with PEFT-style keys under ``unet.`` /
              ``text_encoder.`` (and alphas in its metadata), which ``pipe.load_lora_weights(output_dir)`` loads.
            - ``"kohya"``: ``lora.safetensors`` with ``lora_unet_<module>.lora_down.weight`` (= ``A``),
              ``.lora_up.weight`` (= ``B``), ``.alpha`` (= rank, so the kohya scale ``alpha / rank`` is 1); text
              encoder modules under ``lora_te_``.
            - ``"lycoris"``: ``lora.safetensors`` in LyCORIS' Tucker LoCon form: ``lora_down`` ``(r, n_in, 1, ..)``
              = ``U_1^T``, ``lora_mid`` ``(r, r, *k)`` = the core, ``lora_up`` ``(n_out, r, 1, ..)`` = ``s U_0``,
              ``alpha`` = ``r``; delta ``= up x_0 (mid x_1 down)``.  LyCORIS needs one rank ``r`` per module:
              the smaller of ``r_0``, ``r_1`` is padded with zero rows/columns of the core (exact).  Linear layers
              are written as plain ``lora_down``/``lora_up`` pairs; ``conv_mode="full"`` adapters have their
              window factors multiplied into ``lora_mid``.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}; got {format!r}.")
    if isinstance(model_or_dir, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            _save_model_adapter(model_or_dir, tmp)
            return export_lora(tmp, output_dir, format)
    parts = _pipeline_parts(model_or_dir)
    if format == "peft":
        if parts:
            raise ValueError(
                f"{model_or_dir} is a DreamBooth output (unet/, text_encoder/): export it with format='diffusers', "
                "'kohya' or 'lycoris', or export one part's folder with format='peft'."
            )
        _export_peft(model_or_dir, output_dir)
        return output_dir
    os.makedirs(output_dir, exist_ok=True)
    parts = parts or {"unet": model_or_dir}
    tensors, metadata = {}, {}
    for part, folder in parts.items():
        _, modules, _ = read_tucker_adapter(folder)
        for name, entry in sorted(modules.items()):
            if format == "diffusers":
                a, b = lora_factors(entry["core"], entry["factors"], entry["scale"])
                tensors[f"{part}.{name}.lora_A.weight"] = a
                tensors[f"{part}.{name}.lora_B.weight"] = b
            else:
                key = f"{KOHYA_PREFIXES[part]}_{name.replace('.', '_')}"
                tensors.update(_kohya_tensors(key, entry, lycoris=format == "lycoris"))
    if format == "diffusers":
        metadata = {"format": "pt"}
        save_file(tensors, os.path.join(output_dir, DIFFUSERS_WEIGHTS_NAME), metadata=metadata)
    else:
        save_file(tensors, os.path.join(output_dir, KOHYA_WEIGHTS_NAME), metadata={"format": "pt"})
    return output_dir


def _save_model_adapter(model: nn.Module, directory: str) -> None:
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config") and hasattr(model, "base_model"):
        model.save_pretrained(directory)
    else:
        from .adapters_io import save_adapter

        save_adapter(model, directory)


def _pipeline_parts(directory: str) -> dict[str, str]:
    return {
        part: os.path.join(directory, part)
        for part in KOHYA_PREFIXES
        if os.path.isfile(os.path.join(directory, part, CONFIG_NAME))
    }


def _export_peft(directory: str, output_dir: str) -> None:
    config, modules, others = read_tucker_adapter(directory)
    tensors, ranks = {}, {}
    for name, entry in modules.items():
        a, b = lora_factors(entry["core"], entry["factors"], entry["scale"])
        prefix = entry["key_prefix"]
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
        ranks[name] = a.shape[0]
    tensors.update({k: v.contiguous() for k, v in others.items()})
    from peft import LoraConfig

    r = max(ranks.values())
    lora_config = LoraConfig(
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        r=r,
        lora_alpha=r,
        lora_dropout=config.get("dropout", 0.0),
        target_modules=sorted(modules),
        rank_pattern=dict(sorted(ranks.items())),
        alpha_pattern=dict(sorted(ranks.items())),  # alpha = r per module: LoRA's scale is 1, s is in B
        modules_to_save=config.get("modules_to_save"),
        inference_mode=True,
    )
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    lora_config.save_pretrained(output_dir)


def _kohya_tensors(key: str, entry: dict, lycoris: bool) -> dict[str, torch.Tensor]:
    core, factors, scale = entry["core"].float(), [u.float() for u in entry["factors"]], entry["scale"]
    if not lycoris or core.dim() == 2:  # kohya LoRA (and LyCORIS' plain LoRA for linear layers): up @ down
        down, up = lora_factors(core, factors, scale)
        rank = down.shape[0]
        return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(rank * 1.0)}
    if len(factors) > 2:
        core = multi_mode_dot(core, factors[2:], range(2, len(factors)))
    u_out, u_in = factors[0], factors[1]
    rank = max(u_out.shape[1], u_in.shape[1])
    spatial = core.dim() - 2
    mid = core.new_zeros(rank, rank, *core.shape[2:])
    mid[: core.shape[0], : core.shape[1]] = core
    down = torch.zeros(rank, u_in.shape[0])
    down[: u_in.shape[1]] = u_in.T
    up = torch.zeros(u_out.shape[0], rank)
    up[:, : u_out.shape[1]] = scale * u_out
    return {
        f"{key}.lora_down.weight": down.reshape(*down.shape, *(1,) * spatial).contiguous(),
        f"{key}.lora_mid.weight": mid.contiguous(),
        f"{key}.lora_up.weight": up.reshape(*up.shape, *(1,) * spatial).contiguous(),
        f"{key}.alpha": torch.tensor(rank * 1.0),
    }


# ------------------------------------------------------------------------------------------------------------------
# Import
def from_lora(
    lora_dir_or_model: nn.Module | str,
    output_dir: str,
    tau: float = 0.1,
    max_rank: int | None = None,
    min_rank: int = 1,
) -> str:
    """Compress a PEFT LoRA adapter into a Tucker adapter saved in ``output_dir`` (returned).

    Per module, ``s B A`` (LoRA's scale ``s``: ``lora_alpha / r``, with ``rank_pattern`` / ``alpha_pattern`` and
    rsLoRA) is re-factorized exactly (QR of ``B`` and of the input unfolding of ``A``, then the HOSVD of the small
    core), then truncated like the update truncates: per mode the smallest rank whose discarded singular values have
    norm ``<= tau * ||core||`` (``tau = 0``: exact), within ``[min_rank, max_rank]``.  The Tucker adapter gets
    ``r`` = LoRA's ``r`` and ``alpha = r`` (scale 1; the scale is in the core), the same targets and
    ``modules_to_save``.  Load it with ``PeftModel.from_pretrained(base, output_dir, is_trainable=True)`` to keep
    training with the geometric update, or to merge it.
    """
    if not 0 <= tau < 1:
        raise ValueError(f"`tau` must lie in [0, 1); got {tau}.")
    if isinstance(lora_dir_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            lora_dir_or_model.save_pretrained(tmp)
            return from_lora(tmp, output_dir, tau, max_rank, min_rank)
    directory = lora_dir_or_model
    config, state = _read_saved_adapter(
        directory, "LORA", "a saved PEFT LoRA adapter", "from_lora reads LoRA adapters"
    )
    pairs: dict[str, dict] = {}
    others = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", key)
        if match is None:
            others[key] = tensor
        else:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    tensors, module_ranks = {}, {}
    for prefix, pair in sorted(pairs.items()):
        name = prefix.removeprefix(_PEFT_MODEL_PREFIX)
        r = pair["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        core, factors = _tucker_of_lora(pair["A"], pair["B"], scale, tau, min_rank, max_rank or r)
        tensors[f"{prefix}.tucker_core"] = core.contiguous()
        for i, u in enumerate(factors):
            tensors[f"{prefix}.tucker_U{i}"] = u.contiguous()
        module_ranks[name] = [u.shape[1] for u in factors]
    tensors.update(others)
    from .config import TuckerLoraConfig

    r = config["r"]
    tucker_config = TuckerLoraConfig(
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        r=r,
        alpha=float(r),
        tau=tau,
        min_rank=min_rank,
        max_rank=max(max_rank or r, r),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=sorted(module_ranks),
        modules_to_save=config.get("modules_to_save"),
        module_ranks=module_ranks,
        inference_mode=True,
    )
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    tucker_config.save_pretrained(output_dir)
    return output_dir


@torch.no_grad()
def _tucker_of_lora(
    a: torch.Tensor, b: torch.Tensor, scale: float, tau: float, min_rank: int, max_rank: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Channels-mode Tucker factors (core carries ``scale``; the Tucker scale is 1) of ``scale * B A``."""
    a64, b64 = a.double(), b.double().reshape(b.shape[0], b.shape[1])
    q_out, r_out = torch.linalg.qr(b64)  # (n_out, k0), (k0, r)
    in_unfold = a64.transpose(0, 1).reshape(a64.shape[1], -1)  # (n_in, r * window)
    q_in, _ = torch.linalg.qr(in_unfold)  # (n_in, k1)
    small = scale * mode_dot(mode_dot(a64, r_out, 0), q_in.T, 1)  # (k0, k1, *k): Q_out^T dW x_1 Q_in^T
    dense = tuple(small.shape[2:])
    svds = [torch.linalg.svd(unfold(small, i), full_matrices=False) for i in range(2)]
    norm = torch.linalg.norm(small).item()
    ranks = geometry.truncation_ranks([s.tolist() for _, s, _ in svds], tau * norm, min_rank, max_rank, dense)
    rotations = [u[:, :rank] for (u, _, _), rank in zip(svds, ranks)]
    core = mode_dot(mode_dot(small, rotations[0].T, 0), rotations[1].T, 1)
    return core.float(), [(q_out @ rotations[0]).float(), (q_in @ rotations[1]).float()]
