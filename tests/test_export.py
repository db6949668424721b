"""Exact LoRA export (PEFT, diffusers, kohya, LyCORIS layouts) and LoRA import (from_lora)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

import tucker_peft
from tucker_peft import TuckerLoraConfig
from tucker_peft.export import from_lora

from .conftest import (
    UNET_TARGETS,
    planted_lora,
    randomize_adapter,
    run_fresh_python,
    tiny_bert,
    tiny_gpt2,
    tiny_unet,
    unet_inputs,
)

IDS = torch.tensor([[3, 17, 42, 99, 5, 8, 23, 61], [11, 2, 7, 7, 90, 4, 33, 1]])

FRESH_LOAD = """
import sys, torch, transformers
from peft import PeftModel
model = transformers.{auto}.from_pretrained({base!r})
model = PeftModel.from_pretrained(model, {lora!r}).eval()
assert 'tucker_peft' not in sys.modules
with torch.no_grad():
    out = model(input_ids=torch.tensor({ids})).logits
torch.save(out, {out!r})
"""


@pytest.mark.parametrize("kind", ["bert", "gpt2"])  # nn.Linear, transformers' Conv1D
def test_peft_export_loads_without_tucker_peft(tmp_path, kind):
    base, task, auto = {
        "bert": (tiny_bert(), "SEQ_CLS", "AutoModelForSequenceClassification"),
        "gpt2": (tiny_gpt2(), "CAUSAL_LM", "AutoModelForCausalLM"),
    }[kind]
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TuckerLoraConfig(task_type=task, r=6)).eval()
    ranks = randomize_adapter(model)
    if kind == "bert":  # a trained head travels with the adapter
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.mul_(-3)
    model.save_pretrained(tmp_path / "tucker")
    tucker_peft.export_lora(str(tmp_path / "tucker"), str(tmp_path / "lora"))

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {k: v[0] for k, v in ranks.items()}
    code = FRESH_LOAD.format(
        auto=auto, base=str(tmp_path / "base"), lora=str(tmp_path / "lora"), ids=IDS.tolist(), out=str(tmp_path / "o")
    )
    run_fresh_python(code, cwd=tmp_path)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    exported = torch.load(tmp_path / "o", weights_only=True)
    torch.testing.assert_close(exported, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    # and the export of a model (not a directory) is the same
    tucker_peft.export_lora(model, str(tmp_path / "lora2"))
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora", "lora2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("conv_mode", ["channels", "full"])
def test_peft_export_of_a_unet_with_convolutions(tmp_path, conv_mode):
    unet = tiny_unet()
    unet.add_adapter(TuckerLoraConfig(r=4, target_modules=UNET_TARGETS, conv_mode=conv_mode))
    randomize_adapter(unet, seed=3)
    tucker_peft.save_adapter(unet, str(tmp_path / "tucker"))
    tucker_peft.export_lora(str(tmp_path / "tucker"), str(tmp_path / "lora"))
    plain = tiny_unet()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "lora")), plain)
    result = set_peft_model_state_dict(plain, load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    with torch.no_grad():
        expected, got = unet(*unet_inputs()).sample, plain(*unet_inputs()).sample
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected - tiny_unet()(*unet_inputs()).sample).abs().max() > 1e-2  # the adapter does something


def _kohya_delta(tensors: dict, key: str) -> torch.Tensor:
    """The documented formulas: kohya ``alpha / rank * up @ down``; LyCORIS Tucker ``up x_0 (mid x_1 down)``."""
    down, up, alpha = (tensors[f"{key}.{n}"] for n in ("lora_down.weight", "lora_up.weight", "alpha"))
    rank = down.shape[0]
    up2, down2 = up.flatten(1), down.flatten(1)
    if f"{key}.lora_mid.weight" in tensors:
        mid = tensors[f"{key}.lora_mid.weight"]
        delta = torch.einsum("ij...,jn,oi->on...", mid, down2, up2)
    else:
        delta = (up2 @ down2).reshape(up.shape[0], *down.shape[1:])
    return alpha / rank * delta


@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
@pytest.mark.parametrize("conv_mode", ["channels", "full"])
def test_kohya_and_lycoris_exports_rebuild_the_delta(tmp_path, fmt, conv_mode):
    unet = tiny_unet()
    unet.add_adapter(TuckerLoraConfig(r=4, target_modules=UNET_TARGETS, conv_mode=conv_mode))
    randomize_adapter(unet, seed=4)
    tucker_peft.save_adapter(unet, str(tmp_path / "tucker"))
    tucker_peft.export_lora(str(tmp_path / "tucker"), str(tmp_path / fmt), format=fmt)
    tensors = load_file(tmp_path / fmt / "lora.safetensors")
    layers = dict(tucker_peft.iter_tucker_layers(unet))
    assert len(tensors) == sum(
        4 if fmt == "lycoris" and isinstance(m, tucker_peft.Conv) else 3 for m in layers.values()
    )
    for name, layer in layers.items():
        delta = _kohya_delta(tensors, "lora_unet_" + name.replace(".", "_"))
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_from_lora_recovers_the_rank_and_is_exact_at_tau_zero(tmp_path):
    lora = planted_lora(tmp_path)
    with torch.no_grad():
        expected = lora(input_ids=IDS).logits
    for tau, rank in ((0.0, 8), (1e-4, 3)):
        out = str(tmp_path / f"tucker-{tau}")
        from_lora(str(tmp_path / "lora"), out, tau=tau)
        model = PeftModel.from_pretrained(tiny_bert(), out).eval()
        assert set(tucker_peft.current_ranks(model).values()) == {(rank, rank)}
        with torch.no_grad():
            got = model(input_ids=IDS).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # a larger tau drops real directions: smaller and no longer exact
    from_lora(lora, str(tmp_path / "tucker-big"), tau=0.5)
    small = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "tucker-big"), is_trainable=True)
    assert all(r < 3 for ranks in tucker_peft.current_ranks(small).values() for r in ranks)
    # ... and ready to keep training with the geometric update
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-3)
    tucker_peft.attach(optimizer, small)
    small(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()


def test_export_and_import_refuse_what_they_cannot_read(tmp_path):
    planted_lora(tmp_path)
    with pytest.raises(ValueError, match="not a tucker-peft one"):
        tucker_peft.export_lora(str(tmp_path / "lora"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not a saved adapter"):
        tucker_peft.export_lora(str(tmp_path), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="`format`"):
        tucker_peft.export_lora(str(tmp_path / "lora"), str(tmp_path / "x"), format="onnx")
    with pytest.raises(ValueError, match="from_lora reads LoRA"):
        model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS"))
        model.save_pretrained(tmp_path / "tucker")
        from_lora(str(tmp_path / "tucker"), str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "x")


def test_diffusers_export_gives_the_same_image(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "dreambooth"))
    import make_tiny_pipeline
    from diffusers import StableDiffusionPipeline

    make_tiny_pipeline.build_tiny_pipeline(seed=0, sample_size=32).save_pretrained(tmp_path / "sd")

    def pipeline():
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a sks dog", height=32, width=32, num_inference_steps=2, generator=generator, output_type="np")[0]

    pipe = pipeline()
    pipe.unet.add_adapter(TuckerLoraConfig(r=4, target_modules=UNET_TARGETS, init_weights=False))
    inject_adapter_in_model(TuckerLoraConfig(r=4, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    randomize_adapter(pipe.unet, seed=5)
    randomize_adapter(pipe.text_encoder, seed=6)
    for part in ("unet", "text_encoder"):
        tucker_peft.save_adapter(getattr(pipe, part), str(tmp_path / "dreambooth" / part))
    tucker_peft.export_lora(str(tmp_path / "dreambooth"), str(tmp_path / "diffusers"), format="diffusers")

    expected = image(tucker_peft.load_into_pipeline(pipeline(), str(tmp_path / "dreambooth")))
    lora_pipe = pipeline()
    lora_pipe.load_lora_weights(str(tmp_path / "diffusers"))
    got = image(lora_pipe)
    assert abs(got - expected).max() < 1e-4
    assert abs(image(pipeline()) - expected).max() > 1e-2  # the adapters change the image
