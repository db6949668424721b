"""Everyday Trainer and adapter paths that must neither break nor go silently wrong (one regression test per case)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer

import tucker_peft
from tucker_peft import TuckerLoraCallback, TuckerLoraConfig, TuckerOptimizer

from .conftest import (
    loop_model,
    randomize_adapter,
    reproducible_bert,
    run_fresh_python,
    tiny_bert,
    token_task,
    train_steps,
    trainer_args,
)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch():
    return {k: torch.stack([r[k] for r in token_task(16, seed=5)]) for k in ("input_ids", "attention_mask", "labels")}


def test_load_best_model_at_end_with_other_ranks_than_the_last_save(tmp_path):
    model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1))
    args = trainer_args(
        tmp_path,
        max_steps=30,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="steps",
        save_steps=10,
        save_total_limit=2,  # rotation must keep the best checkpoint and still work with our files
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",  # lowest at step 10 on this task, with other ranks than at step 30
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_task(),
        eval_dataset=token_task(32, seed=1),
        callbacks=[TuckerLoraCallback()],
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-10")
    best_ranks = json.loads(open(f"{best}/adapter_config.json").read())["module_ranks"]
    last_ranks = json.loads(open(tmp_path / "checkpoint-30" / "adapter_config.json").read())["module_ranks"]
    assert best_ranks != last_ranks  # the case that crashed
    assert {k: list(v) for k, v in tucker_peft.current_ranks(model).items()} == best_ranks
    reference = PeftModel.from_pretrained(reproducible_bert(), best)
    batch = _batch()
    torch.testing.assert_close(_logits(model.eval(), batch), _logits(reference.eval(), batch), atol=1e-6, rtol=0)
    # the best adapter is what save_model writes, at its own ranks
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())["module_ranks"]
    assert saved == best_ranks
    again = PeftModel.from_pretrained(reproducible_bert(), str(tmp_path / "final"))
    torch.testing.assert_close(_logits(again.eval(), batch), _logits(reference, batch), atol=1e-6, rtol=0)
    # save_total_limit: only the best and the last checkpoint are left
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-30"]


@pytest.mark.parametrize(
    "settings", [{"tau": 0.1}, {"tau": 0.0, "max_rank": 6, "budget": 3000, "budget_schedule": [0.2, 0.8]}]
)
def test_evaluating_during_training_does_not_change_the_update(tmp_path, settings):
    """Eval forwards (eval mode, no grad) between steps must leave the factors, moments and rank decisions alone:
    without dropout the adapters end bit for bit as without evaluation."""

    def train(evals: bool):
        model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6, **settings))
        args = trainer_args(
            tmp_path / str(evals),
            max_steps=24,
            learning_rate=2e-3,
            lr_scheduler_type="linear",
            warmup_steps=3,
            eval_strategy="steps" if evals else "no",
            eval_steps=5,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=token_task(192),
            eval_dataset=token_task(32, seed=1),
            callbacks=[TuckerLoraCallback()],
        )
        trainer.train()
        return model, sum("eval_loss" in h for h in trainer.state.log_history)

    plain, none = train(False)
    evaluated, count = train(True)
    assert none == 0 and count >= 4  # every 5 steps (and at the end)
    ranks = tucker_peft.current_ranks(evaluated)
    assert ranks == tucker_peft.current_ranks(plain) and set(ranks.values()) != {(6, 6)}  # the ranks did change
    trained = dict(plain.named_parameters())
    for name, param in evaluated.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], atol=0, rtol=0)


def test_save_pretrained_leaves_the_users_config_alone(tmp_path):
    config = TuckerLoraConfig(task_type="SEQ_CLS", r=6)
    first = get_peft_model(tiny_bert(), config)
    randomize_adapter(first)  # ranks now differ from r
    first.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["module_ranks"]
    assert config.module_ranks == {}
    second = get_peft_model(tiny_bert(), config)  # a seed loop reusing one config
    assert set(tucker_peft.current_ranks(second).values()) == {(6, 6)}


@pytest.mark.parametrize("change", [{"alpha": 16}, {"r": 4}])
def test_resume_with_another_scale_is_refused(tmp_path, change):
    train_steps(tmp_path, 3, save_steps=3)
    settings = {"task_type": "SEQ_CLS", "r": 6, "tau": 0.1, **change}
    model = get_peft_model(reproducible_bert(), TuckerLoraConfig(**settings))
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=6, per_device_train_batch_size=8),
        train_dataset=token_task(),
        callbacks=[TuckerLoraCallback()],
    )
    with pytest.raises(ValueError, match=r"alpha / r.*checkpoint-3"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    straight = train_steps(tmp_path / "straight", 6)
    train_steps(tmp_path / "split", 6, save_steps=3)
    moved = tmp_path / "elsewhere" / "my-checkpoint"
    shutil.copytree(tmp_path / "split" / "checkpoint-3", moved)
    resumed = train_steps(tmp_path / "new-output", 6, resume=str(moved))
    assert tucker_peft.current_ranks(resumed) == tucker_peft.current_ranks(straight)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "tucker_" in n or "classifier" in n:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_switching_the_active_adapter_after_attach_is_refused():
    model, batch = loop_model()
    model.add_adapter("second", TuckerLoraConfig(task_type="SEQ_CLS", r=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker_peft.attach(optimizer, model)  # trains "default"
    model.set_adapter("second")
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match=r"'second' is active.*'default'"):
        optimizer.step()
    # a geometric update for "second" is not "a second update of the same layers"
    other = TuckerOptimizer(model, adapter_name="second", lr=1e-2)
    assert other.adapter_name == "second"
    with pytest.raises(RuntimeError, match="already updated by another TuckerOptimizer"):
        TuckerOptimizer(model, adapter_name="default")


@pytest.mark.parametrize("fixed_rank", [False, True])
def test_an_optimizer_that_also_holds_the_factors_is_refused(fixed_rank):
    model, batch = loop_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kwargs = {"min_rank": 6, "max_rank": 6} if fixed_rank else {}
    tucker = TuckerOptimizer(model, lr=1e-4, **kwargs)
    model(**batch).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"also holds.*non_tucker_parameters"):
        base.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # refused before it stepped
    tucker.step()  # the update itself goes on


def test_learning_rate_must_be_finite_and_a_non_finite_result_is_skipped():
    model, batch = loop_model()
    for lr in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="lr"):
            TuckerOptimizer(model, lr=lr)
    tucker = TuckerOptimizer(model, lr=1e-2)
    model(**batch).loss.backward()
    tucker.step()
    tucker.param_groups[0]["lr"] = math.inf  # e.g. a broken scheduler
    model(**batch).loss.backward()
    with pytest.raises(ValueError, match="finite"):
        tucker.step()
    for group in tucker.param_groups:
        group["lr"] = 1e38  # the core would overflow float32
    before = [p.detach().clone() for p in tucker_peft.tucker_parameters(model)]
    model.zero_grad()
    model(**batch).loss.backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        tucker.step()
    after = tucker_peft.tucker_parameters(model)
    assert tucker.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(before, after))
    assert torch.isfinite(model(**batch).loss)


class _Wide(torch.nn.Module):
    def __init__(self, n: int = 40, width: int = 16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def _deltas(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([layer.get_delta_weight("default").float() for layer in model.base_model.model.layers])


@pytest.mark.parametrize("basis_interval", [1, 2])
def test_fp16_factors_step_when_each_layer_fits_though_their_sum_does_not(basis_interval):
    """The overflow guard is per layer: 40 fp16-stored cores of norm 2,000 (their sum, 80,000, exceeds fp16's
    65,504) take the same SGD steps as in fp32 instead of being discarded as non-finite."""
    changes = []
    for dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        config = TuckerLoraConfig(target_modules=[f"layers.{i}" for i in range(40)], r=4, alpha=1e-3)
        model = get_peft_model(_Wide(), config)
        for p in tucker_peft.tucker_parameters(model):
            if p.dim() == 2 and p.shape[0] == p.shape[1] == 4:  # the cores
                p.data = torch.diag(torch.tensor([1500.0, 1000.0, 800.0, 600.0]))
            p.data = p.data.to(dtype)
        before = _deltas(model)
        update = TuckerOptimizer(model, lr=3e4, direction="sgd", basis_interval=basis_interval)
        torch.manual_seed(1)
        x, y = torch.randn(32, 16), torch.randn(32, 16)
        for _ in range(3):
            update.zero_grad()
            (model(x).float() - y).pow(2).mean().backward()
            update.step()
        assert update.skipped_steps == 0
        assert set(update.ranks().values()) == {(4, 4)}
        changes.append(_deltas(model) - before)
    change16, change32 = changes
    # the steps moved the deltas by 1.2-1.7% (fp16's resolution of the cores: 0.07%); fp16 follows fp32 to 6% of that
    assert change32.norm() > 8e-3 * before.norm()
    assert (change16 - change32).norm() <= 0.15 * change32.norm()


def test_adam_on_fp16_stored_factors_is_refused_with_the_fix():
    """Adam's second moments underflow in float16 (40 steps of a tiny BERT before this check existed: loss 0.688
    against 0.409 in fp32, 64% of the moments zero; a one-off script of 2026-12-03, not kept), so fp16-stored factors
    with direction='adam' are an error that names the fix."""
    model, batch = loop_model()
    for p in tucker_peft.tucker_parameters(model):
        p.data = p.data.half()  # as model.half() does to the adapter
    optimizer = torch.optim.AdamW(tucker_peft.non_tucker_parameters(model), lr=1e-3)
    with pytest.raises(ValueError, match=r"float16.*tucker_parameters\(model\).*float\(\)"):
        tucker_peft.attach(optimizer, model)
    assert len(optimizer.param_groups) == 1  # refused before the optimizer was changed
    for p in tucker_peft.tucker_parameters(model):  # the fix the message names
        p.data = p.data.float()
    update = tucker_peft.attach(optimizer, model)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == 1e-3
    before = [p.detach().clone() for p in tucker_peft.tucker_parameters(model)]
    model(**batch).loss.backward()
    optimizer.step()
    assert update.skipped_steps == 0
    assert any(not torch.equal(p, q) for p, q in zip(before, tucker_peft.tucker_parameters(model)))


def test_load_adapter_reads_a_peft_model_save_or_refuses_before_touching_the_model(tmp_path):
    trained = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6))
    randomize_adapter(trained)
    with torch.no_grad():
        trained.base_model.model.classifier.modules_to_save["default"].weight.mul_(-2)  # a trained head
    trained.save_pretrained(tmp_path / "seq-cls")
    batch = _batch()
    loaded = tucker_peft.load_adapter(reproducible_bert(), str(tmp_path / "seq-cls"))
    torch.testing.assert_close(_logits(loaded.eval(), batch), _logits(trained.eval(), batch), atol=1e-6, rtol=0)

    other = tiny_bert()  # another vocabulary and layer sizes, same module names: refused by the shape checks
    other.bert.encoder.layer = other.bert.encoder.layer[:1]  # ... and a layer fewer: refused before injection
    with pytest.raises(ValueError, match="saved from another model"):
        tucker_peft.load_adapter(other, str(tmp_path / "seq-cls"))
    assert not list(tucker_peft.iter_tucker_layers(other))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        (tmp_path / "seq-cls" / "adapter_model.safetensors").unlink()
        tucker_peft.load_adapter(other, str(tmp_path / "seq-cls"))


FRESH_PEFT_LOAD = """
import sys, torch, transformers
from peft import PeftConfig, PeftModel
assert 'tucker_peft' not in sys.modules  # importing peft imports nothing of tucker_peft
base = transformers.AutoModelForSequenceClassification.from_pretrained({base!r})
try:
    model = PeftModel.from_pretrained(base, {adapter!r}).eval()
