"""save_pretrained / PeftModel.from_pretrained in a fresh process, with a different rank in every layer."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import tucker_peft
from tucker_peft import TuckerLoraConfig

from .conftest import UNET_TARGETS, randomize_adapter, run_fresh_python, tiny_bert, tiny_gpt2, tiny_unet, unet_inputs

LOAD_AND_RUN = """
import json, torch
import tucker_peft
from peft import PeftModel
{load_base}
model = PeftModel.from_pretrained(base, {adapter!r}, is_trainable={trainable})
ref = torch.load({ref!r})
with torch.no_grad():
    out = {call}
torch.save(out, {out!r})
trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
print(json.dumps({{"ranks": {{k: list(v) for k, v in tucker_peft.current_ranks(model).items()}}, "trainable": trainable}}))
"""

CASES = {
    "bert": dict(
        build=tiny_bert,
        config=lambda: TuckerLoraConfig(task_type="SEQ_CLS", r=6, conv_mode="channels"),
        inputs=lambda: {"input_ids": torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(0))},
        call="model(**ref['inputs']).logits",
        load_base="from transformers import AutoModelForSequenceClassification\n"
        "base = AutoModelForSequenceClassification.from_pretrained({base!r}).eval()",
    ),
    "gpt2": dict(
        build=tiny_gpt2,
        config=lambda: TuckerLoraConfig(task_type="CAUSAL_LM", r=5),
        inputs=lambda: {"input_ids": torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(0))},
        call="model(**ref['inputs']).logits",
        load_base="from transformers import AutoModelForCausalLM\n"
        "base = AutoModelForCausalLM.from_pretrained({base!r}).eval()",
    ),
    "unet": dict(
        build=tiny_unet,
        config=lambda: TuckerLoraConfig(r=4, target_modules=UNET_TARGETS),
        inputs=lambda: dict(zip(["sample", "timestep", "encoder_hidden_states"], unet_inputs())),
        call="model(**ref['inputs']).sample",
        load_base="from diffusers import UNet2DConditionModel\n"
        "base = UNet2DConditionModel.from_pretrained({base!r}).eval()",
    ),
}


def _output(model, case, inputs):
    out = model(**inputs)
    return out.sample if case == "unet" else out.logits


def _save_trained(tmp_path, case):
    spec = CASES[case]
    base = spec["build"]()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, spec["config"]())
    ranks = randomize_adapter(model, seed=3)
    assert len(set(ranks.values())) > 2, "the test needs layers of different ranks"
    if case == "bert":  # the classifier head is in modules_to_save; change it too
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    inputs = spec["inputs"]()
    with torch.no_grad():
        out = _output(model, case, inputs)
    torch.save({"inputs": inputs}, tmp_path / "ref.pt")
    model.save_pretrained(tmp_path / "adapter")
    return model, ranks, out


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_in_fresh_process(tmp_path, case):
    model, ranks, expected = _save_trained(tmp_path, case)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TUCKER"
    assert {k: tuple(v) for k, v in cfg["module_ranks"].items()} == ranks
    # the safetensors file holds exactly the active ranks
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, rank in ranks.items():
        assert tuple(saved[f"base_model.model.{name}.tucker_core"].shape[: len(rank)]) == rank
        for i, r in enumerate(rank):
            assert saved[f"base_model.model.{name}.tucker_U{i}"].shape[1] == r
    n_adapter = sum(v.numel() for k, v in saved.items() if "tucker_" in k)
    assert n_adapter == tucker_peft.adapter_parameter_count(model)

    spec = CASES[case]
    code = LOAD_AND_RUN.format(
        load_base=spec["load_base"].format(base=str(tmp_path / "base")),
        adapter=str(tmp_path / "adapter"),
        trainable=False,
        ref=str(tmp_path / "ref.pt"),
        call=spec["call"],
        out=str(tmp_path / "out.pt"),
    )
    result = json.loads(run_fresh_python(code, tmp_path).strip().splitlines()[-1])
    assert {k: tuple(v) for k, v in result["ranks"].items()} == ranks
    assert result["trainable"] == []  # inference mode
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_load_is_trainable(tmp_path):
    _, ranks, expected = _save_trained(tmp_path, "bert")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    inputs = torch.load(tmp_path / "ref.pt")["inputs"]
    out = model(**inputs).logits
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("tucker_" in n for n in trainable) == 3 * len(ranks)  # core + 2 factors per layer
    assert any("classifier.modules_to_save" in n for n in trainable)
    out.sum().backward()
    layer = next(iter(tucker_peft.iter_tucker_layers(model)))[1]
    assert layer.core("default").grad is not None and layer.core("default").grad.abs().sum() > 0


def _load(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    return PeftModel.from_pretrained(base, tmp_path / "adapter")


def test_checkpoint_with_other_shapes_than_its_config_fails_clearly(tmp_path):
    _, ranks, _ = _save_trained(tmp_path, "bert")
    path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    name = next(k for k, v in cfg["module_ranks"].items() if v[0] > 1)
    cfg["module_ranks"][name] = [v - 1 for v in cfg["module_ranks"][name]]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"(?s)does not match its adapter config.*checkpoint shape"):
        _load(tmp_path)


def test_checkpoint_missing_a_tensor_fails_clearly(tmp_path):
    _save_trained(tmp_path, "bert")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if k.endswith("tucker_U1"))
    del state[dropped]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"(?s)missing from the checkpoint"):
        _load(tmp_path)


def test_rank_record_for_unknown_module_fails_clearly(tmp_path):
    _save_trained(tmp_path, "bert")
    path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["module_ranks"]["bert.encoder.layer.7.attention.self.query"] = [2, 2]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"records ranks for modules that were not adapted"):
        _load(tmp_path)


def test_second_adapter_saved_in_subfolder_and_reloaded(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model.add_adapter("small", TuckerLoraConfig(task_type="SEQ_CLS", r=2, target_modules=["value"]))
    randomize_adapter(model, "small", seed=5)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "small" / "adapter_model.safetensors").exists()
    small = json.loads((tmp_path / "adapter" / "small" / "adapter_config.json").read_text())
    assert set(small["module_ranks"]) == {f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)}
    model.set_adapter("small")
    ids = torch.randint(0, 120, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    from transformers import AutoModelForSequenceClassification

    loaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    loaded.load_adapter(tmp_path / "adapter" / "small", adapter_name="small")
    loaded.set_adapter("small")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_load_adapter_into_fresh_adapter_takes_the_checkpoint_ranks(tmp_path):
    """What a Trainer does on resume: a freshly created adapter (no rank record) loads a checkpoint whose ranks
    changed during training; the layers take the checkpoint's ranks and the outputs are reproduced."""
    _, ranks, expected = _save_trained(tmp_path, "bert")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    fresh = get_peft_model(base, CASES["bert"]["config"]())
    assert set(tucker_peft.current_ranks(fresh).values()) == {(6, 6)}
    fresh.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)
    assert tucker_peft.current_ranks(fresh) == ranks
    assert {k: tuple(v) for k, v in fresh.peft_config["default"].module_ranks.items()} == ranks
    inputs = torch.load(tmp_path / "ref.pt")["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=0, atol=0)
