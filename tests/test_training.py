"""Training integrations: the Trainer callback, attach() in plain/accelerate loops, AMP, accumulation, resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import Trainer

import tucker_peft
from tucker_peft import TuckerLoraCallback, TuckerLoraConfig, TuckerOptimizer

from .conftest import Regression, loop_model, reproducible_bert, token_task, train_steps
from .conftest import trainer_args as _args


def test_trainer_with_only_the_callback(tmp_path):
    model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1))
    classifier_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    args = _args(tmp_path, learning_rate=1e-2, max_steps=60)
    trainer = Trainer(model=model, args=args, train_dataset=token_task(), callbacks=[TuckerLoraCallback()])
    assert isinstance(trainer.callback_handler.callbacks[0], TuckerLoraCallback)  # runs before the reporters
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.2 * logs[0]["loss"]
    for h in logs:
        assert {"tucker_rank_mean", "tucker_rank_min", "tucker_rank_max", "tucker_params"} <= set(h)
    ranks = tucker_peft.current_ranks(model)
    assert set(ranks.values()) != {(6, 6)}  # ranks adapted
    assert logs[-1]["tucker_params"] == tucker_peft.adapter_parameter_count(model)
    # the Trainer's optimizer trained the head but holds no state for the factors
    assert not torch.equal(classifier_before, model.base_model.model.classifier.modules_to_save["default"].weight)
    factor_ids = {id(p) for p in tucker_peft.tucker_parameters(model)}
    assert not any(id(p) in factor_ids for p in trainer.optimizer.optimizer.state)
    for _, layer in tucker_peft.iter_tucker_layers(model):
        for u in layer.factors("default"):
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)

    report = json.loads((tmp_path / "tucker_ranks.json").read_text())
    assert {k: tuple(v) for k, v in report["final_ranks"].items()} == ranks
    assert len(report["history"]) == 61 and report["history"][0]["tucker_rank_mean"] == 6
    png = (tmp_path / "tucker_ranks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_planted_rank_through_the_trainer(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    u = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(48, 3, generator=g))[0]
    target = base.weight.detach() + u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T
    xs = torch.randn(64 * 150, 48, generator=g)
    data = [{"x": x, "y": F.linear(x, target, base.bias).detach()} for x in xs]
    model = get_peft_model(Regression(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1))
    args = _args(tmp_path, per_device_train_batch_size=64, learning_rate=0.5, max_steps=150, logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[TuckerLoraCallback(direction="sgd")])
    trainer.train()
    assert tucker_peft.current_ranks(model) == {"layer": (3, 3)}
    assert trainer.state.log_history[-2]["loss"] < 1e-3


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    straight = train_steps(tmp_path / "straight", 6)
    train_steps(tmp_path / "split", 6, save_steps=3)
    checkpoint = tmp_path / "split" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "tucker_peft" in saved and saved["tucker_peft"]["state"]
    assert json.loads((checkpoint / "adapter_config.json").read_text())["module_ranks"]
    resumed = train_steps(tmp_path / "split", 6, resume=str(checkpoint), save_steps=3)
    assert tucker_peft.current_ranks(resumed) == tucker_peft.current_ranks(straight)
    assert set(tucker_peft.current_ranks(straight).values()) != {(6, 6)}
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "tucker_" in n or "classifier" in n:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_bf16_autocast_training(tmp_path):
    model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, bf16=True, max_steps=10),
        train_dataset=token_task(),
        callbacks=[TuckerLoraCallback()],
    )
    trainer.train()
    layers = [layer for _, layer in tucker_peft.iter_tucker_layers(model)]
    assert all(
        p.dtype == torch.float32 for layer in layers for p in [layer.core("default"), *layer.factors("default")]
    )
    assert all(torch.count_nonzero(layer.core("default")) > 0 for layer in layers)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_autocast_adapter_dtype_false_trains_factors_in_the_base_dtype(tmp_path):
    from peft import LoraConfig, PeftModel

    base = reproducible_bert().to(torch.bfloat16)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=6), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.bfloat16}
    model = get_peft_model(
        copy.deepcopy(base), TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1), autocast_adapter_dtype=False
    )
    factors = list(tucker_peft.tucker_parameters(model))
    assert factors and {p.dtype for p in factors} == {torch.bfloat16}  # as LoRA's, not float32
    args = _args(tmp_path, learning_rate=1e-2, max_steps=60, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=token_task(), callbacks=[TuckerLoraCallback()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.3 * logs[0]["loss"]
    assert set(tucker_peft.current_ranks(model).values()) != {(6, 6)}  # ranks adapted
    layers = [layer for _, layer in tucker_peft.iter_tucker_layers(model)]
    for layer in layers:  # the update kept the dtype through rank changes; bases orthonormal to bf16 precision
        assert {p.dtype for p in [layer.core("default"), *layer.factors("default")]} == {torch.bfloat16}
        for u in layer.factors("default"):
            torch.testing.assert_close(u.float().T @ u.float(), torch.eye(u.shape[1]), atol=3e-2, rtol=0)

    model.save_pretrained(tmp_path / "adapter")
    batch = {k: torch.stack([r[k] for r in token_task(8)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    for autocast, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", autocast_adapter_dtype=autocast)
        assert {p.dtype for p in tucker_peft.tucker_parameters(loaded)} == {dtype}
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=0 if not autocast else 2e-2, rtol=0)


@pytest.mark.slow
def test_torch_compile_through_the_trainer_recompiles_nothing_when_ranks_change(tmp_path):
    """The Trainer's ``torch_compile=True``: the adapters run outside the compiled graphs, so a rank change costs no
    recompilation (before: one per change, and after torch._dynamo's recompile_limit of 8 the whole model ran eager;
    30 steps of this test: 138 s against 20 s), and the run equals the eager one."""
    import torch._dynamo
    from transformers import TrainerCallback

    class Graphs(TrainerCallback):
        def __init__(self):
            self.per_step, self.ranks = [], []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.per_step.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            self.ranks.append(tucker_peft.current_ranks(model))

    def run(compiled):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # (reset() keeps the counts of earlier tests)
        model = get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1))
        graphs = Graphs()
        args = _args(tmp_path, learning_rate=1e-2, max_steps=20, logging_steps=5, torch_compile=compiled)
        trainer = Trainer(model, args, train_dataset=token_task(), callbacks=[TuckerLoraCallback(), graphs])
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], graphs

    eager_losses, eager = run(False)
    losses, compiled = run(True)
    assert compiled.per_step[0] > 0 and eager.per_step[-1] == 0  # compiled, and only there
    assert compiled.ranks == eager.ranks
    assert len({tuple(r.values()) for r in compiled.ranks[1:]}) > 5  # the ranks kept changing after step 2 ...
    # ... without a new graph (step 2 adds one: BERT sets config.problem_type in its first forward, LoRA's too)
    assert len(set(compiled.per_step[1:])) == 1
    assert losses == pytest.approx(eager_losses, abs=1e-4)


def test_fp16_grad_scaler_skips_overflow_for_the_factors():
    model, batch = loop_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker = tucker_peft.attach(optimizer, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(overflow=False):
        optimizer.zero_grad()
        scaler.scale(model(**batch).loss).backward()
        if overflow:
            list(tucker.layers().values())[2].factors("default")[0].grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)  # unscales the factors' gradients too: they are in the optimizer's groups
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    step()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ranks = tucker.ranks()
    moments = copy.deepcopy(tucker.state_dict())
    scale = scaler.get_scale()
    step(overflow=True)
    assert scaler.get_scale() < scale  # the scaler saw the overflow
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n  # nothing moved: neither the head nor the factors
    assert tucker.ranks() == ranks and tucker.state_dict()["state"].keys() == moments["state"].keys()
    step()  # and the next regular step trains again
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "tucker_core" in n)


def test_scaled_gradients_are_unscaled_before_the_update():
    """The same step with a GradScaler (no overflow) and without one gives the same factors."""
    results = []
    for use_scaler in (False, True):
        model, batch = loop_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        tucker_peft.attach(optimizer, model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        scaler.scale(model(**batch).loss).backward()
        scaler.step(optimizer)
        results.append([p.detach().clone() for p in tucker_peft.tucker_parameters(model)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_accelerate_loop_with_accumulation_equals_one_big_batch():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def run(accumulate):
        model, batch = loop_model()
        model.double()  # fp64: the comparison is about the accumulation logic, not fp32 round-off through Adam/SVD
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tucker_peft.attach(optimizer, model)  # the one extra line, before prepare
        AcceleratorState._reset_state(True)  # earlier Trainer tests leave a (bf16) state behind
        accelerator = Accelerator(gradient_accumulation_steps=accumulate, cpu=True, mixed_precision="no")
        model, optimizer = accelerator.prepare(model, optimizer)
        for _ in range(3):
            parts = [{k: v[i::accumulate] for k, v in batch.items()} for i in range(accumulate)]
            for part in parts:
                with accelerator.accumulate(model):
                    accelerator.backward(model(**part).loss)
                    accelerator.clip_grad_norm_(model.parameters(), 10.0)
                    optimizer.step()
                    optimizer.zero_grad()
        return accelerator.unwrap_model(model)

    one, two = run(1), run(2)
    assert tucker_peft.current_ranks(one) == tucker_peft.current_ranks(two)
    assert set(tucker_peft.current_ranks(one).values()) != {(6, 6)}
    for (n, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-9, msg=n)


def test_optimizer_state_dict_carries_the_update_state():
    model, batch = loop_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker = tucker_peft.attach(optimizer, model)
    model(**batch).loss.backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["tucker_peft"]["state"]
    model2 = copy.deepcopy(model)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    tucker2 = tucker_peft.attach(optimizer2, model2)
    optimizer2.load_state_dict(saved)
    for k, v in tucker.state_dict()["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(tucker2.state_dict()["state"][k][key]), torch.as_tensor(value))
    # the update keeps following the (new) group dicts that load_state_dict installed: at lr 0 no delta moves
    optimizer2.param_groups[0]["lr"] = 0.0
    model2(**batch).loss.backward()
    layers = [layer for _, layer in tucker_peft.iter_tucker_layers(model2)]
    before = [layer.get_delta_weight("default").detach().clone() for layer in layers]
    optimizer2.step()
    assert all(g["lr"] == 0.0 for g in tucker2.param_groups)
    for layer, delta in zip(layers, before):
        torch.testing.assert_close(layer.get_delta_weight("default"), delta, atol=1e-6, rtol=1e-5)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="needs a model with Tucker adapters"):
        Trainer(
            model=reproducible_bert(),
            args=_args("/tmp/tucker-misuse"),
            train_dataset=token_task(),
            callbacks=[TuckerLoraCallback()],
        )
    model, batch = loop_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker_peft.attach(optimizer, model)
    with pytest.raises(RuntimeError, match="already called"):
        tucker_peft.attach(optimizer, model)
    with pytest.raises(RuntimeError, match="another TuckerOptimizer"):
        TuckerOptimizer(model)
    # a custom loop whose base optimizer also steps the factors: refused before its step (tests/test_reliability.py);
    # factors changed by hand behind the update's back: refused at the next geometric step
    model, batch = loop_model(1)
    tucker = TuckerOptimizer(model, lr=1e-2)
    model(**batch).loss.backward()
    with torch.no_grad():
        tucker_peft.tucker_parameters(model)[1].add_(0.1)  # moves a basis off the manifold
    with pytest.raises(RuntimeError, match="another optimizer holds them"):
        tucker.step()


def test_an_adapter_loaded_for_inference_is_refused_with_how_to_load_it_for_training(tmp_path):
    """PeftModel.from_pretrained loads an adapter frozen (for inference), PEFT's usual pitfall: training it with the
    callback is refused before the first step (before: the first lr scheduler step failed inside torch with a zip()
    error), and so are attach and TuckerOptimizer; evaluating it with the callback in the list works; loaded with
    is_trainable=True it trains."""
    from peft import PeftModel

    loop_model()[0].save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(reproducible_bert(), tmp_path / "adapter")
    before = [p.detach().clone() for p in frozen.parameters()]
    trainer = Trainer(
        model=frozen, args=_args(tmp_path), train_dataset=token_task(), eval_dataset=token_task(32),
        callbacks=[TuckerLoraCallback()],
    )  # fmt: skip
    assert "eval_loss" in trainer.evaluate()
    with pytest.raises(ValueError, match=r"'default' is frozen.*is_trainable=True"):
        trainer.train()
    assert trainer.state.global_step == 0 and all(torch.equal(p, q) for p, q in zip(before, frozen.parameters()))
    with pytest.raises(ValueError, match="is frozen"):
        tucker_peft.attach(torch.optim.AdamW(frozen.parameters(), lr=1e-2), frozen)
    with pytest.raises(ValueError, match="is frozen"):
        TuckerOptimizer(frozen)

    trainable = PeftModel.from_pretrained(reproducible_bert(), tmp_path / "adapter", is_trainable=True)
    start = tucker_peft.current_ranks(trainable)
    args = _args(tmp_path, max_steps=10)
    Trainer(model=trainable, args=args, train_dataset=token_task(), callbacks=[TuckerLoraCallback()]).train()
    assert tucker_peft.current_ranks(trainable) != start


def test_attach_with_optimizer_built_from_the_other_parameters():
    model, batch = loop_model()
    optimizer = torch.optim.AdamW(tucker_peft.non_tucker_parameters(model), lr=1e-2)
    tucker = tucker_peft.attach(optimizer, model)
    assert len(optimizer.param_groups) == 2  # the factors were added so that unscale_/schedulers see them
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.5, total_iters=2)  # made after attach: sees both
    model(**batch).loss.backward()
    optimizer.step()
    scheduler.step()
    assert tucker.state_dict()["state"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.0075, 0.0075]
    # a scheduler made before attach would not know the added group (torch fails at its step): refused, unchanged
    model, batch = loop_model(1)
    optimizer = torch.optim.AdamW(tucker_peft.non_tucker_parameters(model), lr=1e-2)
    torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=2)
    with pytest.raises(ValueError, match="before creating the scheduler"):
        tucker_peft.attach(optimizer, model)
    assert len(optimizer.param_groups) == 1


def test_detach_removes_the_update_and_releases_the_factors():
    model, batch = loop_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker_peft.attach(optimizer, model)
    model(**batch).loss.backward()
    optimizer.step()
    assert "tucker_peft" in optimizer.state_dict()
    tucker_peft.detach(optimizer)
    factors = {id(p) for p in tucker_peft.tucker_parameters(model)}
    assert not any(id(p) in factors for g in optimizer.param_groups for p in g["params"])
    assert "tucker_peft" not in optimizer.state_dict()
    before = [p.detach().clone() for p in tucker_peft.tucker_parameters(model)]
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()  # trains the head only now
    assert all(torch.equal(p, q) for p, q in zip(before, tucker_peft.tucker_parameters(model)))
    TuckerOptimizer(model)  # the factors are free for a new update
    with pytest.raises(ValueError, match="no geometric update attached"):
        tucker_peft.detach(optimizer)


def test_an_attached_optimizer_and_its_model_can_be_collected():
    import gc
    import weakref

    model, batch = loop_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tucker_peft.attach(optimizer, model)
    model(**batch).loss.backward()
    optimizer.step()
    refs = [weakref.ref(optimizer), weakref.ref(model)]
    del optimizer, model, batch
    gc.collect()
    assert all(ref() is None for ref in refs)  # e.g. a seed loop must not keep every run's model alive


FORGOT = "without the geometric update"


def _forgot_warnings(record) -> list:
    return [w for w in record if FORGOT in str(w.message)]


def test_a_trainer_without_the_callback_warns_once_and_one_with_it_does_not(tmp_path):
    """The likeliest mistake of a LoRA user, the Trainer without TuckerLoraCallback, trains the factors as plain
    parameters with fixed ranks: it is named (once, before the first step) with the one-line fix; with the callback,
    or the factors frozen, nothing is said."""
    import warnings

    for callbacks, expect in (([], 1), ([TuckerLoraCallback()], 0)):
        model = loop_model()[0]
        start = tucker_peft.current_ranks(model)
        trainer = Trainer(
            model=model, args=_args(tmp_path, max_steps=6), train_dataset=token_task(), callbacks=callbacks
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.train()
        found = _forgot_warnings(record)
        assert len(found) == expect, [str(w.message) for w in found]
        if expect:
            assert "callbacks=[tucker_peft.TuckerLoraCallback()]" in str(found[0].message)
            assert tucker_peft.current_ranks(model) == start  # what it warns about: the ranks did not move
        else:
            assert tucker_peft.current_ranks(model) != start
    # a frozen adapter in a plain optimizer (only the head trains): nothing to warn about
    model, batch = loop_model()
    for name, p in model.named_parameters():
        p.requires_grad_("classifier" in name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**batch).loss.backward()
        opt.step()
    assert not _forgot_warnings(record)


def test_a_loop_without_attach_warns_once_per_optimizer():
    """In a plain loop: an optimizer over model.parameters() warns at its first step, not again; an optimizer over
    non_tucker_parameters beside a TuckerOptimizer does not; after attach the same kind of optimizer does not."""
    import warnings

    model, batch = loop_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert len(_forgot_warnings(record)) == 1

    for attached in (False, True):
        model, batch = loop_model()
        if attached:  # the one extra line: the user's optimizer steps, the factors go to the geometric update
            steppers = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
            tucker_peft.attach(steppers[0], model)
        else:  # or the two optimizers side by side
            steppers = [torch.optim.AdamW(tucker_peft.non_tucker_parameters(model), lr=1e-3)]
            steppers.append(TuckerOptimizer(model, lr=1e-3))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(2):
                model(**batch).loss.backward()
                for o in steppers:
                    o.step()
                    o.zero_grad()
        assert not _forgot_warnings(record), attached


def _word_tokenizer():
    """A word-level tokenizer for the words ``w0`` ... ``w19`` (ids 3-22) of the trl tests' tasks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(20)}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_trl_sft_trainer_with_the_config_and_the_callback(tmp_path):
    """trl's SFTTrainer, the usual way to fine-tune a causal LM with PEFT: ``peft_config=TuckerLoraConfig(...)``
    and the callback.  A counting task (each word is followed by the next one, mod 20) that the adapters alone must
    learn on a random GPT-2: the token accuracy rises from chance, the ranks adapt, the update (not the Trainer's
    AdamW) owns the factors, and the saved adapter reloads with the same logits."""
    import warnings

    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from .conftest import tiny_gpt2

    tokenizer = _word_tokenizer()
    texts = [" ".join(f"w{(start + j) % 20}" for j in range(12)) for start in range(20)] * 4
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=5,
        lr_scheduler_type="linear", logging_steps=10, max_length=32, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=TuckerLoraConfig(task_type="CAUSAL_LM", r=6, tau=0.1),
        callbacks=[TuckerLoraCallback()],
    )
    model = trainer.model
    assert type(model.base_model).__name__ == "TuckerLoraModel"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert not _forgot_warnings(record)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    # (2026-12-03: 0.11 after 10 steps, 0.68 after 60; chance is 1/20 on the task's words)
    assert logs[0]["mean_token_accuracy"] < 0.3 and logs[-1]["mean_token_accuracy"] > 0.5
    assert set(tucker_peft.current_ranks(model).values()) != {(6, 6)}
    factor_ids = {id(p) for p in tucker_peft.tucker_parameters(model)}
    assert factor_ids and not any(id(p) in factor_ids for p in trainer.optimizer.optimizer.state)

    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[3 + i % 20 for i in range(10)]])
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter")).eval()
    # trl trains in bf16 by default: accelerate left the trained model's forward under bf16 autocast
    assert trainer.args.bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(ids).logits.float()
        torch.testing.assert_close(reloaded(ids).logits.float(), trained)
        with model.disable_adapter():
            assert (model(ids).logits.float() - trained).abs().max() > 0.1  # what the adapter learned (0.66)


