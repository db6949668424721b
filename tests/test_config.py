"""TuckerLoraConfig validation, registration with PEFT, and errors for bad targets."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from torch import nn

import tucker_peft
from tucker_peft import TuckerLoraConfig, TuckerLoraModel

from .conftest import tiny_bert


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"r": 0}, "`r`", ">= 1"),
        ({"r": 2.5}, "`r`", ">= 1"),
        ({"max_rank": 0}, "`max_rank`", ">= 1"),
        ({"min_rank": 0}, "`min_rank`", ">= 1"),
        ({"min_rank": 9, "max_rank": 4, "r": 4}, "`min_rank`", "<= `max_rank`"),
        ({"r": 40, "max_rank": 32}, "`r`", "[min_rank, max_rank]"),
        ({"r": 2, "min_rank": 3}, "`r`", "[min_rank, max_rank]"),
        ({"tau": -0.1}, "`tau`", "[0, 1)"),
        ({"tau": 1.0}, "`tau`", "[0, 1)"),
        ({"alpha": 0}, "`alpha`", "> 0"),
        ({"alpha": float("nan")}, "`alpha`", "> 0"),
        ({"dropout": 1.0}, "`dropout`", "[0, 1)"),
        ({"conv_mode": "spatial"}, "`conv_mode`", "'channels', 'full'"),
        ({"rank_pattern": {"query": 64}}, "`rank_pattern['query']`", "[min_rank, max_rank]"),
        ({"module_ranks": {"a.query": [0, 2]}}, "`module_ranks['a.query']`", ">= 1"),
        ({"target_modules": ".*query", "layers_to_transform": 0}, "`layers_to_transform`", "pass a list"),
        ({"layers_pattern": "layer"}, "`layers_pattern`", "`layers_to_transform`"),
    ],
)
def test_invalid_values_name_the_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        TuckerLoraConfig(**kwargs)
    assert field in str(err.value) and allowed in str(err.value)


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(TuckerLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert {"r", "max_rank", "min_rank", "tau", "alpha", "dropout", "conv_mode", "rank_pattern", "module_ranks"} <= own
    for f in dataclasses.fields(TuckerLoraConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"field {f.name} has no help"


def test_registered_as_peft_method_once():
    assert PeftType.TUCKER.value == "TUCKER" and "TUCKER" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TUCKER] is TuckerLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TUCKER] is TuckerLoraModel
    importlib.reload(tucker_peft._registry)  # a second registration attempt is a no-op, not a KeyError
    tucker_peft._registry.register(TuckerLoraConfig, TuckerLoraModel)
    assert PeftType.TUCKER is tucker_peft._registry.TUCKER_PEFT_TYPE
    assert TuckerLoraConfig().peft_type == PeftType.TUCKER


def test_config_json_round_trip(tmp_path):
    cfg = TuckerLoraConfig(
        r=4, tau=0.05, rank_pattern={"query": 2}, module_ranks={"x.query": [2, 2]}, target_modules=["query"]
    )
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "TUCKER" and raw["module_ranks"] == {"x.query": [2, 2]}
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TuckerLoraConfig)
    assert (loaded.r, loaded.tau, loaded.rank_pattern, loaded.target_modules) == (4, 0.05, {"query": 2}, {"query"})


def test_a_lora_configs_arguments_carry_over():
    """LoraConfig(...)'s usual arguments work unchanged in TuckerLoraConfig(...): lora_alpha and lora_dropout are
    alpha and dropout (not stored twice), bias='none', init_lora_weights=True/'gaussian', fan_in_fan_out on GPT-2;
    LoRA-only choices are refused with the fix."""
    from tucker_peft.layer import TuckerLayer

    from .conftest import tiny_gpt2

    lora_kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", init_lora_weights="gaussian")
    cfg = TuckerLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], **lora_kwargs)
    assert (cfg.alpha, cfg.dropout, cfg.init_weights) == (16, 0.1, True)
    assert "lora_alpha" not in cfg.to_dict() and cfg.to_dict()["alpha"] == 16
    layers = [m for m in get_peft_model(tiny_bert(), cfg).modules() if isinstance(m, TuckerLayer)]
    assert len(layers) == 4
    assert all(m.scaling["default"] == 2.0 and m.tucker_dropout["default"].p == 0.1 for m in layers)
    gpt2 = get_peft_model(tiny_gpt2(), TuckerLoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=True, **lora_kwargs))
    assert any(isinstance(m, TuckerLayer) for m in gpt2.modules())
    assert TuckerLoraConfig(init_lora_weights=False).init_weights is False
    for bad, message in (
        (dict(bias="all"), "modules_to_save"),
        (dict(use_rslora=True), "alpha / sqrt"),
        (dict(use_dora=True), "DoRA"),
        (dict(init_lora_weights="pissa"), "zero core"),
        (dict(alpha=4.0, lora_alpha=16), "give one of them"),
        (dict(lora_alpha=-1.0), "`alpha` must be a finite number > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            TuckerLoraConfig(**bad)


def test_unknown_target_module_is_refused_before_any_change():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"target_modules \['valeu'\] match no module.*query"):
        get_peft_model(model, TuckerLoraConfig(target_modules=["query", "valeu"]))
    assert not any("tucker_" in n for n, _ in model.named_parameters())


def test_unsupported_layer_is_refused_with_fix():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"(?s)word_embeddings: Embedding is not supported.*exclude_modules"):
        get_peft_model(model, TuckerLoraConfig(target_modules=["query", "word_embeddings"]))
    assert not any("tucker_" in n for n, _ in model.named_parameters())


def test_grouped_conv_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)

    with pytest.raises(ValueError, match=r"(?s)groups=2.*exclude_modules"):
        get_peft_model(Net(), TuckerLoraConfig(target_modules=["conv"]))


def test_layers_to_transform_and_rank_pattern():
    model = get_peft_model(
        tiny_bert(),
        TuckerLoraConfig(
            target_modules=["query", "value"],
            layers_to_transform=[1],
            layers_pattern="layer",
            rank_pattern={"value": 2},
        ),
    )
    ranks = tucker_peft.current_ranks(model)
    assert ranks == {
        "bert.encoder.layer.1.attention.self.query": (8, 8),
        "bert.encoder.layer.1.attention.self.value": (2, 2),
    }
    value = model.base_model.model.bert.encoder.layer[1].attention.self.value
    assert value.scaling["default"] == pytest.approx(8.0 / 2)  # alpha / (that module's initial rank)


def test_alpha_pattern_sets_the_scale_per_module_as_lora(tmp_path):
    """LoRA's alpha_pattern: the module's scale is its alpha over its initial rank, as LoRA's with the same patterns;
    it is saved, reloaded and carried into the LoRA export (same outputs with plain PEFT)."""
    from peft import LoraConfig, PeftModel

    patterns = dict(target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"value": 32})
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(init_weights=False, **patterns))
    lora = get_peft_model(tiny_bert(), LoraConfig(r=8, lora_alpha=8, **patterns))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    lora_layer = lora.base_model.model.bert.encoder.layer[0].attention.self
    assert layer.value.scaling["default"] == lora_layer.value.scaling["default"] == 16.0
    assert layer.query.scaling["default"] == lora_layer.query.scaling["default"] == 1.0
    ids = torch.randint(0, 99, (2, 7))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "tucker")
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "tucker").eval()
    assert reloaded.base_model.model.bert.encoder.layer[0].attention.self.value.scaling["default"] == 16.0
    tucker_peft.export_lora(str(tmp_path / "tucker"), str(tmp_path / "lora"))
    exported = PeftModel.from_pretrained(tiny_bert(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`alpha_pattern\['value'\]` must be a finite number > 0"):
        TuckerLoraConfig(alpha_pattern={"value": 0})


def test_default_targets_for_bert_cover_attention_and_ffn():
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS"))
    names = set(tucker_peft.current_ranks(model))
    assert len(names) == 2 * 6 and "bert.encoder.layer.0.intermediate.dense" in names
    assert not any("pooler" in n for n in names)


def test_rank_clipped_to_small_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 50)
            self.conv = nn.Conv2d(2, 40, 1)

    model = get_peft_model(Net(), TuckerLoraConfig(target_modules=["lin", "conv"], r=8, conv_mode="full"))
    ranks = tucker_peft.current_ranks(model)
    assert ranks["lin"] == (3, 3)
    assert ranks["conv"] == (2, 2, 1, 1)  # out rank <= in rank * window ranks
    assert torch.count_nonzero(model.base_model.model.conv.core("default")) == 0


def test_callback_options_are_checked_when_the_callback_is_made():
    """TuckerLoraCallback(...) is built before the model is loaded and the data prepared: a misspelt or out-of-range
    option fails there, naming the options, not at trainer.train()."""
    from tucker_peft import TuckerLoraCallback

    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['taus'\].*direction, betas"):
        TuckerLoraCallback(taus=0.05)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['model'\]"):
        TuckerLoraCallback(model=tiny_bert())
    for options, message in (
        ({"direction": "adamw"}, "`direction` must be 'adam' or 'sgd'"),
        ({"tau": 1.5}, r"`tau` must lie in \[0, 1\)"),
        ({"min_rank": 4, "max_rank": 2}, "min_rank <= max_rank"),
        ({"rank_warmup": -1}, "`rank_warmup` must be an integer >= 0"),
        ({"adaptive_scale": 0}, "`adaptive_scale` must be 'auto' or a number > 0"),
        ({"budget": 1000, "budget_schedule": [0.8, 0.2]}, "0 <= start < end <= 1"),
        ({"betas": (0.9, 1.0)}, r"`betas` must lie in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            TuckerLoraCallback(**options)
    callback = TuckerLoraCallback(direction="sgd", tau=0.05, budget_schedule=[0.2, 0.8])  # budget from the config
    assert callback.optimizer_kwargs == {"direction": "sgd", "tau": 0.05, "budget_schedule": [0.2, 0.8]}
