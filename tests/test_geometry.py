"""One geometric step against independent dense references (docs/algorithm.md §7, properties 1, 3, 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from tucker_peft import TuckerLoraConfig, TuckerOptimizer, geometry
from tucker_peft.geometry import tangent_projection

from .conftest import Net


def _einsum_tucker(core, factors):
    """Independent dense reconstruction: factors on the leading modes, remaining core modes dense."""
    letters = "abcde"[: core.dim()]
    spec = letters + "," + ",".join(f"{c.upper()}{c}" for c in letters[: len(factors)])
    out = "".join(c.upper() if i < len(factors) else c for i, c in enumerate(letters))
    return torch.einsum(f"{spec}->{out}", core, *factors)


def _dense_hosvd(y, n_factors, tau, min_rank=1, max_rank=10**6):
    """Truncated HOSVD of a dense tensor over its first ``n_factors`` modes, ranks by the relative tail rule.

    Singular values below 1e-9 ||y|| count as zero (fp64 round-off of an exactly low-rank tensor)."""
    theta = max(tau, 1e-9) * torch.linalg.norm(y)
    projections, ranks = [], []
    for i in range(n_factors):
        mat = torch.movedim(y, i, 0).reshape(y.shape[i], -1)
        p, s, _ = torch.linalg.svd(mat, full_matrices=False)
        tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]))  # tails[r] = ||s[r:]||
        r = next((j for j in range(len(s)) if tails[j] <= theta), len(s))
        r = min(max(r, min_rank), max_rank)
        projections.append(p[:, :r] @ p[:, :r].T)
        ranks.append(r)
    out = y
    for i, proj in enumerate(projections):
        out = torch.movedim(torch.tensordot(proj, out, dims=([1], [i])), 0, i)
    return out, ranks


def _layer_case(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(11, 9), torch.randn(6, 11), "channels"
    if kind == "conv_channels":
        return nn.Conv2d(5, 7, 3, padding=1, stride=2), torch.randn(2, 5, 6, 6), "channels"
    return nn.Conv2d(5, 7, 3, padding=1, stride=2), torch.randn(2, 5, 6, 6), "full"  # 4-way Tucker


def _setup(kind, r=3, tau=0.0, max_rank=32):
    base, x, conv_mode = _layer_case(kind)
    model = get_peft_model(
        Net(base), TuckerLoraConfig(target_modules=["layer"], r=r, alpha=1.5 * r, tau=tau, conv_mode=conv_mode)
    ).double()
    layer = model.base_model.model.layer
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a generic full-rank core, so that every Mat_i(C) has full row rank
        layer.core("default").copy_(torch.randn(layer.core("default").shape, generator=g, dtype=torch.float64))
        for u in layer.factors("default"):  # orthonormal to fp64 precision (they were created in fp32)
            u.copy_(torch.linalg.qr(u)[0])
    x = x.double()
    target = torch.randn_like(model(x), dtype=torch.float64)
    return model, layer, x, target, max_rank


def _dense_gradient(layer, x, target):
    """``G = dL/d(dW)`` with the delta as one dense tensor (no factors involved)."""
    base = layer.get_base_layer()
    core = layer.core("default").detach()
    factors = [u.detach() for u in layer.factors("default")]
    dw = _einsum_tucker(core, factors).requires_grad_(True)
    s = layer.scaling["default"]
    if isinstance(base, nn.Linear):
        y = F.linear(x, base.weight + s * dw, base.bias)
    else:
        y = F.conv2d(x, base.weight + s * dw, base.bias, base.stride, base.padding, base.dilation)
    loss = 0.5 * ((y - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, dw)
    return dw.detach(), grad


@pytest.mark.parametrize("kind", ["linear", "conv_channels", "conv_full"])
@pytest.mark.parametrize("tau", [0.0, 0.15])
def test_one_plain_step_equals_dense_reference(kind, tau):
    model, layer, x, target, max_rank = _setup(kind, tau=tau)
    n_factors = len(layer.factors("default"))
    dw, grad = _dense_gradient(layer, x, target)
    lam = 0.05
    core = layer.core("default").detach().clone()
    factors = [u.detach().clone() for u in layer.factors("default")]
    augmented = dw - lam * tangent_projection(grad, core, factors)
    reference, ref_ranks = _dense_hosvd(augmented, n_factors, tau)

    opt = TuckerOptimizer(model, lr=lam, direction="sgd", max_rank=max_rank)
    loss = 0.5 * ((model(x) - target) ** 2).sum()
    loss.backward()
    opt.step()

    new = _einsum_tucker(layer.core("default").detach(), [u.detach() for u in layer.factors("default")])
    assert list(layer.ranks("default")) == ref_ranks
    torch.testing.assert_close(new, reference, atol=1e-10, rtol=1e-10)
    if tau == 0.0:  # nothing truncated: the step is exactly dW - lam P_T(G), with grown ranks
        torch.testing.assert_close(new, augmented, atol=1e-10, rtol=1e-10)
        assert all(r > 3 for r in layer.ranks("default")[:2])
    else:
        assert any(r < 6 for r in ref_ranks)  # something was truncated
        err = torch.linalg.norm(new - augmented)
        assert 0 < err <= math.sqrt(n_factors) * tau * torch.linalg.norm(augmented)
    for u in layer.factors("default"):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12, rtol=0)


def test_tangent_projection_is_a_projection():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    factors = [
        torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
        for n, r in [(6, 3), (5, 2), (4, 2), (4, 2)]
    ]
    grad = torch.randn(6, 5, 4, 4, generator=g, dtype=torch.float64)
    once = tangent_projection(grad, core, factors)
    torch.testing.assert_close(tangent_projection(once, core, factors), once)
    # the normal part is orthogonal to the tangent space
    assert abs(torch.sum((grad - once) * once)) < 1e-10
    # a tangent vector built from the parametrization is left as it is
    dcore = torch.randn_like(core)
    du = torch.randn(6, 3, generator=g, dtype=torch.float64)
    du = du - factors[0] @ (factors[0].T @ du)
    tangent = _einsum_tucker(dcore, factors) + _einsum_tucker(core, [du, *factors[1:]])
    torch.testing.assert_close(tangent_projection(tangent, core, factors), tangent)


def test_first_step_from_zero_core_moves_only_the_core():
    torch.manual_seed(0)
    model = get_peft_model(Net(nn.Linear(12, 10)), TuckerLoraConfig(target_modules=["layer"], r=4, tau=0.0)).double()
    layer = model.base_model.model.layer
    with torch.no_grad():
        for u in layer.factors("default"):
            u.copy_(torch.linalg.qr(u)[0])
    u_before = [u.detach().clone() for u in layer.factors("default")]
    x = torch.randn(8, 12, dtype=torch.float64)
    opt = TuckerOptimizer(model, lr=0.1, direction="sgd")
    loss = (model(x) ** 2).sum() + model(x).sum()
    loss.backward()
    g_core = layer.core("default").grad.clone()
    opt.step()
    assert torch.isfinite(layer.core("default")).all()
    # the new delta lies in the old subspaces: U_i^new spans a subset of span(U_i^old)
    for u_old, u_new in zip(u_before, layer.factors("default")):
        torch.testing.assert_close(u_old @ (u_old.T @ u_new), u_new.detach(), atol=1e-12, rtol=0)
    assert layer.ranks("default") == (4, 4)
    new = _einsum_tucker(layer.core("default").detach(), [u.detach() for u in layer.factors("default")])
    torch.testing.assert_close(new, _einsum_tucker(-0.1 * g_core, u_before), atol=1e-12, rtol=0)


def test_the_step_computes_in_float64_where_the_device_has_it():
    """``work_dtype``: float64 on CPU and CUDA whatever the factors' floating dtype; elsewhere (MPS has no float64)
    the factors' own dtype."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert geometry.work_dtype(dtype, torch.device("cpu")) == torch.float64
        assert geometry.work_dtype(dtype, torch.device("cuda", 0)) == torch.float64
        assert geometry.work_dtype(dtype, torch.device("mps")) == dtype


