"""TuckerOptimizer: planted ranks, descent, truncation bound, moment transport, robustness, state."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import tucker_peft
from tucker_peft import TuckerLoraConfig, TuckerOptimizer, geometry
from tucker_peft.profiling import count_top_level_ops

from .conftest import Net, _bert, tiny_bert, token_task

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _planted_linear(rank=3, n_out=40, n_in=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    u = torch.linalg.qr(torch.randn(n_out, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n_in, rank, generator=g))[0]
    dstar = u @ torch.diag(torch.linspace(3.0, 1.0, rank)) @ v.T
    return base, dstar, g


def _check_invariants(opt, min_rank, max_rank):
    for layer in opt.layers().values():
        for u in layer.factors("default"):
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
        assert all(min_rank <= r <= max_rank for r in layer.ranks("default"))


@pytest.mark.parametrize(("direction", "lr", "steps"), [("sgd", 0.5, 150), ("adam", 2e-2, 250)])
def test_planted_linear_rank_is_recovered(direction, lr, steps):
    base, dstar, g = _planted_linear()
    target = base.weight.detach() + dstar
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1))
    opt = TuckerOptimizer(model, lr=lr, direction=direction)
    layer = model.base_model.model.layer
    first = None
    for _ in range(steps):
        x = torch.randn(64, 48, generator=g)
        loss = ((model(x) - F.linear(x, target, base.bias)) ** 2).sum(1).mean() / 2
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _check_invariants(opt, 1, 32)
    assert layer.ranks("default") == (3, 3)
    assert loss.item() < 1e-4 * first
    err = torch.linalg.norm(layer.get_delta_weight("default") - dstar) / torch.linalg.norm(dstar)
    assert err < 1e-2


@pytest.mark.parametrize(("direction", "lr", "steps"), [("sgd", 2.0, 120), ("adam", 1e-2, 300)])
def test_planted_conv_channel_ranks_are_recovered(direction, lr, steps):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Conv2d(6, 8, 3, padding=1)
    u_out = torch.linalg.qr(torch.randn(8, 3, generator=g))[0]
    u_in = torch.linalg.qr(torch.randn(6, 2, generator=g))[0]
    dstar = torch.einsum("abxy,Aa,Bb->ABxy", torch.randn(3, 2, 3, 3, generator=g), u_out, u_in)
    dstar = 3 * dstar / dstar.norm()
    target = base.weight.detach() + dstar
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1))
    opt = TuckerOptimizer(model, lr=lr, direction=direction)
    first = None
    for _ in range(steps):
        x = torch.randn(16, 6, 8, 8, generator=g)
        loss = ((model(x) - F.conv2d(x, target, base.bias, padding=1)) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _check_invariants(opt, 1, 32)
    layer = model.base_model.model.layer
    assert layer.ranks("default") == (3, 2)
    assert loss.item() < 1e-4 * first
    assert torch.linalg.norm(layer.get_delta_weight("default") - dstar) / torch.linalg.norm(dstar) < 1e-2


def _fixed_problem(seed=0):
    """A planted rank-3 regression with one fixed batch: a smooth, deterministic quadratic loss."""
    base, dstar, g = _planted_linear(seed=seed)
    target = base.weight.detach() + dstar
    x = torch.randn(256, 48, generator=g)
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1))

    def loss_fn(m=model):
        return ((m(x) - F.linear(x, target, base.bias)) ** 2).sum(1).mean() / 2

    def dense_grad(w):  # dL/dW of the same loss at the weight w
        return (w - target) @ (x.T @ x) / x.shape[0]

    return model, loss_fn, x, dense_grad


def test_descent_for_small_steps():
    model, loss_fn, _, _ = _fixed_problem()
    opt = TuckerOptimizer(model, lr=0.05, direction="sgd", tau=0.0)
    losses = []
    for _ in range(30):
        loss = loss_fn()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_truncation_raises_the_loss_at_most_by_the_tail_bound():
    """Quadratic loss: L(W + E) - L(W) <= ||dL/dW|| ||E|| + (lambda_max / 2) ||E||^2, with the HOSVD truncation
    error ||E|| <= s sqrt(d) theta, theta = tau ||C||."""
    model, loss_fn, x, dense_grad = _fixed_problem()
    opt = TuckerOptimizer(model, lr=0.2, direction="sgd", tau=0.0)
    for _ in range(3):  # away from the zero core, with grown ranks
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    lam_max = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).max().item()
    for tau in (0.05, 0.2, 0.5):
        snapshot = copy.deepcopy(model)
        layer = snapshot.base_model.model.layer
        core, factors = layer.core("default").detach(), [u.detach() for u in layer.factors("default")]
        svds = geometry.mode_svds(core[None], 2)  # a batch of one
        theta = tau * torch.linalg.norm(core).item()
        ranks = geometry.truncation_ranks([s[0].tolist() for _, s in svds], theta, 1, 32)
        assert ranks[0] < core.shape[0]  # something is cut
        with torch.no_grad():
            before = loss_fn(snapshot).item()
            w_before = (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach()
            new_core, new_factors = geometry.truncate(
                core[None], [u[None] for u in factors], [p[:, :, :r] for (p, _), r in zip(svds, ranks)]
            )
            new_core, new_factors = new_core[0], [u[0] for u in new_factors]
            layer.set_factors("default", new_core, new_factors)
            after = loss_fn(snapshot).item()
            w_after = layer.get_base_layer().weight + layer.get_delta_weight("default")
        error = torch.linalg.norm(w_after - w_before).item()
        bound = layer.scaling["default"] * math.sqrt(2) * theta
        assert 0 < error <= bound * (1 + 1e-5)
        grad_norm = torch.linalg.norm(dense_grad(w_before)).item()
        assert after - before <= grad_norm * bound + 0.5 * lam_max * bound**2


class StaleMomentsOptimizer(TuckerOptimizer):
    """The defect we must not have: moments padded and cut by index, left in the old coordinates."""

    @staticmethod
    def _transport_moments(moments, projections, group_projections, old_ranks):
        if moments is None:
            return None
        ks = [p.shape[-1] for p in projections]
        augmented_shape = [p.shape[1] for p in projections] + list(moments[0][0].shape[1 + len(projections) :])
        out = []
        for index, pair in enumerate(moments):
            cut = []
            for value in pair:
                if index == 0:  # the core
                    padded = value.new_zeros(value.shape[0], *augmented_shape)
                    padded[(slice(None), *(slice(0, s) for s in value.shape[1:]))] = value
                    cut.append(padded[(slice(None), *(slice(0, k) for k in ks))])
                else:  # K of a group of factors
                    p = group_projections[index - 1]
                    padded = value.new_zeros(value.shape[0], value.shape[1], p.shape[1])
                    padded[:, :, : old_ranks[index - 1]] = value
                    cut.append(padded[:, :, : p.shape[2]])
            out.append(tuple(cut))
        return out


def _adam_run(cls):
    model, loss_fn, _, _ = _fixed_problem()
    opt = cls(model, lr=1e-2)
    losses, rank_changes = [], []
    for t in range(300):
        loss = loss_fn()
        losses.append(loss.item())
        before = opt.ranks()["layer"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if opt.ranks()["layer"] != before:
            rank_changes.append(t)
    return losses, rank_changes


def test_adam_moments_follow_rank_changes():
    losses, rank_changes = _adam_run(TuckerOptimizer)
    assert len(rank_changes) >= 3  # ranks really changed (8 -> ... -> 3)
    for t in rank_changes:  # no spike after a rank change
        if t + 1 < len(losses):
            assert losses[t + 1] <= 1.05 * losses[t]
    assert losses[-1] < 1e-6 * losses[0]
    stale, _ = _adam_run(StaleMomentsOptimizer)
    assert stale[-1] > 1e-2 * stale[0]  # moments in stale coordinates: training stalls


def test_nonfinite_gradient_skips_the_step_bit_identically():
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=4))
    opt = TuckerOptimizer(model, lr=1e-2)
    ids = torch.randint(0, 120, (2, 6))
    model(input_ids=ids).logits.sum().backward()
    opt.step()  # one real step so that moments exist
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "tucker_" in n}
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(input_ids=ids).logits.sum().backward()
    layers = list(opt.layers().values())
    layers[3].factors("default")[1].grad[0, 0] = float("nan")
    layers[0].core("default").grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        opt.step()
    for n, p in model.named_parameters():
        if "tucker_" in n:
            assert torch.equal(p, before[n]), n
    after = opt.state_dict()
    assert after["state"].keys() == state_before["state"].keys()
    for k, v in state_before["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(value))
    assert opt.skipped_steps == 1


def test_layer_without_gradient_is_left_alone():
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    opt = TuckerOptimizer(model, lr=1e-2)
    layers = list(opt.layers().values())
    ids = torch.randint(0, 120, (2, 6))
    model(input_ids=ids).logits.sum().backward()
    layers[1].core("default").grad = None
    for u in layers[1].factors("default"):
        u.grad = None
    untouched = [p.detach().clone() for p in [layers[1].core("default"), *layers[1].factors("default")]]
    moved = layers[0].core("default").detach().clone()
    opt.step()
    for p, q in zip([layers[1].core("default"), *layers[1].factors("default")], untouched):
        assert torch.equal(p, q)
    assert not torch.equal(layers[0].core("default"), moved)


def test_rank_at_max_rank_keeps_training():
    base, dstar, g = _planted_linear(rank=6)
    target = base.weight.detach() + dstar
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=2, max_rank=4, alpha=2, tau=0.0))
    opt = TuckerOptimizer(model, lr=0.5, direction="sgd")
    x = torch.randn(256, 48, generator=g)
    losses = []
    for _ in range(60):
        loss = ((model(x) - F.linear(x, target, base.bias)) ** 2).sum(1).mean() / 2
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.ranks()["layer"] != (2, 2)
    # the best rank-4 approximation of the rank-6 target leaves the two smallest singular values (1.4, 1.0)
    singular = torch.linspace(3.0, 1.0, 6)
    best = 0.5 * (singular[4:] ** 2).sum().item() * 1.0  # E||e x||^2 with x ~ N(0, I)
    assert losses[-1] < 1.3 * best and losses[-1] < losses[20]


def test_weight_decay_shrinks_core_only():
    model = get_peft_model(Net(nn.Linear(12, 10)), TuckerLoraConfig(target_modules=["layer"], r=3, init_weights=False))
    layer = model.base_model.model.layer
    opt = TuckerOptimizer(model, lr=0.1, direction="sgd", weight_decay=0.5, tau=0.0)
    core = layer.core("default").detach().clone()
    factors = [u.detach().clone() for u in layer.factors("default")]
    for p in [layer.core("default"), *layer.factors("default")]:
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero gradient: only the decay acts, on the core: dW scales by (1 - lr * wd), the bases span the same spaces
    new = layer.get_delta_weight("default")
    ref = (1 - 0.1 * 0.5) * (factors[0] @ core @ factors[1].T) * layer.scaling["default"]
    torch.testing.assert_close(new, ref, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_continues_exactly():
    def make():
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
        )
        return model, TuckerOptimizer(model, lr=1e-2)

    ids = torch.randint(0, 120, (4, 7), generator=torch.Generator().manual_seed(1))

    def train(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (model(input_ids=ids).logits ** 2).sum().backward()
            opt.step()

    straight, opt_straight = make()
    train(straight, opt_straight, 6)

    first, opt_first = make()
    train(first, opt_first, 3)
    adapter = {k: v.clone() for k, v in first.state_dict().items() if "tucker_" in k}
    saved = copy.deepcopy(opt_first.state_dict())
    resumed, opt_resumed = make()
    # shapes follow the ranks of the checkpoint: rebuild the factors at those ranks, then load
    for (_, a), (_, b) in zip(tucker_peft.iter_tucker_layers(first), tucker_peft.iter_tucker_layers(resumed)):
        b.set_factors("default", a.core("default").detach(), [u.detach() for u in a.factors("default")])
    resumed.load_state_dict(adapter, strict=False)
    opt_resumed.load_state_dict(saved)
    train(resumed, opt_resumed, 3)
    assert opt_resumed.ranks() == opt_straight.ranks()
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "tucker_" in n:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_optimizer_state_with_other_ranks_is_refused():
    model = get_peft_model(Net(nn.Linear(12, 10)), TuckerLoraConfig(target_modules=["layer"], r=4, init_weights=False))
    opt = TuckerOptimizer(model, lr=1e-2, tau=0.0)
    model(torch.randn(8, 12)).pow(2).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert opt.ranks()["layer"] != (2, 2)
    other = get_peft_model(Net(nn.Linear(12, 10)), TuckerLoraConfig(target_modules=["layer"], r=4))
    layer = other.base_model.model.layer
    u0, u1 = layer.factors("default")
    layer.set_factors("default", torch.zeros(2, 2), [u0[:, :2].detach(), u1[:, :2].detach()])
    with pytest.raises(ValueError, match="does not match the current ranks"):
        TuckerOptimizer(other, lr=1e-2).load_state_dict(saved)


def test_misuse_errors():
    with pytest.raises(ValueError, match="has no Tucker adapter"):
        TuckerOptimizer(Net(nn.Linear(3, 3)))
    model = get_peft_model(Net(nn.Linear(12, 10)), TuckerLoraConfig(target_modules=["layer"]))
    with pytest.raises(ValueError, match="direction"):
        TuckerOptimizer(model, direction="rmsprop")
    opt = TuckerOptimizer(model)
    with pytest.raises(RuntimeError, match="another TuckerOptimizer"):
        TuckerOptimizer(model)
    del opt
    import gc

    gc.collect()
    TuckerOptimizer(model)  # the first one is gone: allowed again


def test_parameter_split_for_the_base_optimizer():
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=4))
    tucker = {id(p) for p in tucker_peft.tucker_parameters(model)}
    others = tucker_peft.non_tucker_parameters(model)
    assert len(tucker) == 3 * 12 and others
    assert not any(id(p) in tucker for p in others)
    assert {id(p) for p in model.parameters() if p.requires_grad} == tucker | {id(p) for p in others}
    opt = TuckerOptimizer(model)
    assert opt.num_adapter_parameters() == tucker_peft.adapter_parameter_count(model)


def test_loss_does_not_change_at_init_or_with_lr_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, loss_fn, _, _ = _fixed_problem()
        opt = TuckerOptimizer(model, lr=0.0, tau=0.0)
        before = loss_fn().item()
        loss_fn().backward()
        opt.step()
        assert loss_fn().item() == pytest.approx(before, rel=1e-6)


def test_batched_update_equals_one_layer_at_a_time():
    """Layers of equal shapes are updated in one batch; the result must equal updating them one by one."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 12), nn.Linear(16, 12)

        def forward(self, x):
            return self.a(x) + 2 * self.b(x).tanh()

    torch.manual_seed(0)
    model = get_peft_model(Two(), TuckerLoraConfig(target_modules=["a", "b"], r=4, init_weights=False, tau=0.2))
    model = model.double()
    other = copy.deepcopy(model)
    x = torch.randn(32, 16, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    other(x).pow(2).sum().backward()
    TuckerOptimizer(model, lr=0.05, direction="sgd").step()  # both layers in one batch

    opt = TuckerOptimizer(other, lr=0.05, direction="sgd")
    layer_a, layer_b = opt._layers
    saved = [p.grad for p in [layer_b.core("default"), *layer_b.factors("default")]]
    for p in [layer_b.core("default"), *layer_b.factors("default")]:
        p.grad = None
    opt.step()  # layer a alone
    for p, g in zip([layer_b.core("default"), *layer_b.factors("default")], saved):
        p.grad = g
    opt.step()  # layer b alone (layer a has no gradient any more)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        if "tucker_" in n:
            assert p.shape == q.shape
            torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10)


