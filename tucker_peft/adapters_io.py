"""Save and load a Tucker adapter of a plain module (a diffusers UNet, a text encoder) in PEFT's format.

``PeftModel`` has ``save_pretrained``/``from_pretrained``; a diffusers ``UNet2DConditionModel`` adapted with
``unet.add_adapter(TuckerLoraConfig(...))`` has no such pair for non-LoRA methods, so these helpers write and read
the same two files PEFT does (``adapter_config.json`` with the per-module ranks, ``adapter_model.safetensors`` at the
active ranks) and :func:`load_into_pipeline` puts a saved adapter into a pipeline's UNet (and text encoder).
"""

from __future__ import annotations

import os

import torch
from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_MODEL_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default") -> None:
    """Write ``model``'s adapter ``adapter_name`` (config with ``module_ranks`` + safetensors) to ``save_directory``."""
    os.makedirs(save_directory, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)  # also records the current ranks
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(save_directory, WEIGHTS_NAME))
    model.peft_config[adapter_name].save_pretrained(save_directory)


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` (Tucker shapes rebuilt from the rank record) and load it.

    Reads what :func:`save_adapter` and ``PeftModel.save_pretrained`` write (the latter's keys start with
    ``base_model.model.``; its ``modules_to_save``, e.g. a classifier head, are loaded too).  Works for any PEFT
    method whose config ``directory`` holds (the DreamBooth example saves its LoRA baseline the same way).  The files
    are read and checked against ``model`` before anything is injected."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(
                f"{os.path.join(directory, name)} is missing: load_adapter needs a directory written by "
                "tucker_peft.save_adapter or PeftModel.save_pretrained."
            )
    config = PeftConfig.from_pretrained(directory)  # a TuckerLoraConfig, or another PEFT method's (e.g. LoRA)
    state = _read_weights(directory)
    modules = {name for name, _ in model.named_modules()}
    strangers = [key for key in state if _owning_module(key) not in modules]
    if strangers:
        raise ValueError(
            f"{directory} holds tensors for modules that {type(model).__name__} does not have: {strangers[:5]}. "
            "The adapter was saved from another model; load it into the model it was trained on."
        )
    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):  # diffusers models
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    _set_weights(model, state, directory, adapter_name)
    return model


def load_adapter_weights(model: nn.Module, directory: str, adapter_name: str = "default") -> nn.Module:
    """Load the weights saved in ``directory`` into the adapter ``adapter_name`` that ``model`` already has (e.g. a
    training checkpoint); a Tucker adapter created fresh takes the checkpoint's ranks."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: expected a folder written by tucker_peft.save_adapter.")
    _set_weights(model, _read_weights(directory), directory, adapter_name)
    return model


def _read_weights(directory: str) -> dict:
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    if state and all(key.startswith(_PEFT_MODEL_PREFIX) for key in state):  # a PeftModel's save_pretrained
        state = {key.removeprefix(_PEFT_MODEL_PREFIX): value for key, value in state.items()}
    return state


def _set_weights(model: nn.Module, state: dict, directory: str, adapter_name: str) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory}: tensors that match no adapter parameter: {result.unexpected_keys[:5]}")


def _owning_module(key: str) -> str:
    """The module a saved adapter tensor belongs to: ``a.b.tucker_core`` -> ``a.b``, ``classifier.weight`` ->
    ``classifier`` (PEFT saves without the adapter name)."""
    parts = key.split(".")[:-1]
    while parts and parts[-1].startswith(("tucker_", "lora_")):
        parts.pop()
    return ".".join(parts)


def load_into_pipeline(pipeline, directory: str, adapter_name: str = "default", fuse: bool = False):
    """Load an adapter saved by the DreamBooth example (``directory/unet``, optionally ``directory/text_encoder``)
    into a diffusers pipeline; ``fuse=True`` merges it into the weights (no inference overhead)."""
    loaded = []
    for part in ("unet", "text_encoder"):
        folder = os.path.join(directory, part)
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            load_adapter(getattr(pipeline, part), folder, adapter_name)
            loaded.append(part)
    if not loaded:
        raise FileNotFoundError(f"no tucker-peft adapter under {directory}/unet or {directory}/text_encoder")
    if fuse:
        from .layer import TuckerLayer

        with torch.no_grad():
            for part in loaded:
                for module in getattr(pipeline, part).modules():
                    if isinstance(module, TuckerLayer):
                        module.merge(adapter_names=[adapter_name])
    return pipeline
