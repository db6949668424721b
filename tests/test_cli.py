"""The ``tucker-peft`` command line (installed by ``[project.scripts]``): inspect, export, compress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from peft import get_peft_model
from safetensors.torch import load_file

import tucker_peft
from tucker_peft import TuckerLoraConfig
from tucker_peft.cli import main

from .conftest import planted_lora, randomize_adapter, tiny_bert

SCRIPT = os.path.join(os.path.dirname(sys.executable), "tucker-peft")


def _saved_adapter(tmp_path):
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6))
    ranks = randomize_adapter(model)
    model.save_pretrained(tmp_path / "tucker")
    return model, ranks


def test_inspect_reports_ranks_and_compression(tmp_path, capsys):
    model, ranks = _saved_adapter(tmp_path)
    assert main(["inspect", str(tmp_path / "tucker"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {layer["module"]: tuple(layer["ranks"]) for layer in report["layers"]} == ranks
    assert report["total"]["params"] == tucker_peft.adapter_parameter_count(model)
    lora_r = max(r for v in ranks.values() for r in v)
    expected = sum(lora_r * (m.out_features + m.in_features) for _, m in tucker_peft.iter_tucker_layers(model))
    assert report["total"]["lora_params_max_rank"] == expected
    assert main(["inspect", str(tmp_path / "tucker")]) == 0
    text = capsys.readouterr().out
    assert "bert.encoder.layer.1.output.dense" in text and f"LoRA of rank {lora_r}" in text


def test_inspect_reads_a_dreambooth_output(tmp_path, capsys):
    """A DreamBooth output (unet/, text_encoder/ as the example writes them): one report per part."""
    from peft import inject_adapter_in_model

    from .conftest import tiny_gpt2

    unet = inject_adapter_in_model(TuckerLoraConfig(target_modules=["c_attn"], r=3), tiny_gpt2())
    text = inject_adapter_in_model(TuckerLoraConfig(target_modules=["query"], r=2), tiny_bert())
    for part, module in (("unet", unet), ("text_encoder", text)):
        tucker_peft.save_adapter(module, str(tmp_path / "out" / part))
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert {part: {tuple(layer["ranks"]) for layer in r["layers"]} for part, r in reports.items()} == {
        "unet": {(3, 3)},
        "text_encoder": {(2, 2)},
    }
    assert main(["inspect", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "transformer.h.1.attn.c_attn" in printed and "bert.encoder.layer.1.attention.self.query" in printed


def test_export_and_compress_commands(tmp_path, capsys):
    _saved_adapter(tmp_path)
    assert main(["export", str(tmp_path / "tucker"), str(tmp_path / "kohya"), "--format", "kohya"]) == 0
    tucker_peft.export_lora(str(tmp_path / "tucker"), str(tmp_path / "kohya-api"), format="kohya")
    cli, api = (load_file(tmp_path / d / "lora.safetensors") for d in ("kohya", "kohya-api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    planted_lora(tmp_path)
    assert main(["compress", str(tmp_path / "lora"), str(tmp_path / "compressed"), "--tau", "1e-4"]) == 0
    assert "wrote a Tucker adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "compressed" / "adapter_config.json").read_text())
    assert {tuple(v) for v in config["module_ranks"].values()} == {(3, 3)}


def test_installed_script_help_and_errors(tmp_path):
    for command in ([], ["inspect"], ["export"], ["compress"]):
        out = subprocess.run([SCRIPT, *command, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage: tucker-peft" in out.stdout
    out = subprocess.run([SCRIPT, "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "is not a saved adapter" in out.stderr
    planted_lora(tmp_path)
    out = subprocess.run(
        [SCRIPT, "export", str(tmp_path / "lora"), str(tmp_path / "x")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "not a tucker-peft one" in out.stderr