def test_small_basis_steps_are_kept_and_in_span_steps_are_round_off():
    """``new_directions`` drops a direction as round-off relative to the step's own norm, not to ``||K'||``: a
    basis step 1e-8 the size of ``K'`` (a nearly converged fit, or the end of a linear decay) still gets its exact
    block, while a step inside ``span(U)`` gives none (its normal part is pure round-off)."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(1, 40, 3, generator=g))[0]
    q = torch.linalg.qr(torch.randn(1, 5, 3, generator=g))[0]  # Q of the core's unfolding, (B, m, r)
    rel_eps = 10 * torch.finfo(torch.float32).eps
    normal = torch.randn(1, 40, 3, generator=g)
    normal = normal - u @ (u.transpose(-1, -2) @ normal)
    step = 1e-8 * normal / normal.norm()  # ||K'|| ~ 1 (R ~ diag(1, 0.8, 0.6)): 10 eps ||K'|| is 100x this step
    ut, block = geometry.new_directions(u, step, step.flatten(1).norm(dim=1), q, rel_eps)
    torch.testing.assert_close(ut.transpose(-1, -2) @ ut, torch.eye(6)[None], atol=1e-6, rtol=0)
    reference = (step - u @ (u.transpose(-1, -2) @ step)).double() @ q.double().transpose(-1, -2)
    error = (ut[..., 3:].double() @ block.double() - reference).norm() / reference.norm()
    assert error < 1e-4, error
    # negative control: judged against ||K'|| (~1.3 here) the same step counts as round-off and is dropped
    k_norm = (u @ torch.diag(torch.tensor([1.0, 0.8, 0.6])) + step).flatten(1).norm(dim=1)
    assert geometry.new_directions(u, step, k_norm, q, rel_eps)[1].abs().max() == 0
    inside = 1e-2 * u @ torch.randn(1, 3, 3, generator=g)
    _, block = geometry.new_directions(u, inside, inside.flatten(1).norm(dim=1), q, rel_eps)
    assert block.abs().max() == 0