except Exception as error:
    print(type(error).__name__, error)
    raise SystemExit
print(type(PeftConfig.from_pretrained({adapter!r})).__name__, 'tucker_peft' in sys.modules)
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor({ids})).logits, {out!r})
"""


def test_peft_loads_a_tucker_adapter_without_import_tucker_peft(tmp_path):
    """Item 8a: ``PeftModel.from_pretrained`` in a process that never imported tucker_peft (the installed
    ``tucker_peft-autoload.pth``, ``_tucker_peft_autoload.py``); with the autoload off, an error naming the fix."""
    reproducible_bert().save_pretrained(tmp_path / "base")
    model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = _batch()["input_ids"]
    code = FRESH_PEFT_LOAD.format(
        base=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), ids=ids.tolist(), out=str(tmp_path / "o")
    )
    assert run_fresh_python(code, cwd=tmp_path).split() == ["TuckerLoraConfig", "True"]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "o", weights_only=True), expected, atol=1e-6, rtol=0)

    message = run_fresh_python(code, cwd=tmp_path, TUCKER_PEFT_AUTOLOAD="0")
    assert message.startswith("ValueError") and "`import tucker_peft` before loading it" in message


def test_the_wheel_installs_the_autoload_file(tmp_path):
    """What puts ``tucker_peft-autoload.pth`` into site-packages for users (``setup.py``): the wheel's root."""
    root, source = Path(__file__).resolve().parents[1], tmp_path / "source"  # built from a copy: no build/ left here
    shutil.copytree(root / "tucker_peft", source / "tucker_peft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "_tucker_peft_autoload.py"):
        shutil.copy(root / name, source / name)
    shutil.copy(root / "tucker_peft-autoload.pth", source)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
    ]
    subprocess.run([*command, "."], cwd=source, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tucker_peft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"tucker_peft-autoload.pth", "_tucker_peft_autoload.py", "tucker_peft/__init__.py"} <= set(names)
    line = zipfile.ZipFile(wheel).read("tucker_peft-autoload.pth").decode()
    assert (
        line.startswith("import ") and "_tucker_peft_autoload" in line
    )  # site.py executes lines starting with import
