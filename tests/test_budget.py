"""A global parameter budget (``TuckerLoraConfig(budget=...)``): ranks decided across layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import tucker_peft
from tucker_peft import TuckerLoraConfig, TuckerOptimizer

N_IN, N_OUT = 24, 20


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(N_IN, N_OUT)  # its target delta has rank 3
        self.small = nn.Linear(N_IN, N_OUT)  # rank 1

    def forward(self, x):
        return torch.cat([self.big(x), self.small(x)], dim=-1)


def _planted(rank, g):
    u = torch.linalg.qr(torch.randn(N_OUT, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(N_IN, rank, generator=g))[0]
    return u @ torch.diag(torch.tensor([1.0, 0.8, 0.6][:rank])) @ v.T


def _train(budget, steps=300, tau=0.0, total_steps=None, **config):
    """Fit both planted deltas; the adapter size after every step."""
    torch.manual_seed(0)
    base = TwoLayers().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    targets = [base.big.weight + _planted(3, g), base.small.weight + _planted(1, g)]
    model = get_peft_model(
        base, TuckerLoraConfig(r=6, alpha=6, tau=tau, target_modules=["big", "small"], budget=budget, **config)
    )
    tucker = TuckerOptimizer(model, lr=5e-3, total_steps=total_steps)
    sizes = []
    for _ in range(steps):
        x = torch.randn(64, N_IN, generator=g)
        y = torch.cat([x @ targets[0].T + base.big.bias, x @ targets[1].T + base.small.bias], dim=-1)
        loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean()
        loss.backward()
        tucker.step()
        tucker.zero_grad()
        sizes.append(tucker.num_adapter_parameters())
    return tucker, sizes, loss.item()


def test_budget_goes_to_the_layer_that_needs_rank():
    """tau = 0 keeps every direction; a budget of exactly the planted ranks' size must find them across layers."""
    size = lambda r: r * r + r * (N_IN + N_OUT)  # noqa: E731
    budget = size(3) + size(1)
    free, free_sizes, _ = _train(None)
    assert free_sizes[-1] > budget  # negative control: with tau = 0 nothing is truncated
    tucker, sizes, loss = _train(budget)
    assert max(sizes) <= budget  # at every step, not only at the end
    assert tucker.ranks() == {"big": (3, 3), "small": (1, 1)}
    assert loss < 1e-2


def test_budget_below_the_smallest_adapter_is_refused():
    model = get_peft_model(TwoLayers(), TuckerLoraConfig(r=4, target_modules=["big", "small"], budget=10))
    with pytest.raises(ValueError, match=r"`budget` must be an integer >= 90"):
        TuckerOptimizer(model)
    with pytest.raises(ValueError, match="budget"):
        TuckerLoraConfig(budget=-3)


def test_budget_schedule_trains_at_full_size_then_shrinks_to_the_planted_ranks():
    """budget_schedule [0.2, 0.6] of 300 steps: the initial size (tau = 0, max_rank = r: nothing truncated or grown)
    up to step 60, every step within the cubic limit after it, the budget from step 180 on, the planted ranks at the
    end."""
    size = lambda r: r * r + r * (N_IN + N_OUT)  # noqa: E731
    budget, initial = size(3) + size(1), 2 * size(6)
    tucker, sizes, loss = _train(budget, total_steps=300, max_rank=6, budget_schedule=[0.2, 0.6])
    assert tucker.initial_size == initial
    # the schedule itself: none up to start, AdaLoRA's cubic from the initial size, then the budget
    assert [tucker.current_budget(s) for s in (1, 60)] == [None, None]
    assert tucker.current_budget(120) == budget + int((initial - budget) * 0.5**3)
    assert [tucker.current_budget(s) for s in (180, 300)] == [budget, budget]
    for step, size_after in enumerate(sizes, start=1):
        limit = tucker.current_budget(step)
        assert size_after == initial if limit is None else size_after <= limit
    assert sizes[119] > budget  # still shrinking in the middle of the schedule
    assert tucker.ranks() == {"big": (3, 3), "small": (1, 1)}
    assert loss < 1e-2


