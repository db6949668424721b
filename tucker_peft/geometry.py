"""The geometric, rank-adaptive update of one Tucker tensor (docs/algorithm.md §2-4), on plain tensors.

Notation: ``dW = C x_0 U_0 ... x_{d-1} U_{d-1}``, core ``C`` of shape ``(r_0, ..., r_{d-1}, *w)`` where ``w`` are
trailing dense modes without a factor (a convolution window in ``channels`` mode), factors ``U_i`` ``(n_i, r_i)``
with orthonormal columns.  ``Mat_i`` is the mode-``i`` unfolding (:func:`tucker_peft.tensor_ops.unfold`).

One step, with gradients ``g_i = dL/dU_i``, ``g_C = dL/dC`` of one backward pass and a step size ``lam``:

1. :func:`unfolding_polar`: ``Mat_i(C)^T = Q_i R_i`` with ``R_i`` symmetric PSD (so ``K_i = U_i R_i`` keeps its
   columns in ``U_i``'s frame), and the pseudo-inverse ``R_i^+`` with a relative cutoff.
2. ``dL/dK_i = g_i R_i^+`` (:func:`k_gradient`); ``K_i' = K_i - lam * D_i`` with ``D_i`` that gradient or an
   adaptive direction.
3. :func:`new_directions`: ``Ut_i = [U_i, Uhat_i]`` with ``Uhat_i`` orthonormal, ``Uhat_i ⟂ U_i``, spanning ``(I - U_i U_i^T) K_i'``, and the
   core block ``Uhat_i^T K_i' Q_i^T`` (rows of directions below a small multiple of ``||K_i'||`` set to zero).
4. :func:`augmented_core`: the core ``Ct`` on ``Ut_i = [U_i, Uhat_i]`` by blocks: old block ``C - lam * D_C``,
   mode-``i``-new blocks from 3, zero elsewhere.  Then ``Ct x Ut = dW - lam * P_T(G)`` (for the plain direction).
5. :func:`mode_svds`, :func:`truncation_ranks`, :func:`truncate`: HOSVD truncation with the relative tolerance
   ``theta = tau * ||Ct||_F``, ranks clamped to ``[min_rank, max_rank]`` and to valid Tucker ranks.

Batching: the tensor functions take a leading batch dimension ``B`` (cores of equal shapes, or factors of equal
sizes, of many layers are updated together, with one batched SVD/QR per kind of operation); :func:`truncation_ranks`
decides the ranks of one layer on the host.  Nothing here knows about modules, optimizers or moments; the integrator
composes these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .tensor_ops import batched_fold, batched_mode_dot, batched_unfold, mode_dot, unfold, valid_tucker_ranks

#: device types whose kernels (batched QR, SVD, matmul) take float64: elsewhere (MPS, XLA, Intel XPUs without native
#: float64) the update computes in the factors' own dtype
FLOAT64_DEVICES = ("cpu", "cuda")


def work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a step computes in: float64 for factors stored in a floating dtype on a device that has it.

    A step re-forms every factor (the QR of the augmentation, the products with the singular vectors of the
    truncation), so in the factors' own fp32 each step moves the delta by a few ``eps * ||dW||`` even when the
    gradient is zero, and this round-off walk set the attainable error (planted rank-3 problems: 0.6-1.9e-6, where
    LoRA + AdamW reaches 1.6-5.5e-7).  In float64 a step's only rounding is the write-back of the new values, as for
    an ordinary optimizer step.  The matrices are small (``n x 2r`` factors, ``2r x 2r`` cores), so the cost is a cast
    per stacked tensor."""
    if dtype.is_floating_point and device.type in FLOAT64_DEVICES:
        return torch.float64
    return dtype


def default_rcond(dtype: torch.dtype) -> float:
    """Relative cutoff for ``R_i^+``: ``sqrt(eps)`` of the dtype (3.5e-4 in fp32, 1.5e-8 in fp64)."""
    return math.sqrt(torch.finfo(dtype).eps)