class _Stack(nn.Module):
    """Five equally shaped linear layers, summed (their adapters get different ranks from a rank_pattern)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(24, 20) for _ in range(5))

    def forward(self, x):
        return sum((i + 1) * layer(x).tanh() for i, layer in enumerate(self.layers))


class _Mixed(nn.Module):
    """Five linear layers of four shapes (24->20, 20->24, 24->24, 24->48, 48->20): their factors have sizes 20, 24 and
    48, shared across layers and modes (the square layer's two modes have the same size)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 20), nn.Linear(20, 24), nn.Linear(24, 24)
        self.d, self.e = nn.Linear(24, 48), nn.Linear(48, 20)

    def forward(self, x):
        h = self.a(x).tanh()
        g = self.b(h).tanh() + self.c(x).tanh()
        return h + 2 * self.e(self.d(g).tanh())


@pytest.mark.parametrize("shapes", ["equal", "mixed"])
@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("basis_interval", [1, 3])
def test_layers_of_different_ranks_in_one_padded_batch_equal_one_layer_at_a_time(
    monkeypatch, init_weights, basis_interval, shapes
):
    """Issue 12: matrix layers of different ranks (of one shape, or of different shapes whose factors are grouped by
    their sizes across layers and modes) are updated as one batch zero-padded to the largest rank; over steps whose
    ranks change, the deltas, ranks and Adam moments must equal those of updating every layer in its own batch
    (fp64)."""
    from tucker_peft import optimizer as optimizer_module

    torch.manual_seed(0)
    names = ["0", "1", "2", "3", "4"] if shapes == "equal" else ["a", "b", "c", "d", "e"]
    prefix = "layers." if shapes == "equal" else ""
    ranks = {f"{prefix}{name}": r for name, r in zip(names, [1, 2, 5, 3, 5])}
    config = TuckerLoraConfig(target_modules=names, r=5, max_rank=5, rank_pattern=ranks, tau=0.1)
    config.init_weights = init_weights
    model = get_peft_model(_Stack() if shapes == "equal" else _Mixed(), config).double()
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(32, 20, generator=g, dtype=torch.float64))
        for _ in range(8)
    ]
    settings = dict(lr=3e-2, basis_interval=basis_interval)
    padded, alone = TuckerOptimizer(model, **settings), TuckerOptimizer(other, **settings)
    batches_seen = []
    real = optimizer_module._padded_batches

    def spy(members):
        parts = real(members)
        batches_seen.append(len(parts))
        return parts

    def one_by_one(members):
        return [[member] for member in members]

    for x, y in data:
        for m, opt, split in ((model, padded, spy), (other, alone, one_by_one)):
            monkeypatch.setattr(optimizer_module, "_padded_batches", split)
            m.zero_grad(set_to_none=True)
            (m(x) - y).pow(2).mean().backward()
            opt.step()
    assert batches_seen and set(batches_seen) == {1}, "the five layers must share one batch"
    seen_ranks = set()
    for la, lb in zip(padded._layers, alone._layers):
        assert la.ranks("default") == lb.ranks("default")
        seen_ranks.add(la.ranks("default"))
        torch.testing.assert_close(
            la.get_delta_weight("default"), lb.get_delta_weight("default"), atol=1e-10, rtol=1e-8
        )
        for pa, pb in zip([la.core("default"), *la.factors("default")], [lb.core("default"), *lb.factors("default")]):
            sa, sb = padded.state[pa], alone.state[pb]
            assert sa.keys() == sb.keys()
            if pa.dim() == 2 and pa is not la.core("default"):  # a factor: columns may differ by their sign
                signs = torch.sign((pa * pb).sum(0))
                torch.testing.assert_close(pa * signs, pb, atol=1e-10, rtol=1e-8)
                torch.testing.assert_close(sa["exp_avg"] * signs, sb["exp_avg"], atol=1e-10, rtol=1e-8)
                torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-10, rtol=1e-8)
    assert len(seen_ranks) >= 2, seen_ranks  # the batch really held layers of different ranks


