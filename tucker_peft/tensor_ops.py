"""Tensor algebra for Tucker tensors (names as in TensorLy), with no knowledge of ``nn.Module`` or PEFT.

Notation (``docs/algorithm.md`` §1): a Tucker tensor is ``dW = C x_0 U_0 x_1 U_1 ... x_{d-1} U_{d-1}`` with a core
``C`` of shape ``(r_0, ..., r_{d-1}, *rest)`` and factors ``U_i`` of shape ``(n_i, r_i)``.  Factors act on the leading
modes of the core; trailing modes without a factor (e.g. a dense convolution window) are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "batched_fold",
    "batched_mode_dot",
    "batched_unfold",
    "fold",
    "mode_dot",
    "multi_mode_dot",
    "orthonormal",
    "tucker_to_tensor",
    "unfold",
    "valid_tucker_ranks",
    "weighted_tucker_sum",
]


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding ``Mat_mode(T)``: shape ``(n_mode, prod of the other dims)``, other modes in order."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``matrix`` of shape ``(shape[mode], prod(others))`` back to ``shape``."""
    moved = [shape[mode], *(s for i, s in enumerate(shape) if i != mode)]
    return torch.movedim(matrix.reshape(moved), 0, mode)


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``T x_mode M``: ``matrix`` of shape ``(m, n_mode)`` replaces dim ``mode`` by ``m``."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [mode])), 0, mode)


def multi_mode_dot(tensor: torch.Tensor, matrices: Sequence[torch.Tensor], modes: Sequence[int]) -> torch.Tensor:
    """Successive mode products ``T x_{modes[0]} M_0 x_{modes[1]} M_1 ...``."""
    for matrix, mode in zip(matrices, modes):
        tensor = mode_dot(tensor, matrix, mode)
    return tensor


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``C x_0 U_0 x_1 U_1 ...`` for factors ``U_i`` of shape ``(n_i, r_i)`` on the leading modes."""
    return multi_mode_dot(core, factors, range(len(factors)))


def orthonormal(n: int, r: int, *, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """Random ``(n, r)`` matrix with orthonormal columns (QR of a Gaussian, signs fixed), ``r <= n``."""
    if r > n:
        raise ValueError(f"cannot build {r} orthonormal columns in dimension {n}")
    gaussian = torch.randn(n, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return torch.empty(n, r, dtype=dtype).copy_(q)  # standard row-major strides, also for r = 1


def valid_tucker_ranks(ranks: Sequence[int], dense_sizes: Sequence[int] = ()) -> list[int]:
    """Largest ranks ``<= ranks`` that a Tucker core can have: ``r_i <= prod_{j != i} r_j * prod(dense_sizes)``.

    ``dense_sizes`` are trailing core modes without a factor (a dense kernel window).  For a matrix (two modes,
    no dense modes) this makes both ranks equal to the smaller one.
    """
    ranks = list(ranks)
    dense = math.prod(dense_sizes)
    changed = True
    while changed:
        changed = False
        for i in range(len(ranks)):
            bound = math.prod(ranks[:i] + ranks[i + 1 :]) * dense
            if ranks[i] > bound:
                ranks[i] = bound
                changed = True
    return ranks


def weighted_tucker_sum(
    cores: Sequence[torch.Tensor],
    factor_lists: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    max_rank: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``sum_k weights[k] * (cores[k] x_0 U_0^k x_1 U_1^k ...)`` as one Tucker tensor, in float64.

    Each mode's bases are concatenated and orthonormalized (``[U_i^1, U_i^2, ...] = Q_i R_i``), the weighted cores
    placed as diagonal blocks and multiplied by the ``R_i``; a HOSVD of that core then keeps the directions above
    round-off (``1e-10`` of the largest singular value of each unfolding), at most ``max_rank`` per mode.  Without
    ``max_rank`` the result is the sum (to round-off); with it, a truncation (for matrices the best of that rank)."""
    d = len(factor_lists[0])
    work = torch.float64
    qs, rs = zip(*(torch.linalg.qr(torch.cat([f[i].to(work) for f in factor_lists], dim=1)) for i in range(d)))
    widths = [sum(f[i].shape[1] for f in factor_lists) for i in range(d)]
    block = torch.zeros((*widths, *cores[0].shape[d:]), dtype=work, device=cores[0].device)
    offsets = [0] * d
    for core, weight in zip(cores, weights):
        block[tuple(slice(o, o + r) for o, r in zip(offsets, core.shape[:d]))] = weight * core.to(work)
        offsets = [o + r for o, r in zip(offsets, core.shape[:d])]
    core = multi_mode_dot(block, rs, range(d))
    bases, counts = [], []
    for i in range(d):
        u, sigma, _ = torch.linalg.svd(unfold(core, i), full_matrices=False)
        count = int((sigma > 1e-10 * sigma[0]).sum()) if sigma[0] > 0 else 1
        bases.append(u)
        counts.append(max(1, min(count, max_rank or count)))
    # (counts at round-off may differ between modes, e.g. a matrix's two: keep ranks a Tucker core can have)
    kept = [u[:, :rank] for u, rank in zip(bases, valid_tucker_ranks(counts, core.shape[d:]))]
    core = multi_mode_dot(core, [u.T for u in kept], range(d))
    return core, [q @ u for q, u in zip(qs, kept)]


# Batched forms: a leading batch dimension B (layers of equal shapes updated together)
def batched_unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of each tensor of a batch ``(B, ...)``: ``(B, n_mode, prod of the others)``."""
    return torch.movedim(tensor, mode + 1, 1).reshape(tensor.shape[0], tensor.shape[mode + 1], -1)


def batched_fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`batched_unfold`; ``shape`` excludes the batch dimension."""
    moved = [matrix.shape[0], shape[mode], *(s for i, s in enumerate(shape) if i != mode)]
    return torch.movedim(matrix.reshape(moved), 1, mode + 1)


def batched_mode_dot(tensor: torch.Tensor, matrices: torch.Tensor, mode: int) -> torch.Tensor:
    """``T_b x_mode M_b`` for every member ``b`` of a batch: ``tensor`` ``(B, ...)``, ``matrices`` ``(B, m, n_mode)``."""
    moved = torch.movedim(tensor, mode + 1, -1)
    out = (moved.reshape(moved.shape[0], -1, moved.shape[-1]) @ matrices.transpose(-1, -2)).reshape(
        *moved.shape[:-1], matrices.shape[-2]
    )
    return torch.movedim(out, -1, mode + 1)