def unfolding_polar(core: torch.Tensor, mode: int, rcond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``Mat_mode(C)^T = Q R`` for a batch of cores ``(B, ...)``: ``Q`` ``(B, m, r)`` orthonormal columns and ``R^+``
    ``(B, r, r)`` (``R`` symmetric PSD itself is not needed: the step only uses ``K``'s gradient ``g R^+``).

    From the thin SVD ``Mat^T = A S B^T``: ``Q = A B^T``, ``R = B S B^T``, ``R^+ = B S^+ B^T`` where singular values
    ``<= rcond * max(S)`` are treated as zero (so a zero core gives ``R^+ = 0``: the first step only moves the core).
    Requires ``m >= r`` (a valid Tucker rank).
    """
    mat_t = batched_unfold(core, mode).transpose(-1, -2)
    a, s, bh = torch.linalg.svd(mat_t, full_matrices=False)
    b = bh.transpose(-1, -2)
    q = a @ bh
    keep = s > rcond * s[..., :1]
    s_inv = torch.where(keep, torch.where(keep, s, 1.0).reciprocal(), 0.0)
    r_pinv = b @ (s_inv[..., :, None] * bh)
    return q, r_pinv


def matrix_polars(
    core: torch.Tensor, rcond: float, padded: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`unfolding_polar` of both modes of a batch of matrix cores ``(B, r, r)`` from one SVD: with
    ``C^T = A S B^T``, mode 0 gets ``Q = A B^T``, ``R = B S B^T`` and mode 1 (``Mat_1(C)^T = C = B S A^T``)
    ``Q^T``, ``A S A^T``.  Returns ``Q`` and ``R^+`` ``(2B, r, r)``: mode 0 of every core, then mode 1.

    ``padded`` ``(B, r)`` (bool): the cores are zero-padded from their own ranks to a common width, ``True`` at the
    padding.  The polar factors are then those of each real core, embedded: ``Q = [Q_b, 0; 0, I]``,
    ``R^+ = [R_b^+, 0; 0, 0]``.  (They are computed from ``[C_b^T, 0; 0, s I]`` with ``s = ||C_b||_2``,
    whose polar factor is that ``Q`` whenever ``C_b`` is nonsingular, keeps its null directions in the real block
    when it is not, and whose largest singular value, hence the cutoff, is ``C_b``'s; the padded blocks are then set
    exactly, so that nothing of round-off size reaches an Adam direction.)"""
    mat_t = core.transpose(-1, -2)
    if padded is not None:
        spectral = torch.linalg.matrix_norm(mat_t, ord=2)
        mat_t = mat_t + torch.diag_embed(padded * spectral[:, None])
    a, s, bh = torch.linalg.svd(mat_t, full_matrices=False)
    keep = s > rcond * s[..., :1]
    s_inv = torch.where(keep, torch.where(keep, s, 1.0).reciprocal(), 0.0)
    left = torch.cat([a, bh.transpose(-1, -2)])  # mode 0: A, B^T ... ; mode 1: B, A^T
    right_h = torch.cat([bh, a.transpose(-1, -2)])
    right = right_h.transpose(-1, -2)
    s_inv = torch.cat([s_inv, s_inv])[..., :, None]  # both modes
    out = (left @ right_h, right @ (s_inv * right_h))
    if padded is not None:
        real = ~padded
        both = (real[:, :, None] & real[:, None, :]).repeat(2, 1, 1)
        identity = torch.diag_embed(padded.to(core.dtype)).repeat(2, 1, 1)
        q, p = out
        out = (torch.where(both, q, identity), torch.where(both, p, 0.0))
    return out


def k_gradient(factor_grad: torch.Tensor, r_pinv: torch.Tensor) -> torch.Tensor:
    """``dL/dK_i = g_i R_i^+`` ``(B, n_i, r_i)``: the gradient with respect to ``K_i = U_i R_i``."""
    return factor_grad @ r_pinv


def new_directions(
    factor: torch.Tensor,
    k_step: torch.Tensor,
    step_norm: torch.Tensor,
    q: torch.Tensor,
    rel_eps: float,
    order: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented basis of one mode and the new core block, for a batch.

    Args:
        factor: ``U`` ``(B, n, r)``, orthonormal columns.
        k_step: ``K' - K = -lam * D`` ``(B, n, r)``; only its part orthogonal to ``U`` matters (``U^T K = R``).
        step_norm: ``||K' - K||_F`` ``(B,)``, the reference for dropping round-off directions: the QR below is
            backward stable column by column, so the part of ``k_step`` it finds orthogonal to ``U`` is exact up to
            a small multiple of ``eps * ||k_step||``.  (Relative to ``||K'||``, the spec's reference for
            projecting ``K'`` itself, the small basis corrections of a nearly converged fit were dropped as well:
            the bases froze while the core went on, a floor of 1e-5 relative error on the planted problems.)
        q: ``Q`` ``(B, m, r)`` from :func:`unfolding_polar`.
        rel_eps: directions whose singular value is ``<= rel_eps * step_norm`` get a zero core block.
        order: for layers zero-padded from their own rank ``r_b`` to the common width ``r`` (``padded`` of
            :func:`matrix_polars`): a permutation matrix ``(B, 2r, 2r)`` (and its transpose) whose columns put each
            layer's real columns ``[U_b, k_step_b]`` first (a product with it is exact).  The QR then factors them as
            it would without padding (Householder reflectors depend only on the columns to their left); the zero
            columns at the end get orthonormal directions with zero ``R`` rows, which carry no core entry.  Requires
            ``n >= 2r``.

    Returns:
        ``Ut = [U', Uhat]`` ``(B, n, r + k)``, ``k = min(r, n - r)``, and the block ``Uhat^T K' Q^T`` ``(B, k, m)``:
        the mode-unfolding of the core block "this mode new, the others old".  Both come from one Householder QR of
        ``[U, k_step]``, so ``Ut`` is orthonormal to machine precision even when the step is rank deficient; ``U'``
        is ``U`` re-orthonormalized by that QR (equal to ``U`` up to its own round-off), which keeps ``U^T U = I``
        from drifting over many steps.
    """
    n, r = factor.shape[-2:]
    k = min(r, n - r)
    columns = torch.cat([factor, k_step], dim=-1)
    if order is not None:
        perm, perm_t = order
        columns = columns @ perm
    basis, tri = torch.linalg.qr(columns)
    if order is not None:  # back to the padded layout: U in columns [0, r), the K-steps in [r, 2r)
        basis, tri = basis @ perm_t, perm @ tri @ perm_t
    signs = torch.sign(torch.diagonal(tri[..., :r, :r], dim1=-2, dim2=-1))
    u_old = basis[..., :r] * torch.where(signs == 0, 1.0, signs)[..., None, :]
    if k == 0:
        return u_old, factor.new_zeros(factor.shape[0], 0, q.shape[-2])
    q2 = basis[..., r : r + k]
    # (I - U U^T) k_step = q2 @ tri[r:r+k, r:]; rotate q2 to its singular directions to rank them
    a, s, bh = torch.linalg.svd(tri[..., r : r + k, r:], full_matrices=False)
    u_hat = q2 @ a
    s = torch.where(s > rel_eps * step_norm[:, None], s, 0.0)
    block = (s[..., :, None] * bh) @ q.transpose(-1, -2)
    return torch.cat([u_old, u_hat], dim=-1), block


def augmented_core(old_block: torch.Tensor, new_blocks: Sequence[torch.Tensor], n_factors: int) -> torch.Tensor:
    """Assemble ``Ct`` ``(B, rt_0, ..., rt_{d-1}, *w)``: ``old_block`` in the leading corner, mode-``i``-new blocks.

    ``new_blocks[i]`` ``(B, k_i, m_i)`` is the mode-``i`` unfolding of a tensor whose mode ``i`` has size ``k_i``
    and whose other modes have the old sizes.
    """
    if n_factors == 2 and old_block.dim() == 3:  # matrix cores: [[C', N_1^T], [N_0, 0]]
        zeros = old_block.new_zeros(old_block.shape[0], new_blocks[0].shape[1], new_blocks[1].shape[1])
        top = torch.cat([old_block, new_blocks[1].transpose(-1, -2)], dim=-1)
        return torch.cat([top, torch.cat([new_blocks[0], zeros], dim=-1)], dim=-2)
    old_shape = list(old_block.shape[1:])
    ks = [b.shape[1] for b in new_blocks]
    shape = [s + (ks[i] if i < n_factors else 0) for i, s in enumerate(old_shape)]
    ct = old_block.new_zeros([old_block.shape[0], *shape])
    ct[(slice(None), *(slice(0, s) for s in old_shape))] = old_block
    for i, block in enumerate(new_blocks):
        if ks[i] == 0:
            continue
        block_shape = list(old_shape)
        block_shape[i] = ks[i]
        index = [slice(None), *(slice(0, s) for s in old_shape)]
        index[i + 1] = slice(old_shape[i], old_shape[i] + ks[i])
        ct[tuple(index)] = batched_fold(block, i, block_shape)
    return ct


def mode_singular_values(ct: torch.Tensor, n_factors: int) -> list[torch.Tensor]:
    """The singular values ``(B, k)`` of ``Mat_i(Ct)`` per factorized mode (as :func:`mode_svds`, without vectors)."""
    if n_factors == 2 and ct.dim() == 3:
        s = torch.linalg.svdvals(ct)
        return [s, s]
    return [torch.linalg.svdvals(batched_unfold(ct, i)) for i in range(n_factors)]


def mode_svds(ct: torch.Tensor, n_factors: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(P_i, sigma_i)`` per factorized mode of a batch ``(B, ...)``: left singular vectors ``(B, rt_i, k)`` and
    singular values ``(B, k)`` of ``Mat_i(Ct)``.  A matrix core (two modes, no window) needs one SVD."""
    if n_factors == 2 and ct.dim() == 3:
        p0, s, p1h = torch.linalg.svd(ct, full_matrices=False)
        return [(p0, s), (p1h.transpose(-1, -2), s)]
    out = []
    for i in range(n_factors):
        p, s, _ = torch.linalg.svd(batched_unfold(ct, i), full_matrices=False)
        out.append((p, s))
    return out


def truncation_ranks(
    sigmas: Sequence[Sequence[float]],
    theta: float,
    min_rank: int,
    max_rank: int,
    dense_sizes: Sequence[int] = (),
) -> list[int]:
    """Ranks after truncation (host-side arithmetic on singular values already copied to the CPU).

    Per mode: the smallest ``r`` with ``||sigma[r:]||_2 <= theta``, clamped to ``[min_rank, max_rank]`` and to the
    available directions, then reduced to a valid Tucker rank (``r_i <= prod_{j != i} r_j * prod(w)``).
    """
    ranks = []
    for sigma in sigmas:
        tail_sq, r = 0.0, len(sigma)
        theta_sq = theta * theta
        for j in range(len(sigma) - 1, -1, -1):
            tail_sq += sigma[j] * sigma[j]
            if tail_sq > theta_sq:
                break
            r = j
        ranks.append(min(max(r, min_rank, 1), max_rank, len(sigma)))
    return valid_tucker_ranks(ranks, dense_sizes)


def valid_working_ranks(
    targets: Sequence[int], available: Sequence[int], dense_sizes: Sequence[int] = ()
) -> list[int]:
    """Ranks held between rank decisions: ``targets`` clipped to the ``available`` directions of each mode and
    reduced to valid Tucker ranks."""
    return valid_tucker_ranks([max(1, min(t, a)) for t, a in zip(targets, available)], dense_sizes)


def truncate(
    ct: torch.Tensor, factors: Sequence[torch.Tensor], projections: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``C = Ct x_i P_i^T``, ``U_i = Ut_i P_i`` for a batch: ``ct`` ``(B, rt_0, ..., *w)``, ``factors``
    ``(B, n_i, rt_i)``, projections ``(B, rt_i, r_i)`` (the leading singular vectors to keep)."""
    if ct.dim() == 3 and len(projections) == 2:  # matrix cores: two batched matmuls
        core = projections[0].transpose(-1, -2) @ ct @ projections[1]
    else:
        core = ct
        for i, p in enumerate(projections):
            core = batched_mode_dot(core, p.transpose(-1, -2), i)
    return core, [u @ p for u, p in zip(factors, projections)]


def tangent_projection(
    grad: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor], rcond: float | None = None
) -> torch.Tensor:
    """Dense ``P_T(G)``: projection of a dense gradient onto the tangent space of the Tucker manifold at ``dW``.

    ``P_T(G) = Cdot x_j U_j + sum_i C x_i Udot_i x_{j != i} U_j`` with ``Cdot = G x_j U_j^T`` and
    ``Udot_i = (I - U_i U_i^T) Mat_i(G x_{j != i} U_j^T) Mat_i(C)^+``.  Dense (``O(prod n_i)``): for tests and
    references only, never used in training.
    """
    d = len(factors)
    rcond = default_rcond(grad.dtype) if rcond is None else rcond
    core_dot = grad
    for j, u in enumerate(factors):
        core_dot = mode_dot(core_dot, u.T, j)
    out = core_dot
    for j, u in enumerate(factors):
        out = mode_dot(out, u, j)
    for i in range(d):
        partial = grad
        for j, u in enumerate(factors):
            if j != i:
                partial = mode_dot(partial, u.T, j)
        mat_c = unfold(core, i)
        u_dot = unfold(partial, i) @ torch.linalg.pinv(mat_c, rtol=rcond)
        u_dot = u_dot - factors[i] @ (factors[i].T @ u_dot)
        term = core
        for j, u in enumerate(factors):
            term = mode_dot(term, u_dot if j == i else u, j)
        out = out + term
    return out
