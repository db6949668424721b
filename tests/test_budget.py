"""A global parameter budget (``TuckerLoraConfig(budget=...)``): ranks decided across layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

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


def _train(budget, steps=300, tau=0.0):
    torch.manual_seed(0)
    base = TwoLayers().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    targets = [base.big.weight + _planted(3, g), base.small.weight + _planted(1, g)]
    model = get_peft_model(
        base, TuckerLoraConfig(r=6, alpha=6, tau=tau, target_modules=["big", "small"], budget=budget)
    )
    tucker = TuckerOptimizer(model, lr=5e-3)
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