def test_trl_dpo_trainer_uses_the_disabled_adapter_as_reference(tmp_path):
    """trl's DPOTrainer with ``peft_config``: no reference model is built, the reference log-probabilities are the
    policy's with the adapter disabled (the base model), and the update trains the adapter towards the chosen
    continuations (each prompt's next three words, against three words further on)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from .conftest import tiny_gpt2

    def words(start, n):
        return " ".join(f"w{(start + j) % 20}" for j in range(n))

    rows = [
        {"prompt": words(s, 5), "chosen": " " + words(s + 5, 3), "rejected": " " + words(s + 11, 3)} for s in range(20)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=5e-3, logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Dataset.from_list(rows * 4),
        processing_class=_word_tokenizer(),
        peft_config=TuckerLoraConfig(task_type="CAUSAL_LM", r=6, tau=0.1),
        callbacks=[TuckerLoraCallback()],
    )
    assert trainer.ref_model is None  # the reference is the base model, through disable_adapter
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # (2026-12-03: reward accuracy 0.64 -> 1.0, margin 0.021 -> 0.123, loss 0.683 -> 0.634)
    assert logs[0]["rewards/accuracies"] < 0.8 and logs[-1]["rewards/accuracies"] == 1.0
    assert logs[-1]["rewards/margins"] > 3 * logs[0]["rewards/margins"] > 0
    model = trainer.model
    assert set(tucker_peft.current_ranks(model).values()) != {(6, 6)}
    factor_ids = {id(p) for p in tucker_peft.tucker_parameters(model)}
    assert factor_ids and not any(id(p) in factor_ids for p in trainer.optimizer.optimizer.state)
    # the reference stayed the base model: the adapter disabled gives the untrained model's logits
    ids = torch.tensor([[3 + i % 20 for i in range(10)]])
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, tiny_gpt2()(ids).logits)
        assert (model(ids).logits - tiny_gpt2()(ids).logits).abs().max() > 1e-2
