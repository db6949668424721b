"""Step dynamics and rank decisions at the settings people fine-tune with (warmup, LoRA's learning rates)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer

import tucker_peft
from tucker_peft import TuckerLoraCallback, TuckerLoraConfig, TuckerOptimizer

from .conftest import Net, Regression, tiny_bert, trainer_args


def _bert_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def test_warmup_first_step_with_lr_zero_keeps_the_ranks():
    """Step 1 of a linear warmup has lr = 0: the augmented core is zero and says nothing about ranks."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=8))
    before = tucker_peft.current_ranks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    tucker = tucker_peft.attach(opt, model)
    model(**_bert_batch()).loss.backward()
    opt.step()
    assert set(tucker.ranks().values()) == {(8, 8)}
    assert tucker_peft.current_ranks(model) == before
    # the next step with a real learning rate decides the ranks on signal
    for group in opt.param_groups:
        group["lr"] = 1e-3
    opt.zero_grad()
    model(**_bert_batch(1)).loss.backward()
    opt.step()
    assert set(tucker.ranks().values()) != {(8, 8)}


def test_zero_gradient_step_keeps_ranks_and_factors():
    torch.manual_seed(0)
    model = get_peft_model(Net(nn.Linear(16, 12)), TuckerLoraConfig(target_modules=["layer"], r=6))
    layer = model.base_model.model.layer
    factors = [u.detach().clone() for u in layer.factors("default")]
    opt = TuckerOptimizer(model, lr=1e-2)
    (0.0 * model(torch.randn(4, 16)).sum()).backward()
    opt.step()
    assert layer.ranks("default") == (6, 6)
    for u, before in zip(layer.factors("default"), factors):
        torch.testing.assert_close(u, before, atol=1e-6, rtol=0)


def _planted(n_out=40, n_in=48, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    for p in base.parameters():
        p.requires_grad_(False)
    u = torch.linalg.qr(torch.randn(n_out, 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n_in, 3, generator=g))[0]
    dstar = u @ torch.diag(torch.tensor([1.0, 0.8, 0.6])) @ v.T
    x = torch.randn(n, n_in, generator=g)
    return base, dstar, x, F.linear(x, base.weight + dstar, base.bias)


def _relative_error(layer, dstar):
    return ((layer.get_delta_weight("default") - dstar).norm() / dstar.norm()).item()


def test_truncated_rank_grows_back():
    """From rank 1 the planted rank 3 needs two more directions per mode; they must get in, with the default rank
    decisions and with candidate directions held between decisions (``rank_headroom=2, rank_interval=10``)."""
    base, dstar, x, y = _planted()

    def train(**kwargs):
        torch.manual_seed(0)
        model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=1, alpha=1, max_rank=8))
        layer = model.base_model.model.layer
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        tucker_peft.attach(opt, model, **kwargs)
        seen = []
        for step in range(300):
            idx = torch.arange(64 * step, 64 * step + 64) % len(x)
            (0.5 * ((model(x[idx]) - y[idx]) ** 2).sum(1).mean()).backward()
            opt.step()
            opt.zero_grad()
            seen.append(layer.ranks("default"))
        return layer, seen

    layer, seen = train()
    assert seen[0] == (1, 1) and layer.ranks("default") == (3, 3)
    assert _relative_error(layer, dstar) < 1e-2
    layer, seen = train(rank_headroom=2, rank_interval=10)
    assert layer.ranks("default") == (3, 3)
    assert _relative_error(layer, dstar) < 0.05  # constant lr 5e-3: the candidates' noise floor