def test_a_step_costs_the_same_ops_for_more_equally_shaped_layers():
    """Issue 12: the update's top-level op count (the launch proxy) does not grow with the number of layers of equal
    shapes and ranks (6 vs 24 BERT layers, 36 vs 144 adapters): they share batched ops and one in-place write-back."""
    counts = {}
    for layers in (6, 24):
        model = get_peft_model(
            _bert(0, vocab_size=60, num_hidden_layers=layers),
            TuckerLoraConfig(task_type="SEQ_CLS", r=4, min_rank=4, max_rank=4, target_modules=BERT_TARGETS),
        )
        update = TuckerOptimizer(model, lr=1e-2)
        batch = {k: torch.stack([r[k] for r in token_task(8)]) for k in ("input_ids", "attention_mask", "labels")}

        def step(model=model, update=update, batch=batch):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            return count_top_level_ops(update.step)

        first = step()  # allocates the moments: a layer's own tensors
        counts[layers] = [step() for _ in range(2)]
        assert len(set(counts[layers])) == 1 and first > counts[layers][0]
        assert {r for v in update.ranks().values() for r in v} == {4}
    assert counts[24] == counts[6], counts


def test_a_step_costs_the_same_ops_for_more_layers_of_spread_ranks():
    """Issue 12: with the ranks spread over 1..4 within every shape class (q/k/v/o, intermediate, output), the update's
    top-level op count is the same for 6 and 24 BERT layers (36 vs 144 adapters), and at most 1.5x the count with
    all ranks equal (all linear layers of any shapes and ranks share one padded batch, stacked and cut back in a
    few ops per distinct rank; one batch per (shape, rank) took 4x)."""
    names = ["attention.self.query", "attention.self.key", "attention.self.value"]
    names += ["attention.output.dense", "intermediate.dense", "output.dense"]
    counts = {}
    for layers, spread in ((6, 1), (6, 4), (24, 4)):
        pattern = {f"layer.{i}.{name}": 4 - (i + j) % spread for i in range(layers) for j, name in enumerate(names)}
        config = TuckerLoraConfig(
            task_type="SEQ_CLS", r=4, max_rank=4, rank_pattern=pattern, target_modules=BERT_TARGETS
        )
        model = get_peft_model(_bert(0, vocab_size=60, num_hidden_layers=layers), config)
        update = TuckerOptimizer(model, lr=1e-2, rank_warmup=100)  # ranks held at the pattern's
        batch = {k: torch.stack([r[k] for r in token_task(8)]) for k in ("input_ids", "attention_mask", "labels")}

        def step(model=model, update=update, batch=batch):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            return count_top_level_ops(update.step)

        batches = []
        augment = update._augment
        update._augment = lambda members, augment=augment, batches=batches: (
            batches.append(len(members)) or augment(members)
        )
        step()  # allocates the moments: a layer's own tensors
        step()  # builds the padded stacking's indices for moments (cached)
        counts[layers, spread] = [step() for _ in range(2)]
        assert batches == [6 * layers] * 4, batches  # every adapted layer in one batch, every step
        assert len(set(counts[layers, spread])) == 1
        per_shape = {}
        for group in update.param_groups:
            _, *factors = group["params"]
            per_shape.setdefault(tuple(u.shape[0] for u in factors), set()).add(factors[0].shape[1])
        assert len(per_shape) == 3 and all(len(r) == spread for r in per_shape.values()), per_shape
    assert counts[24, 4] == counts[6, 4], counts
    assert counts[6, 4][0] <= 1.5 * counts[6, 1][0], counts