def test_budget_schedule_needs_a_budget_fractions_and_the_number_of_steps():
    with pytest.raises(ValueError, match="set budget="):
        TuckerLoraConfig(budget_schedule=[0.2, 0.8])
    for bad in ([0.8, 0.2], [0.2], [0.2, 1.5], "0.2,0.8"):
        with pytest.raises(ValueError, match=r"`budget_schedule` must be \[start, end\]"):
            TuckerLoraConfig(budget=1000, budget_schedule=bad)
    config = TuckerLoraConfig(r=4, target_modules=["big", "small"], budget=1000, budget_schedule=[0.2, 0.8])
    model = get_peft_model(TwoLayers(), config)
    with pytest.raises(ValueError, match="pass total_steps="):
        TuckerOptimizer(model)
    # a plain loop with attach(): the same error before any step, and the fix works
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="pass total_steps="):
        tucker_peft.attach(optimizer, model)
    assert tucker_peft.attach(optimizer, model, total_steps=50).total_steps == 50


def test_budget_schedule_through_the_trainer_takes_its_number_of_steps(tmp_path):
    """TuckerLoraCallback passes the Trainer's max_steps: the budget is reached at end * max_steps (here step 30 of 40,
    with epochs of 10 steps: not the length of one epoch), the adapter kept full size before start * max_steps."""
    from transformers import Trainer

    from tucker_peft import TuckerLoraCallback

    from .conftest import Regression
    from .conftest import trainer_args as _args

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT)
    target = base.weight.detach() + _planted(3, g)
    xs = torch.randn(160, N_IN, generator=g)
    data = [{"x": x, "y": torch.nn.functional.linear(x, target, base.bias).detach()} for x in xs]
    size = lambda r: r * r + r * (N_IN + N_OUT)  # noqa: E731
    config = TuckerLoraConfig(
        target_modules=["layer"], r=6, max_rank=6, alpha=6, tau=0.0, budget=size(2), budget_schedule=[0.25, 0.75]
    )
    model = get_peft_model(Regression(base), config)
    callback = TuckerLoraCallback()
    trainer = Trainer(model=model, args=_args(tmp_path, learning_rate=1e-2), train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.tucker.total_steps == trainer.state.max_steps == 40
    params = [h["tucker_params"] for h in callback.history]  # per optimizer step, from step 0
    assert params[:11] == [size(6)] * 11  # full size through step 10 = 0.25 * 40
    assert all(params[s] <= callback.tucker.current_budget(s) for s in range(11, 41))
    assert size(2) < params[15] < size(6) and params[30:] == [size(2)] * 11  # shrinking, then at the budget


def test_budget_counts_the_dense_window_of_conv_cores():
    """Conv adapters keep the kernel window dense in the core (``r_out x r_in x 3 x 3``): the budget's greedy drop
    must count it, so the adapter ends within one dropped rank below the budget (counting the core as ``r_out x r_in``
    alone would stop far above it, counting the factors alone far below)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)).requires_grad_(False)
    model = get_peft_model(base, TuckerLoraConfig(r=4, alpha=4, tau=0.0, target_modules=["0", "1"], budget=300))
    tucker = TuckerOptimizer(model, lr=5e-3)
    assert tucker.num_adapter_parameters() == 2 * (4 * 4 * 9 + 4 * 8 + 4 * 6)  # 400: above the budget at the start
    g = torch.Generator().manual_seed(2)
    target = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1))
    largest_drop = 4 * 9 + 8  # one rank of a mode: a core slice r x 3 x 3 and a factor column
    for _ in range(5):
        x = torch.randn(4, 6, 5, 5, generator=g)
        with torch.no_grad():
            y = target(x)
        ((model(x) - y) ** 2).mean().backward()
        tucker.step()
        tucker.zero_grad()
        size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert size == tucker.num_adapter_parameters()
        assert 300 - largest_drop < size <= 300