def test_conv_channel_ranks_grow_back_with_headroom():
    """A Conv2d from channel ranks (1, 1) to the planted (3, 2): growth needs candidate directions that can
    accumulate signal between rank decisions (``rank_headroom=2, rank_interval=10``)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Conv2d(16, 24, 3, padding=1).requires_grad_(False)
    u_out = torch.linalg.qr(torch.randn(24, 3, generator=g))[0]
    u_in = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    dstar = torch.einsum("abxy,Aa,Bb->ABxy", torch.randn(3, 2, 3, 3, generator=g), u_out, u_in)
    dstar = 2**0.5 * dstar / dstar.norm()
    x = torch.randn(1024, 16, 6, 6, generator=g)
    y = F.conv2d(x, base.weight + dstar, base.bias, padding=1)

    def train(**kwargs):
        torch.manual_seed(0)
        model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=1, alpha=1, max_rank=8))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        tucker_peft.attach(opt, model, **kwargs)
        for step in range(250):
            idx = torch.arange(32 * step, 32 * step + 32) % len(x)
            (0.5 * ((model(x[idx]) - y[idx]) ** 2).flatten(1).sum(1).mean()).backward()
            opt.step()
            opt.zero_grad()
        return model.base_model.model.layer

    layer = train(rank_headroom=2, rank_interval=10)
    assert layer.ranks("default") == (3, 2)
    assert _relative_error(layer, dstar) < 0.05
    # negative control: deciding on every step's increment alone keeps the conv at rank 1
    assert train().ranks("default") == (1, 1)


@pytest.mark.parametrize("basis_interval", [1, 4])
def test_trainer_planted_rank_at_lora_learning_rate_with_warmup(tmp_path, basis_interval):
    """The issue's setting: lr 1e-3, warmup 10 + linear decay, 600 steps, batch 64, through the Trainer; tucker
    (r = 8, tau = 0.1) against LoRA r = 8 + AdamW in the same test; also with the bases moved every 4 steps."""
    base, dstar, x, y = _planted()
    data = [{"x": a, "y": b} for a, b in zip(x, y)]

    def train(method):
        torch.manual_seed(0)
        if method == "tucker":
            config, callbacks = (
                TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1),
                [TuckerLoraCallback(basis_interval=basis_interval)],
            )
        else:
            config, callbacks = LoraConfig(target_modules=["layer"], r=8, lora_alpha=8), []
        model = get_peft_model(Regression(base), config)
        args = trainer_args(
            tmp_path / method,
            per_device_train_batch_size=64,
            learning_rate=1e-3,
            lr_scheduler_type="linear",
            warmup_steps=10,
            max_steps=600,
            logging_steps=100,
        )
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        return model.base_model.model.layer

    tucker, lora = train("tucker"), train("lora")
    tucker_error, lora_error = _relative_error(tucker, dstar), _relative_error(lora, dstar)
    assert tucker.ranks("default") == (3, 3)
    print(f"relative error: tucker {tucker_error:.2e}, LoRA {lora_error:.2e}")
    assert tucker_error <= 2 * lora_error, (tucker_error, lora_error)
    assert lora_error < 0.05  # the comparison is meaningful: LoRA learned the target


def test_bases_keep_converging_when_the_steps_get_small():
    """Near convergence Adam's basis steps get small (its second moment remembers the early gradients); they must
    still move the bases. Planted rank 3, constant lr 2e-3, 600 steps: the fit reaches 1.6e-7 relative error (LoRA
    r = 8 here: 4.8e-7). With the new directions judged against ``||K'||`` instead of the step's own norm, the bases
    froze at 1.8e-5 while the core went on; with the step computed in float32 (the factors' dtype) its round-off
    held the fit at 1.7e-6 and moved a converged delta by 2.4e-6 per 100 steps at a negligible learning rate."""
    base, dstar, x, y = _planted()
    torch.manual_seed(0)
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8, tau=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    tucker = tucker_peft.attach(opt, model)
    layer = model.base_model.model.layer

    def train(steps):
        for step in range(steps):
            idx = torch.arange(64 * step, 64 * step + 64) % len(x)
            (0.5 * ((model(x[idx]) - y[idx]) ** 2).sum(1).mean()).backward()
            opt.step()
            opt.zero_grad()

    train(600)
    assert layer.ranks("default") == (3, 3)
    out_basis, in_basis = (u.detach() for u in layer.factors("default"))
    error = layer.get_delta_weight("default") - dstar
    misaligned = error - out_basis @ (out_basis.T @ error @ in_basis) @ in_basis.T
    converged = layer.get_delta_weight("default").detach().clone()
    for group in opt.param_groups:
        group["lr"] = 1e-12
    train(100)
    drift = (layer.get_delta_weight("default") - converged).norm() / dstar.norm()
    print(
        f"relative error {_relative_error(layer, dstar):.2e}, outside the bases {misaligned.norm() / dstar.norm():.2e}, "
        f"drift at lr 1e-12 {drift:.2e}"
    )
    assert (error.norm() / dstar.norm()) < 5e-7
    assert misaligned.norm() / dstar.norm() < 5e-7
    assert drift < 2e-7
    # the step computes in float64 (on the CPU); parameters and moments stay in their float32
    stored = [p for p in tucker.param_groups for p in p["params"]]
    assert {p.dtype for p in stored} == {torch.float32}
    assert {t.dtype for p in stored for t in tucker.state[p].values() if torch.is_tensor(t)} == {torch.float32}


def test_rank_decisions_follow_the_schedule():
    """Before ``rank_warmup`` steps and between decisions (every ``rank_interval`` steps) the ranks are held."""
    base, dstar, x, y = _planted()
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8))
    layer = model.base_model.model.layer
    opt = TuckerOptimizer(model, lr=1e-2, rank_warmup=20, rank_interval=10)
    ranks = []
    for step in range(60):
        idx = torch.arange(64 * step, 64 * step + 64)
        (0.5 * ((model(x[idx]) - y[idx]) ** 2).sum(1).mean()).backward()
        opt.step()
        opt.zero_grad()
        ranks.append(layer.ranks("default"))
    assert set(ranks[:29]) == {(8, 8)}  # warmup, then the first decision at step 30
    changes = [i + 1 for i in range(1, 60) if ranks[i] != ranks[i - 1]]
    assert changes and all(step % 10 == 0 for step in changes)
    assert ranks[-1] == (3, 3)


def test_rank_schedule_arguments_are_checked():
    model = get_peft_model(Net(nn.Linear(8, 8)), TuckerLoraConfig(target_modules=["layer"], r=2))
    for kwargs in (
        {"rank_interval": 0},
        {"rank_warmup": -1},
        {"rank_headroom": 0},
        {"rank_interval": 1.5},
        {"basis_interval": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TuckerOptimizer(model, **kwargs)


def test_state_dict_of_an_older_version_still_loads():
    """Saved by an older version: groups without the rank-schedule settings, every moment in the core's entry
    (``exp_avg_core``, ``exp_avg_K0``, ...). Loading fills in the settings and moves the moments to torch's layout."""
    base, dstar, x, y = _planted()
    model = get_peft_model(Net(base), TuckerLoraConfig(target_modules=["layer"], r=8, alpha=8))
    opt = TuckerOptimizer(model, lr=1e-3)
    (0.5 * ((model(x[:64]) - y[:64]) ** 2).sum(1).mean()).backward()
    opt.step()
    current = copy.deepcopy(opt.state_dict())
    state = copy.deepcopy(current)
    for group in state["param_groups"]:
        for key in ("rank_warmup", "rank_interval", "rank_headroom", "basis_interval", "reference_size"):
            del group[key]
        core, *factors = group["params"]
        old = {"step": state["state"][core]["step"]}
        for name, index in [("core", core), *((f"K{i}", f) for i, f in enumerate(factors))]:
            moments = state["state"].pop(index)
            old[f"exp_avg_{name}"], old[f"exp_avg_sq_{name}"] = moments["exp_avg"], moments["exp_avg_sq"]
        state["state"][core] = old
    del opt
    gc.collect()
    fresh = TuckerOptimizer(model, lr=1e-3)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["reference_size"] == 8 * (40 + 48)
    loaded = fresh.state_dict()["state"]
    for index, moments in current["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[index][key], moments[key])
    fresh.zero_grad()
    (0.5 * ((model(x[64:128]) - y[64:128]) ** 2).sum(1).mean()).backward()
    fresh.step()  # runs with the filled-in settings
