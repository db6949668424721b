"""``basis_interval``: the cores step every step, the bases move (and ranks are decided) every k steps."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from tucker_peft import TuckerLoraConfig, TuckerOptimizer, iter_tucker_layers
from tucker_peft.optimizer import auto_adaptive_scale, lora_reference_size
from tucker_peft.profiling import count_top_level_ops

from .conftest import _bert, tiny_bert, token_task

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _model():
    torch.manual_seed(0)
    config = TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "intermediate.dense"])
    return get_peft_model(tiny_bert(), config)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 120, (4, 7), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def _tucker(model):
    return {n: p for n, p in model.named_parameters() if "tucker_" in n}


def test_core_steps_between_basis_moves_are_adam_steps_of_the_cores():
    """Known answer: until the bases move, each layer's core takes torch's Adam step (at lr x the core's scale), the
    bases stay exactly as they are, and the basis gradients are summed for the next move."""
    batch = _batch()
    model = _model()
    reference = copy.deepcopy(model)
    update = TuckerOptimizer(model, lr=1e-2, basis_interval=4)
    layers = list(update.layers().values())
    ref_layers = [layer for _, layer in iter_tucker_layers(reference)]
    adam = torch.optim.Adam(
        [
            {
                "params": [layer.core("default")],
                "lr": 1e-2 * auto_adaptive_scale(lora_reference_size(layer, "default"), layer.core("default").numel()),
            }
            for layer in ref_layers
        ],
        foreach=False,
    )
    bases = {n: p.detach().clone() for n, p in _tucker(model).items() if "tucker_factors" in n}
    grad_sums = [torch.zeros_like(u) for layer in ref_layers for u in layer.factors("default")]
    for _ in range(3):
        for m in (model, reference):
            m.zero_grad()
            m(**batch).loss.backward()
        for total, u in zip(grad_sums, [u for layer in ref_layers for u in layer.factors("default")]):
            total += u.grad
        update.step()
        adam.step()
    for layer, ref in zip(layers, ref_layers):
        assert not torch.equal(layer.core("default"), torch.zeros_like(layer.core("default")))
        torch.testing.assert_close(layer.core("default"), ref.core("default"), atol=1e-6, rtol=1e-5)
    for n, p in _tucker(model).items():
        if n in bases:
            assert torch.equal(p, bases[n]), n
    sums = [update.state[u]["grad_sum"] for layer in layers for u in layer.factors("default")]
    for got, want in zip(sums, grad_sums):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert update.state[layers[0].core("default")]["lr_sum"] == pytest.approx(3e-2)


def test_a_basis_move_is_the_step_of_the_interval_mean_gradient():
    """Known answer (plain direction): the k-th step equals a step with ``basis_interval=1`` whose basis gradients
    are the interval's mean, whose learning rate is the interval's sum of learning rates, and whose core gradient is
    scaled so that the core still moves by this step's learning rate alone.  (With ``tau = 0``: the rank decision of
    a move judges the new directions at one step's size, which the twin does not.)"""
    batch = _batch()
    model = _model()
    update = TuckerOptimizer(model, lr=0.1, direction="sgd", basis_interval=3, tau=0.0)
    lrs = [0.05, 0.1, 0.2]
    sums = None
    for step, lr in enumerate(lrs):
        for group in update.param_groups:
            group["lr"] = lr
        update.zero_grad()
        model(**batch).loss.backward()
        grads = [u.grad.clone() for layer in update.layers().values() for u in layer.factors("default")]
        sums = grads if sums is None else [a + b for a, b in zip(sums, grads)]
        if step < 2:
            update.step()
    twin = copy.deepcopy(model)
    one = TuckerOptimizer(twin, lr=sum(lrs), direction="sgd", tau=0.0)
    twin_layers = [layer for _, layer in iter_tucker_layers(twin)]
    for layer, twin_layer in zip(update.layers().values(), twin_layers):
        twin_layer.core("default").grad = layer.core("default").grad * lrs[-1] / sum(lrs)
    for u, total in zip([u for layer in twin_layers for u in layer.factors("default")], sums):
        u.grad = total / len(lrs)
    update.step()
    one.step()
    assert update.ranks() == one.ranks()
    for layer, twin_layer in zip(update.layers().values(), twin_layers):
        torch.testing.assert_close(
            layer.get_delta_weight("default"), twin_layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5
        )
    # the sums are consumed by the move
    assert all(
        "grad_sum" not in update.state[u] for layer in update.layers().values() for u in layer.factors("default")
    )


def test_resuming_within_an_interval_continues_exactly():
    batch = _batch()

    def train(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()

    straight = _model()
    opt_straight = TuckerOptimizer(straight, lr=1e-2, basis_interval=3)
    train(straight, opt_straight, 8)
    first = _model()
    opt_first = TuckerOptimizer(first, lr=1e-2, basis_interval=3)
    train(first, opt_first, 4)  # one core step after the first basis move: gradient sums in the state
    saved = copy.deepcopy(opt_first.state_dict())
    resumed = _model()
    # shapes follow the ranks of the checkpoint: rebuild the factors at those ranks, then load
    for (_, a), (_, b) in zip(iter_tucker_layers(first), iter_tucker_layers(resumed)):
        b.set_factors("default", a.core("default").detach(), [u.detach() for u in a.factors("default")])
    opt_resumed = TuckerOptimizer(resumed, lr=1e-2, basis_interval=3)
    opt_resumed.load_state_dict(saved)
    train(resumed, opt_resumed, 4)
    assert opt_resumed.ranks() == opt_straight.ranks()
    for (n, p), q in zip(_tucker(straight).items(), _tucker(resumed).values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_nonfinite_gradient_in_a_core_step_skips_it_bit_identically():
    model = _model()
    update = TuckerOptimizer(model, lr=1e-2, basis_interval=4)
    batch = _batch()
    model(**batch).loss.backward()
    update.step()
    before = {n: p.detach().clone() for n, p in _tucker(model).items()}
    state_before = copy.deepcopy(update.state_dict())
    update.zero_grad()
    model(**batch).loss.backward()
    list(update.layers().values())[1].factors("default")[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        update.step()
    for n, p in _tucker(model).items():
        assert torch.equal(p, before[n]), n
    after = update.state_dict()["state"]
    for k, v in state_before["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(after[k][key]), torch.as_tensor(value)), (k, key)
    assert update.skipped_steps == 1


def test_core_steps_cost_the_same_ops_for_more_layers_and_far_fewer_than_a_basis_move():
    """The launch proxy: a core-only step is a fixed set of ``torch._foreach`` ops over all layers (6 vs 24 BERT
    layers: equal counts, every step of the interval), and costs a small fraction of a step that moves the bases."""
    counts = {}
    for layers in (6, 24):
        model = get_peft_model(
            _bert(0, vocab_size=60, num_hidden_layers=layers),
            TuckerLoraConfig(task_type="SEQ_CLS", r=4, min_rank=4, max_rank=4, target_modules=BERT_TARGETS),
        )
        update = TuckerOptimizer(model, lr=1e-2, basis_interval=4)
        batch = {k: torch.stack([r[k] for r in token_task(8)]) for k in ("input_ids", "attention_mask", "labels")}
        per_step = []
        for _ in range(8):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            per_step.append(count_top_level_ops(update.step))
        # steps 1 and 4 allocate the moments of the cores and of the bases (a layer's own tensors)
        counts[layers] = per_step[1:3] + per_step[4:]
    assert counts[24] == counts[6], counts
    core_step, move = counts[6][0], counts[6][-1]
    assert counts[6][:5] == [core_step] * 5
    assert 5 * core_step < move, (core_step, move)


def test_a_layer_without_gradient_keeps_its_own_interval():
    """A layer that gets no gradient in a step is left as it is, and its bases then move on its own count of steps."""
    model = _model()
    update = TuckerOptimizer(model, lr=1e-2, basis_interval=3)
    layers = list(update.layers().values())
    batch = _batch()

    def step(skip=None):
        update.zero_grad()
        model(**batch).loss.backward()
        if skip is not None:
            for p in [skip.core("default"), *skip.factors("default")]:
                p.grad = None
        bases = [[u.detach().clone() for u in layer.factors("default")] for layer in layers]
        update.step()
        return [
            not all(torch.equal(a, b) for a, b in zip(before, layer.factors("default")))
            for before, layer in zip(bases, layers)
        ]

    moved = [step(), step(skip=layers[0]), step(), step(), step()]
    # layer 0 skipped step 2: its third step (the one that moves its bases) is the 4th, the others' the 3rd
    assert [m[0] for m in moved] == [False, False, False, True, False]
    assert [m[1] for m in moved] == [False, False, True, False, False]
    assert update.state[layers[0].core("default")]["step"] == 4
    assert update.state[layers[1].core("default")]["step"] == 5
    for layer in layers:
        for u in layer.factors("default"):
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