@pytest.mark.parametrize(
    "sizes, ranks",
    [
        # five layers, factor sizes shared across layers and modes (as _Mixed), ranks out of order
        ([(20, 24), (24, 20), (24, 24), (48, 24), (20, 48)], [(3, 3), (1, 1), (5, 5), (2, 2), (3, 3)]),
        # one shape: each group is one mode, its slots a permutation of the layers (no longer a slice)
        ([(20, 24)] * 4, [(1, 1), (3, 3), (2, 2), (5, 5)]),
    ],
)
def test_padded_stacking_and_corner_cuts_round_trip_for_unsorted_ranks(sizes, ranks):
    """The stacking of a padded batch (per run of equal ranks, slots sorted by rank within each group of factors) and
    the cut back to each layer's corner are exact inverses: every real entry lands in its layer's corner, the padding
    is exactly zero, and the groups' order converts to the mode-major order and back (known answer, no update)."""
    from tucker_peft.optimizer import _cut_corners, _Groups

    g = torch.Generator().manual_seed(0)
    groups = _Groups(sizes, ranks, torch.zeros(1, 1))  # like a matrix core: factors grouped by size
    assert groups.padding is not None and groups.padding.width == 5
    for slots, padding in zip(groups.slots, groups.paddings):
        own = [ranks[b][i] for b, i in slots]
        assert own == sorted(own) and padding.ranks == own  # sorted by rank: one strided copy per run
        assert len(padding.runs) == len(set(own))
        lists = [[torch.randn(sizes[b][i], ranks[b][i], generator=g) for b, i in slots] for _ in range(3)]
        stacked = padding.factors(lists)
        for t, batch in enumerate(stacked):
            for j, r in enumerate(own):
                assert torch.equal(batch[j, :, :r], lists[t][j])
                assert not batch[j, :, r:].any()
        cut = _cut_corners(stacked, [(batch.shape[1], r) for r in own])
        assert all(torch.equal(c, x) for t in range(3) for c, x in zip(cut[t], lists[t]))
    cores = [[torch.randn(r[0], r[1], generator=g) for r in ranks] for _ in range(2)]
    stacked = groups.padding.cores(cores)
    for t, batch in enumerate(stacked):
        for b, (r, _) in enumerate(ranks):
            assert torch.equal(batch[b, :r, :r], cores[t][b])
            assert not batch[b, r:].any() and not batch[b, :, r:].any()
    cut = _cut_corners(stacked, ranks)
    assert all(torch.equal(c, x) for t in range(2) for c, x in zip(cut[t], cores[t]))
    # per-mode tensors (mode-major: slot (b, i) at i * B + b) -> per group -> per mode
    per_mode = torch.arange(2 * len(sizes), dtype=torch.float32)[:, None, None].expand(-1, 5, 5)
    picked = [groups.pick(per_mode, k) for k in range(len(groups.slots))]
    for slots, values in zip(groups.slots, picked):
        assert values[:, 0, 0].tolist() == [i * len(sizes) + b for b, i in slots]
    assert torch.equal(torch.stack(groups.to_modes(picked)), per_mode.reshape(2, len(sizes), 5, 5))
