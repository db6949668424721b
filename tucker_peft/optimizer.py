"""``TuckerOptimizer``: the geometric, rank-adaptive TDLRT update of all Tucker adapters of a model.

It is a ``torch.optim.Optimizer`` over the Tucker factors only (one parameter group per adapted layer, holding
``[C, U_0, U_1, ...]``), so learning-rate schedulers, ``GradScaler`` (``unscale_``, skipped steps on inf),
``zero_grad`` and ``state_dict``/``load_state_dict`` work as for any optimizer.  The rest of the model (a classifier
head, ``modules_to_save``) is trained by an ordinary optimizer that must not hold the factors
(:func:`non_tucker_parameters` gives its parameters).

One :meth:`TuckerOptimizer.step` performs, for every layer that received a gradient, the parallel integrator of
docs/algorithm.md §2-4 (:mod:`tucker_peft.geometry`): K-steps and basis augmentation for every mode from the same
gradients, the augmented core by blocks, and HOSVD truncation with relative tolerance ``tau``.  The scale
``alpha / r`` of the layers never changes.

Step directions (``direction=``):

- ``"sgd"``: the paper's geometry-aware SGD, ``K_i' = K_i - lr * dL/dK_i``, ``C' = C - lr * dL/dC``.
- ``"adam"`` (default): Adam directions for ``K_i`` and ``C`` (bias-corrected moments).  For ``K_i`` the moments
  see only the part of ``dL/dK_i`` orthogonal to ``U_i``: only that part reaches the update (the part inside
  ``span(U_i)`` is the core's step), and letting the rest into the second moment shrank the basis steps (planted
  rank-3 Linear, lr 1e-3 with warmup: relative error 0.086 with the whole gradient, 0.030 with its normal part).
  The core's direction is multiplied by ``adaptive_scale`` (default ``"auto"``: :func:`auto_adaptive_scale`, so
  that a core step moves the delta as far as a step of LoRA of the configured rank moves its factors).  Moments
  live in the coordinates of ``K_i`` (rows: the ambient mode, columns: ``U_i``'s frame) and of ``C``; they are
  carried along with the factors: on augmentation new blocks start at zero; on truncation ``m <- m P_i`` (and
  ``m <- m x_i P_i^T`` for the core) with the same ``P_i`` that truncates ``U_i``; the second moment uses the mixing
  form ``v <- v (P_i * P_i)`` (elementwise square: a convex combination, since the columns of ``P_i`` have unit
  norm), which keeps ``v`` positive and of the right scale, unlike the square of ``sqrt(v) |P_i|``.

Rank decisions (docs/algorithm.md §4):

- a step that carries no information about ranks changes none: ``lr = 0`` (the first step of a linear warmup) or a
  zero augmented core (all-zero gradients at a zero core).  The old directions are kept as they are;
- ``rank_warmup`` (default 0) steps at the initial ranks before the first decision (like AdaLoRA's ``tinit``), then
  a decision every ``rank_interval`` steps (default 1: every step), by the tolerance ``tau``;
- between decisions the ranks are held at ``min(rank_headroom * decided, max_rank)``.  With the default
  ``rank_headroom=1`` they stay at the decided ranks (the leading directions of the augmented core are kept, so the
  bases still rotate).  With ``rank_headroom=2`` the update carries as many candidate directions as it keeps, and
  they accumulate signal until the next decision: this is what lets a rank grow at small learning rates, because
  a direction that is new in one mode is paired with the old directions of the others and enters the augmented
  core only at the size of one step (a Conv2d started at channel ranks (1, 1) stays there without headroom and
  reaches the planted (3, 2) with ``rank_headroom=2, rank_interval=10``).  The candidates are below the tolerance
  by construction but add noise at large constant learning rates (``benchmarks/convergence.py``), hence not the
  default.

Moving the bases every k steps (``basis_interval=k``, default 1): the core takes its Adam step every step, the bases
(K-steps, augmentation, SVDs, truncation, rank decisions) move once every k steps, by the mean of the k steps' basis
gradients and with the sum of their learning rates as step size.  The steps in between are one set of
``torch._foreach`` ops over all layers (no QR, SVD or tensor op per layer), so the heavy part of the update
is amortised over k steps.  The new directions of a move carry k steps; the rank decision judges them at one step's
size (their blocks of the augmented core divided by k), as a step with ``basis_interval=1`` would, and the truncation
then keeps the leading directions of the true augmented core (judged at their full size the ranks grew: SST-2 mean
rank 10.8 instead of 4.3 at k = 4).  So a move's discarded tail per mode is at most ``tau ||Ct'|| + (1 - 1/k) ||N||``
(Mirsky's inequality; ``Ct'`` the judged core, ``N`` the new blocks), not ``tau ||Ct||``.  Opt-in: on GLUE it did
not match k = 1 (``benchmarks/README.md``).

Decoupled weight decay (``weight_decay``) shrinks the core only, never the orthonormal bases.

Robustness: non-finite gradients or updated factors anywhere skip the whole step (factors and moments untouched, one
warning); a learning rate that is not a finite number >= 0 is an error; a layer without gradients this step is left
as it is; ranks stay within ``[min_rank, max_rank]``; Adam on factors stored in float16 (``model.half()`` after
``get_peft_model``) is an error, since its second moments underflow there.  Another optimizer that holds factors
this update trains is refused before its step (a global optimizer step pre-hook), unless :func:`tucker_peft.attach`
hooked it; an optimizer that steps trainable factors no update owns (the Trainer without the callback, a loop
without ``attach``) is warned once.  A step while another, untrained Tucker adapter is active (``set_adapter``) is
refused.  The update does one host synchronisation per step (the rank decision), independent of the number of
layers.

Cost: layers of equal settings are updated as one batch: matrix layers (linear layers) of any shapes and ranks,
their cores stacked once and their factors per group of equal size across layers and modes (:class:`_Groups`), zero-
padded to the batch's largest rank (:class:`_Padding`; equal, up to round-off, to updating each at its own rank),
other layers per shape and ranks.  Layers are stacked, cut back to their ranks and written back (one
``torch._foreach_copy_`` for all layers that keep their ranks) with a few ops per distinct rank (at most
``max_rank`` of them), so a step's op count does not grow with the number of layers or their shapes; only a layer
whose ranks change adds ops of its own (new tensors).

Precision: on CPU and CUDA a step computes in float64 (:func:`tucker_peft.geometry.work_dtype`) and writes the new
factors and moments back in their stored dtype, so its only rounding to fp32 is that write-back, as for an ordinary
optimizer step.  The cutoffs that tell round-off from signal (``R_i^+``, the guard on new directions) use the
stored precision (why float64: :func:`~tucker_peft.geometry.work_dtype`).
"""

from __future__ import annotations

import functools
import heapq
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import geometry
from .config import check_budget_schedule
from .layer import LIVE_LAYERS, TuckerLayer
from .model import iter_tucker_layers
from .tensor_ops import valid_tucker_ranks

#: which TuckerOptimizer updates a Tucker factor or core (a registry rather than an attribute, so that a deep copy of a
#: model is free); keyed by parameter, so that each adapter of a layer can have its own update
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: optimizers that :func:`tucker_peft.attach` hooked (-> their ``Attachment``): they hold the factors but hand them
#: to their TuckerOptimizer
ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: per optimizer, the parameter layout last checked (the check then costs one comparison a step)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: optimizers already warned that they step Tucker factors without the geometric update (warned once each)
_WARNED: weakref.WeakSet = weakref.WeakSet()
_GLOBAL_HOOK = None


@dataclass
class _Batch:
    """Phase 1 of a step for a batch of layers (cores stacked along a leading dimension ``B``, factors per group of
    equal size, :class:`_Groups`), on the device."""

    members: list[tuple[dict, TuckerLayer]]
    groups: _Groups  # how the factors are stacked: per group of equal sizes, across layers and modes
    finite: torch.Tensor  # () gradients and result finite
    ct: torch.Tensor  # augmented cores
    factors: list[torch.Tensor]  # augmented bases Ut, per group
    svds: list[tuple[torch.Tensor, torch.Tensor]]  # per mode: left singular vectors P_i, singular values
    norm: torch.Tensor  # (B,) ||Ct||_F
    # what the rank decision reads: ||Ct|| and the singular values, of Ct itself, or with basis_interval of Ct with its
    # new-direction blocks at one step's size
    rank_norm: torch.Tensor
    rank_sigmas: list[torch.Tensor]
    step: int
    moments: list[tuple[torch.Tensor, torch.Tensor]] | None  # Adam (exp_avg, exp_avg_sq) of C, then K per group
    old_ranks: list[int]  # per group, the width of the stacked factors (the common, padded width with padding)
    member_ranks: list[list[int]]  # per layer, its own ranks before the step
    available: list[int] | None  # with padding: per layer, how many singular values per mode are its own
    decided: list[list[int] | None]  # per layer, the ranks of the last decision
    decide: bool  # a rank decision is due
    frozen: bool  # lr = 0: no rank information
    basis_step: int | None  # moves of the bases so far, this one included (None: every step moves them)


class _Padding:
    """Stacking of matrix layers (square cores ``(r_b, r_b)``, factors ``(n, r_b)``) of different ranks ``r_b`` into one
    batch, zero-padded to a common ``width`` (the batch's largest rank): the update of such a batch equals updating each
    layer at its own rank (:func:`geometry.matrix_polars` and :func:`geometry.new_directions` keep the padding out of
    every real block), so a step costs the same ops for any number of layers.

    Stacking: the tensors are flattened into one buffer (one op); cores are then gathered (one op), factors copied
    into the padded batch with one strided copy per run of equal ranks (the slots of a group are sorted by rank,
    :class:`_Groups`, so there are at most as many runs as distinct ranks)."""

    def __init__(self, ranks: list[int], like: torch.Tensor, width: int) -> None:
        self.ranks, self.width, self.device, self.dtype = ranks, width, like.device, like.dtype
        self._entries: dict[int, torch.Tensor] = {}
        # the permutation (as a matrix: products with it are exact) that puts each layer's real columns of
        # [U, K-step] first, its transpose, and the padded slots
        order = [[*range(r), *range(width, width + r), *range(r, width), *range(width + r, 2 * width)] for r in ranks]
        values = torch.tensor([order, [[r] * 2 * width for r in ranks]], device=like.device)
        perm_t = torch.nn.functional.one_hot(values[0], 2 * width).to(like.dtype)  # [b, c', c] = (order[c'] == c)
        self.order = (perm_t.transpose(1, 2), perm_t)
        self.padded = values[1, :, :width] <= torch.arange(width, device=like.device)  # (B, width): j >= r_b
        # runs of consecutive layers of equal rank: (first, end, rank, columns before first)
        self.runs: list[tuple[int, int, int, int]] = []
        first = before = 0
        for end in range(1, len(ranks) + 1):
            if end == len(ranks) or ranks[end] != ranks[first]:
                self.runs.append((first, end, ranks[first], before))
                before += (end - first) * ranks[first]
                first = end

    def entries(self, count: int) -> torch.Tensor:
        """``(count * B * width * width,)``: for ``count`` lists of the layers' cores flattened and concatenated (then
        one zero), where each entry of the padded cores comes from."""
        if count not in self._entries:
            r = torch.tensor(self.ranks)[:, None, None]
            i, j = torch.arange(self.width)[:, None], torch.arange(self.width)
            size = r * r  # of each layer's core; (B, 1, 1)
            index = size.cumsum(0) - size + i * r + j  # (B, width, width), within one list
            index = index + torch.arange(count)[:, None, None, None] * size.sum()
            index = torch.where((i < r) & (j < r), index, count * size.sum())  # the padding reads the zero at the end
            self._entries[count] = index.reshape(-1).to(self.device)
        return self._entries[count]

    def factors(self, lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """``(B, n, width)`` per list of factor-shaped tensors ``(n, r_b)``."""
        n, count, size = lists[0][0].shape[0], len(lists), len(self.ranks)
        flat = _flatten_dense_tensors([t for tensors in lists for t in tensors])
        out = flat.new_zeros(count, size, n, self.width, dtype=self.dtype)  # (the copies below cast)
        length = n * sum(self.ranks)  # of one list in ``flat``
        for first, end, r, before in self.runs:
            source = flat.as_strided((count, end - first, n, r), (length, n * r, r, 1), n * before)
            out.as_strided(source.shape, out.stride(), first * n * self.width).copy_(source)
        return list(out.unbind(0))

    def cores(self, lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """``(B, width, width)`` per list of core-shaped tensors ``(r_b, r_b)``."""
        flat = _flatten_dense_tensors([t for tensors in lists for t in tensors] + [lists[0][0].new_zeros(1)])
        stacked = flat.to(self.dtype).index_select(0, self.entries(len(lists)))
        return list(stacked.view(len(lists), len(self.ranks), self.width, self.width).unbind(0))


class _Groups:
    """How the tensors of a batch are stacked.  Mode ``i`` of layer ``b`` (a slot) goes into the group of the factors of
    its size ``n_i``, so that the work on factors (K-steps and their Adam moments, the QR of the augmentation, the
    truncation of the bases) runs once per distinct ``n`` for all layers and modes of the batch, and the work on cores
    (polar factors, the augmented core and its SVD) once for the batch.  Matrix layers of any shapes share a batch
    this way (both modes of a square layer share one group); a tensor batch (equal shapes) has one group per mode.

    Where the layers' ranks differ (matrix layers), cores and factors are zero-padded to the largest rank
    (:class:`_Padding`): ``padding`` for the cores, ``paddings`` per group.  Tensors per mode are converted to and
    from the groups' order in the mode-major order (slot ``(b, i)`` at ``i * B + b``): :meth:`pick`,
    :meth:`to_modes`."""

    def __init__(self, sizes: list[tuple[int, ...]], ranks: list[tuple[int, ...]], like: torch.Tensor) -> None:
        size, modes = len(sizes), len(sizes[0])
        self.size, self.modes = size, modes
        merge = like.dim() == 2 and modes == 2  # matrix cores: every group has the same width
        by_key: dict[int, list[tuple[int, int]]] = {}
        for i in range(modes):
            for b in range(size):
                by_key.setdefault(sizes[b][i] if merge else i, []).append((b, i))
        padded = len(set(ranks)) > 1
        # with padding, each group's slots sorted by rank (stable), so that they are stacked and cut back in runs
        self.slots = [sorted(slots, key=lambda s: ranks[s[0]][s[1]]) if padded else slots for slots in by_key.values()]
        positions = [[i * size + b for b, i in slots] for slots in self.slots]
        # per group: the mode it is (all layers in order), or the slice / index of the mode-major order it takes
        self.mode = [slots[0][1] if slots == [(b, slots[0][1]) for b in range(size)] else None for slots in self.slots]
        self.take = [
            slice(p[0], p[-1] + 1) if p == list(range(p[0], p[-1] + 1)) else torch.tensor(p, device=like.device)
            for p in positions
        ]
        flat = [q for p in positions for q in p]
        self.back = (
            None
            if flat == sorted(flat)
            else torch.tensor(sorted(range(len(flat)), key=flat.__getitem__), device=like.device)
        )
        self.padding = self.paddings = None
        if padded:
            width = max(r[0] for r in ranks)
            self.padding = _Padding([r[0] for r in ranks], like, width)
            self.paddings = [_Padding([ranks[b][i] for b, i in slots], like, width) for slots in self.slots]

    @property
    def identity(self) -> bool:
        """Every group is one mode of all layers, in the order of the modes."""
        return self.mode == list(range(self.modes))

    def pick(self, per_mode: list[torch.Tensor] | torch.Tensor, g: int) -> torch.Tensor:
        """Group ``g``'s tensors ``(B_g, ...)`` from tensors per mode ``(B, ...)`` (a list, when :attr:`identity`) or
        from all modes in the mode-major order ``(d * B, ...)``."""
        if isinstance(per_mode, list):
            return per_mode[self.mode[g]]
        take = self.take[g]
        return per_mode[take] if isinstance(take, slice) else per_mode.index_select(0, take)

    def to_modes(self, per_group: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors per mode ``(B, ...)`` from tensors per group ``(B_g, ...)`` of equal trailing shapes (or any
        shapes when :attr:`identity`)."""
        if self.identity:
            return per_group
        flat = torch.cat(per_group)
        if self.back is not None:
            flat = flat.index_select(0, self.back)
        return list(flat.unflatten(0, (self.modes, self.size)).unbind(0))


class _Stacked(NamedTuple):
    """One parameter (``C`` or a ``U_i``) of every layer of a batch, stacked (or padded, :class:`_Padding`), with its
    gradient, its Adam moments and (``basis_interval``) its gradient sum, where the step uses them."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    grad_sum: torch.Tensor | None


@dataclass
class _CoreSteps:
    """Steps of the cores alone (between moves of the bases, ``basis_interval``), computed but not yet written."""

    finite: torch.Tensor  # () gradients and results finite
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (destination, new value): cores, moments, gradient sums
    assign: list[tuple[dict, str, Any]]  # optimizer-state entries to set: (state, key, value)


@dataclass
class _Decision:
    """The ranks one layer keeps after a step (host arithmetic, :meth:`TuckerOptimizer._rank_decisions`)."""

    layer: TuckerLayer
    ranks: list[int]
    decided: list[int]
    frozen: bool
    decide: bool
    sigmas: list[list[float]]
    dense: tuple[int, ...]
    min_rank: int


def _owner(param: torch.Tensor) -> TuckerOptimizer | None:
    ref = _OWNERS.get(param)
    return ref() if ref is not None else None


def ensure_step_check() -> None:
    """Register :func:`_check_optimizer_step` as a global optimizer step pre-hook, once per process (when the first
    Tucker adapter or TuckerOptimizer is created)."""
    global _GLOBAL_HOOK
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_pre_hook(_check_optimizer_step)


def _check_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global step pre-hook, before an optimizer changes anything; it reads the optimizer's parameter list only
    when its layout (or the set of Tucker adapters and updates) changed since the last check.

    - An optimizer that would also step factors a TuckerOptimizer updates is refused (its steps would move the bases
      off the manifold, and its moments stop matching the factors' shapes at the first rank change).
    - An optimizer that steps trainable Tucker factors that no geometric update owns is warned once: training then
      goes on as plain gradient descent on ``U C V^T``, the ranks never adapt and ``tau`` / ``budget`` do nothing,
      which is what forgetting the Trainer callback or :func:`tucker_peft.attach` looks like.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer):  # accelerate's AcceleratedOptimizer & co.
        inner = inner.optimizer
    if isinstance(optimizer, TuckerOptimizer) or inner in ATTACHED:
        return
    key = (tuple(len(g["params"]) for g in optimizer.param_groups), len(_OWNERS), len(LIVE_LAYERS))
    if _CHECKED.get(optimizer) == key:
        return
    factors = None
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner = _owner(param)
            if owner is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} also holds Tucker factors that a TuckerOptimizer updates (adapter "
                    f"{owner.adapter_name!r}): both would step them. Build it from "
                    "tucker_peft.non_tucker_parameters(model), or call tucker_peft.attach(optimizer, model), which "
                    "takes the factors away from it."
                )
            if param.requires_grad and inner not in _WARNED:
                if factors is None:
                    factors = {id(p) for layer in list(LIVE_LAYERS) for p in _factors_of(layer)}
                if id(param) in factors:
                    _WARNED.add(inner)
                    warnings.warn(
                        f"{type(inner).__name__} is about to step Tucker adapter factors itself, without the geometric "
                        "update: the ranks will not adapt (tau and budget do nothing) and the factors are trained as "
                        "plain parameters. With the Trainer add callbacks=[tucker_peft.TuckerLoraCallback()]; in your "
                        "own loop call tucker_peft.attach(optimizer, model) once, before training. If plain training "
                        "of the factors is what you want, ignore this warning (it is given once per optimizer).",
                        UserWarning,
                        stacklevel=3,
                    )
    _CHECKED[optimizer] = key


def _factors_of(layer: TuckerLayer) -> list[nn.Parameter]:
    """Every adapter's core and factors of one Tucker layer."""
    return [p for name in layer.adapter_layer_names for p in getattr(layer, name).values()]


def check_options(**options: Any) -> None:
    """Check keyword options of :class:`TuckerOptimizer` (as ``attach`` and ``TuckerLoraCallback`` take them)
    without a model: an unknown name or a value out of range is an error at once, not when training starts.  What
    needs the model (``budget`` against its size, ``adapter_name``) is checked when the update is built."""
    signature = inspect.signature(TuckerOptimizer)
    unknown = sorted(set(options) - set(signature.parameters) | set(options) & {"model"})
    if unknown:
        names = ", ".join(p for p in signature.parameters if p != "model")
        raise TypeError(f"Unknown option(s) {unknown} of the geometric update; it takes {names}.")
    bound = signature.bind_partial(**options)
    bound.apply_defaults()
    a = bound.arguments
    _check_settings(
        a["direction"],
        a["lr"],
        a["betas"],
        a["weight_decay"],
        a["adaptive_scale"],
        a["rank_warmup"],
        a["rank_interval"],
        a["rank_headroom"],
        a["basis_interval"],
    )
    _check_ranks(a["tau"], a["min_rank"], a["max_rank"])
    if a["budget_schedule"] is not None and a["budget"] is not None:
        check_budget_schedule(a["budget_schedule"], a["budget"])


def _refuse_frozen(layers: list[tuple[str, TuckerLayer]], adapter_name: str) -> None:
    """An adapter none of whose factors requires grad (loaded for inference) cannot be trained: say how to load it."""
    if not any(
        p.requires_grad for _, layer in layers for p in (layer.core(adapter_name), *layer.factors(adapter_name))
    ):
        raise ValueError(
            f"The Tucker adapter {adapter_name!r} is frozen (none of its factors requires grad): there is nothing "
            "for the update to train. PeftModel.from_pretrained(base, path) loads an adapter for inference; load "
            "it with PeftModel.from_pretrained(base, path, is_trainable=True) (or load_adapter(path, name, "
            "is_trainable=True)) to train it. To train only the rest of the model, leave out TuckerLoraCallback "
            "/ tucker_peft.attach."
        )


def _check_settings(
    direction, lr, betas, weight_decay, adaptive_scale, rank_warmup, rank_interval, rank_headroom, basis_interval
) -> None:
    if direction not in ("adam", "sgd"):
        raise ValueError(f"`direction` must be 'adam' or 'sgd'; got {direction!r}.")
    _check_lr(lr)
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"`betas` must lie in [0, 1); got {betas}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay}.")
    for name, value, low in (
        ("rank_warmup", rank_warmup, 0),
        ("rank_interval", rank_interval, 1),
        ("rank_headroom", rank_headroom, 1),
        ("basis_interval", basis_interval, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    if adaptive_scale != "auto" and not (isinstance(adaptive_scale, (int, float)) and adaptive_scale > 0):
        raise ValueError(f"`adaptive_scale` must be 'auto' or a number > 0; got {adaptive_scale!r}.")


def _check_ranks(tau, min_rank, max_rank) -> None:
    """``tau``, ``min_rank`` and ``max_rank`` where given (None: the adapter config's, checked by the config)."""
    if tau is not None and not 0 <= tau < 1:
        raise ValueError(f"`tau` must lie in [0, 1); got {tau}.")
    if (min_rank is not None and min_rank < 1) or (None not in (min_rank, max_rank) and min_rank > max_rank):
        raise ValueError(f"need 1 <= min_rank <= max_rank; got min_rank={min_rank}, max_rank={max_rank}.")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


def tucker_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All Tucker factors and cores of ``model`` (every adapter)."""
    return [p for _, layer in iter_tucker_layers(_unwrap(model)) for p in _factors_of(layer)]


def non_tucker_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``model`` that are not Tucker factors: what an ordinary optimizer should train."""
    tucker = {id(p) for p in tucker_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in tucker]


def lora_reference_size(layer: TuckerLayer, adapter_name: str) -> int:
    """Parameters of a LoRA of the adapter's initial rank ``r`` on the same layer: ``r * (n_out + n_in * prod(k))``
    (PEFT's LoRA factors ``B`` ``(n_out, r)`` and ``A`` ``(r, n_in, *k)``)."""
    return layer.r[adapter_name] * (layer.out_features + layer.in_features * math.prod(layer.kernel_size))


def auto_adaptive_scale(reference_size: int, core_size: int) -> float:
    """Factor of the core's Adam direction: ``sqrt(reference_size / numel(C))``.

    An Adam step moves every coordinate by about ``lr``, so its Frobenius norm is about ``lr * sqrt(#coordinates)``.
    LoRA of rank ``r`` moves ``reference_size = r * (n_out + n_in * prod(k))`` coordinates per step
    (:func:`lora_reference_size`); inside the current subspace our update moves only the core (``numel(C)``
    coordinates, ``r_out * r_in * prod(k)``).  With this factor the core moves the delta as far per step as LoRA of
    the configured rank moves its factors, at any current rank, so LoRA's learning rates carry over.  Measured on
    the planted problems of ``benchmarks/convergence.py`` (warmup 10 + linear decay, 600 steps, lr 5e-4 / 1e-3):
    with the factor taken at the *current* ranks instead (``sum_i n_i r_i``, which shrinks with the ranks), the
    relative error was 0.25 / 0.030 (Linear) and 0.36 / 0.11 (Conv2d), against LoRA's 0.16 / 0.014 and 0.12 / 0.010;
    with this factor 0.076 / 0.0010 and 0.0093 / 4.8e-5.  ``numel(C)`` is taken at the decided ranks, so candidate
    directions held between rank decisions (``rank_headroom``) do not shrink the step.
    """
    return math.sqrt(reference_size / core_size)


class TuckerOptimizer(Optimizer):
    """Geometric, rank-adaptive update of the Tucker adapters of ``model`` (a ``PeftModel`` or adapted model).

    Args:
        model: a model holding Tucker adapters (possibly wrapped by DDP/accelerate).
        lr: step size (the learning rate; schedulers set ``param_groups[i]["lr"]``).
        direction: ``"adam"`` (default) or ``"sgd"`` (plain geometry-aware SGD).
        betas, eps: Adam constants.
        weight_decay: decoupled weight decay of the core (never of the bases).
        tau, min_rank, max_rank: truncation tolerance and rank bounds; default: the adapter's ``TuckerLoraConfig``.
        adaptive_scale: factor of the core's Adam direction: ``"auto"`` (:func:`auto_adaptive_scale`, per layer
            and step) or a number.
        adapter_name: the adapter to train; default: the model's active adapter.
        rank_warmup: steps at the initial ranks before the first rank decision (>= 0, default 0).
        rank_interval: a rank decision every this many steps after the warmup (>= 1, default 1).
        rank_headroom: ranks held between decisions, as a multiple of the decided ranks (>= 1, default 1); 2 lets
            candidate directions accumulate signal so that ranks can grow at small learning rates.
        basis_interval: the bases move (and ranks are decided) every this many steps (>= 1, default 1: every step);
            in between, only the cores take an Adam step, for all layers at once, and the basis gradients are summed.
        budget: largest number of adapter parameters (all layers' cores and factors) a rank decision may keep;
            default: the adapter config's ``budget`` (None: no global limit, only the per-layer tolerance).
        budget_schedule: ``[start, end]``, fractions of ``total_steps``: no global limit before ``start``, then the
            limit shrinks from the adapter's initial size to ``budget`` by ``end`` (:meth:`current_budget`);
            default: the adapter config's ``budget_schedule`` (None: ``budget`` from the first step).
        total_steps: the number of optimizer steps of the training, needed by ``budget_schedule``
            (:class:`~tucker_peft.TuckerLoraCallback` passes the Trainer's ``max_steps``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        direction: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        tau: float | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        adaptive_scale: float | str = "auto",
        adapter_name: str | None = None,
        rank_warmup: int = 0,
        rank_interval: int = 1,
        rank_headroom: int = 1,
        basis_interval: int = 1,
        budget: int | None = None,
        budget_schedule: list[float] | None = None,
        total_steps: int | None = None,
    ) -> None:
        _check_settings(
            direction,
            lr,
            betas,
            weight_decay,
            adaptive_scale,
            rank_warmup,
            rank_interval,
            rank_headroom,
            basis_interval,
        )
        inner = _unwrap(model)
        adapter_name = adapter_name or _active_adapter(inner)
        layers = list(iter_tucker_layers(inner, adapter_name))
        if not layers:
            raise ValueError(
                f"{type(inner).__name__} has no Tucker adapter named {adapter_name!r}: create one first with "
                "get_peft_model(model, TuckerLoraConfig(...)) or model.add_adapter(TuckerLoraConfig(...))."
            )
        config = _adapter_config(inner, adapter_name)
        tau = config.tau if tau is None else tau
        min_rank = config.min_rank if min_rank is None else min_rank
        max_rank = config.max_rank if max_rank is None else max_rank
        _check_ranks(tau, min_rank, max_rank)
        budget = config.budget if budget is None else budget
        if budget is not None:
            smallest = sum(_layer_size_at(layer, adapter_name, min_rank) for _, layer in layers)
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < smallest:
                raise ValueError(
                    f"`budget` must be an integer >= {smallest:,}, the adapter's size with every mode at min_rank="
                    f"{min_rank}; got {budget!r}. Raise the budget, lower min_rank or adapt fewer modules."
                )
        budget_schedule = config.budget_schedule if budget_schedule is None else budget_schedule
        if budget_schedule is not None:
            budget_schedule = check_budget_schedule(budget_schedule, budget)
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(
                    "`budget_schedule` is given in fractions of the training: pass total_steps=<number of optimizer "
                    f"steps> to tucker_peft.attach(...) or TuckerOptimizer(...) (TuckerLoraCallback takes it from the "
                    f"Trainer); got total_steps={total_steps!r}."
                )
        half = [name for name, layer in layers if layer.core(adapter_name).dtype == torch.float16]
        if half and direction == "adam":
            raise ValueError(
                f"The Tucker factors of {len(half)} layers (e.g. {half[0]!r}) are stored in float16: Adam's second "
                "moments underflow there and the adapter does not train. Keep the adapter in float32 (get_peft_model "
                "creates it so, also on fp16 models, unless autocast_adapter_dtype=False; train in mixed precision "
                "with torch.autocast or the Trainer's fp16=True rather than model.half()), or cast it back: for p in "
                "tucker_peft.tucker_parameters(model): "
                "p.data = p.data.float(). (direction='sgd' steps float16 factors.)"
            )
        for name, layer in layers:
            if _owner(layer.core(adapter_name)) is not None:
                raise RuntimeError(
                    f"The Tucker adapter {adapter_name!r} of {name!r} is already updated by another TuckerOptimizer; "
                    "two geometric updates of one adapter would each apply the step. Create one TuckerOptimizer per "
                    "adapter."
                )
        _refuse_frozen(layers, adapter_name)
        groups = [
            {
                "params": [layer.core(adapter_name), *layer.factors(adapter_name)],
                "name": name,
                "reference_size": lora_reference_size(layer, adapter_name),
            }
            for name, layer in layers
        ]
        defaults = dict(
            lr=lr,
            direction=direction,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            tau=tau,
            min_rank=min_rank,
            max_rank=max_rank,
            adaptive_scale=adaptive_scale,
            rank_warmup=rank_warmup,
            rank_interval=rank_interval,
            rank_headroom=rank_headroom,
            basis_interval=basis_interval,
        )
        super().__init__(groups, defaults)
        self.adapter_name = adapter_name
        self.budget = budget
        self.budget_schedule = budget_schedule
        self.total_steps = total_steps
        #: the adapter's size at its initial ranks (``r`` per layer), where a budget schedule starts
        self.initial_size = sum(_layer_size_at(layer, adapter_name, layer.r[adapter_name]) for _, layer in layers)
        self._layers: list[TuckerLayer] = [layer for _, layer in layers]
        for group in self.param_groups:
            for param in group["params"]:
                _OWNERS[param] = weakref.ref(self)
        for layer in self._layers:
            layer._ranks_adapt = True
        ensure_step_check()
        self.skipped_steps = 0
        self._groups: dict[tuple, _Groups] = {}  # by (sizes and ranks of a batch's layers, core dim, device, dtype)
        #: all-reduce the factor gradients and broadcast the rank decision (set by :func:`tucker_peft.attach` when
        #: training with DDP, whose own reduction must ignore the factors since their shapes change)
        self.distributed = False
        self._versions = self._param_versions()

    # ------------------------------------------------------------------------------------------------------------
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Current ranks per adapted layer."""
        return {g["name"]: layer.ranks(self.adapter_name) for g, layer in zip(self.param_groups, self._layers)}

    def layers(self) -> dict[str, TuckerLayer]:
        """The Tucker layers this update trains, by name (as in ``ranks()`` and ``module_ranks``)."""
        return {g["name"]: layer for g, layer in zip(self.param_groups, self._layers)}

    def current_budget(self, step: int) -> int | None:
        """The global limit a rank decision at optimizer step ``step`` (1-based) applies: ``budget``, or with
        ``budget_schedule = [start, end]`` none up to ``start * total_steps``, then ``budget + (S - budget) (1 - f)^3``
        with ``f`` the fraction of ``[start, end] * total_steps`` passed and ``S`` the adapter's initial size
        (AdaLoRA's cubic schedule), ``budget`` from ``end * total_steps`` on."""
        if self.budget_schedule is None:
            return self.budget
        start, end = (f * self.total_steps for f in self.budget_schedule)
        if step <= start:
            return None
        left = 1.0 - min(1.0, (step - start) / (end - start))
        return self.budget + max(0, int((self.initial_size - self.budget) * left**3))

    def num_adapter_parameters(self) -> int:
        """Current number of Tucker adapter parameters (cores and factors at their active ranks)."""
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One geometric update of every Tucker layer that has gradients (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self.check_active_adapter()
        for group in self.param_groups:
            if not (math.isfinite(group["lr"]) and group["lr"] >= 0):
                raise ValueError(
                    f"TuckerOptimizer: the learning rate of {group['name']!r} is {group['lr']}, not a finite number "
                    ">= 0; check the learning-rate scheduler."
                )
        self._check_not_modified_elsewhere()
        if self.distributed:
            self._all_reduce_gradients()
        # layers with equal shapes, settings and step count are updated together (batched SVD/QR)
        batches: dict[tuple, list[tuple[dict, TuckerLayer]]] = {}
        core_only: list[dict] = []  # layers whose bases do not move this step (basis_interval)
        for group, layer in zip(self.param_groups, self._layers):
            core, *factors = group["params"]
            if core.grad is None or any(u.grad is None for u in factors):
                continue  # no gradient this step: leave the layer as it is
            state = self.state[core]
            if (state.get("step", 0) + 1) % group["basis_interval"]:
                core_only.append(group)
                continue
            # (the reference size only sets a per-layer factor of the core's step)
            settings = tuple(
                (k, repr(v)) for k, v in sorted(group.items()) if k not in ("params", "name", "reference_size")
            )
            # matrix layers of any shapes and ranks may share a batch (_padded_batches); other layers need equal shapes
            shapes = "matrix" if core.dim() == 2 and len(factors) == 2 else tuple(p.shape for p in group["params"])
            key = (shapes, core.dtype, core.device, settings, state.get("step", 0), state.get("lr_sum", 0.0))
            batches.setdefault(key, []).append((group, layer))
        if not batches and not core_only:
            return loss
        plans = [self._augment(part) for members in batches.values() for part in _padded_batches(members)]
        core_steps = self._core_steps(core_only) if core_only else None

        # the one host synchronisation of the step: finiteness and every layer's singular values
        flags = [plan.finite.all() for plan in plans] + ([core_steps.finite] if core_steps else [])
        device_values = [torch.stack(flags).to(plans[0].norm.dtype if plans else torch.float32)]
        for plan in plans:
            device_values.append(plan.rank_norm)
            device_values.extend(sigma.reshape(-1) for sigma in plan.rank_sigmas)
        values = torch.cat(device_values)
        if self.distributed:  # every process takes the rank decisions of process 0
            torch.distributed.broadcast(values, src=0)
        values = values.cpu().tolist()
        if not all(v == 1.0 for v in values[: len(flags)]):
            self.skipped_steps += 1
            warnings.warn(
                "TuckerOptimizer: non-finite values (inf/NaN) in the gradients of the Tucker factors or in the updated "
                "factors (is the learning rate far too large?); the step is skipped for all layers and their factors "
                "are unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        pos = len(flags)
        decisions = []
        for plan in plans:
            size = len(plan.members)
            norms = values[pos : pos + size]
            pos += size
            sigmas = []
            for sigma in plan.rank_sigmas:
                k = sigma.shape[1]
                own = plan.available or [k] * size  # a padded layer's own singular values come first
                sigmas.append([values[pos + b * k : pos + b * k + own[b]] for b in range(size)])
                pos += size * k
            decisions.append(self._rank_decisions(plan, norms, sigmas))
        budget = self.current_budget(max(plan.step for plan in plans)) if plans else None
        if budget is not None and any(plan.decide for plan in plans):
            self._fit_budget(plans, decisions, budget)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        if core_steps is not None:
            copies.extend(core_steps.copies)
            for state, key, value in core_steps.assign:
                state[key] = value
        for plan, decision in zip(plans, decisions):
            self._truncate(plan, decision, copies)
        if copies:  # every parameter and moment that kept its shape, in one op
            destinations, sources = zip(*copies)
            torch._foreach_copy_(list(destinations), list(sources))
        self._versions = self._param_versions()
        return loss

    def release(self) -> None:
        """Give up the factors: another TuckerOptimizer (or :func:`tucker_peft.attach`) may then update them."""
        for group in self.param_groups:
            for param in group["params"]:
                if _owner(param) is self:
                    del _OWNERS[param]
        for layer in self._layers:  # (another adapter of the layer may still be trained by another update)
            layer._ranks_adapt = any(
                _owner(p) is not None for a in layer.tucker_core for p in (layer.core(a), *layer.factors(a))
            )

    def check_active_adapter(self) -> None:
        """Refuse to step when another Tucker adapter that no TuckerOptimizer trains is active (after
        ``set_adapter``): it would get gradients that nothing applies."""
        layer = self._layers[0]
        if self.adapter_name in layer.active_adapters:
            return
        for name in layer.active_adapters:
            if name in layer.tucker_core and _owner(layer.core(name)) is None:
                raise RuntimeError(
                    f"The Tucker adapter {name!r} is active, but this geometric update trains {self.adapter_name!r}, "
                    f"so {name!r} would not be trained. Call set_adapter({name!r}) before creating the optimizer "
                    f"(and tucker_peft.attach), or give {name!r} its own TuckerOptimizer(model, adapter_name="
                    f"{name!r}), or switch back with set_adapter({self.adapter_name!r})."
                )

    def _param_versions(self) -> list[int]:
        return [p._version for g in self.param_groups for p in g["params"]]

    def _check_not_modified_elsewhere(self) -> None:
        """Refuse to go on when another optimizer has moved the factors off the manifold since our last step.

        Only checked when a factor's version counter changed (loading a checkpoint also changes it, but keeps the
        bases orthonormal), so a correct setup pays nothing.
        """
        if self._param_versions() == self._versions:
            return
        for group in self.param_groups:
            for u in group["params"][1:]:
                gram = u.detach().T @ u.detach()
                if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), atol=1e-3):
                    raise RuntimeError(
                        f"The orthonormal factors of {group['name']!r} were changed outside TuckerOptimizer (U^T U != I): "
                        "another optimizer holds them. Build the base optimizer from "
                        "tucker_peft.non_tucker_parameters(model), or call tucker_peft.attach(optimizer, model), "
                        "which takes the factors away from it."
                    )
        self._versions = self._param_versions()

    def _all_reduce_gradients(self) -> None:
        """Average the factor gradients over processes (one collective), keeping "no gradient" where no process had
        one."""
        import torch.distributed as dist

        params = [p for g in self.param_groups for p in g["params"]]
        ref = params[0]
        has = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
        flat = torch.cat([has, *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]])
        dist.all_reduce(flat)
        world = dist.get_world_size()
        counts, offset = flat[: len(params)].tolist(), len(params)
        for p, count in zip(params, counts):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p) / world if count > 0 else None
            offset += n

    def _augment(self, members: list[tuple[dict, TuckerLayer]]) -> _Batch:
        """Phase 1 for a batch of layers, on the device: directions, moments, augmented bases and cores, SVDs of
        ``Ct``.  The cores are stacked along a leading dimension ``B``, the factors per group of equal size
        (:class:`_Groups`).  Nothing is written to the layers or the optimizer state here."""
        group = members[0][0]
        member_ranks = [[u.shape[1] for u in g["params"][1:]] for g, _ in members]
        first = group["params"][0]
        sizes = tuple(tuple(u.shape[0] for u in g["params"][1:]) for g, _ in members)
        key = (sizes, tuple(map(tuple, member_ranks)), first.dim(), first.device, first.dtype)
        # the step computes in float64 where the device has it (geometry.work_dtype); the results are cast back on
        # their write to the parameters and moments
        work = geometry.work_dtype(first.dtype, first.device)
        groups = self._groups.get(key)
        if groups is None:
            if len(self._groups) > 64:
                self._groups.clear()
            like = first.new_empty((0,) * first.dim(), dtype=work)
            groups = self._groups[key] = _Groups(list(sizes), [tuple(r) for r in member_ranks], like)
        padding = groups.padding

        def stack(lists: list[list[torch.Tensor]], pad: _Padding | None, factors: bool) -> list[torch.Tensor]:
            # per list: one tensor of every layer (cores) or slot (factors), stacked (padded with ``pad``)
            if pad is not None:
                return pad.factors(lists) if factors else pad.cores(lists)
            flat = torch.stack([t for tensors in lists for t in tensors]).to(work)
            return list(flat.unflatten(0, (len(lists), len(lists[0]))).unbind(0))

        states = [self.state[g["params"][0]] for g, _ in members]  # the core's state holds step and decided ranks
        # with basis_interval, the gradients of the factors summed since the last move of the bases
        count = states[0].get("core_steps", 0) + 1 if group["basis_interval"] > 1 else 1
        stacked = []
        params = [[g["params"][0] for g, _ in members]]  # the cores, then the factors of every group
        params += [[members[b][0]["params"][1 + i] for b, i in slots] for slots in groups.slots]
        for index, ps in enumerate(params):
            lists = [list(ps), [p.grad for p in ps]]
            # (with basis_interval, a core has moments from its own steps before its bases have any)
            with_moments = group["direction"] == "adam" and "exp_avg" in self.state[ps[0]]
            if with_moments:
                lists += [[self.state[p]["exp_avg"] for p in ps], [self.state[p]["exp_avg_sq"] for p in ps]]
            if index > 0 and count > 1:
                lists.append([self.state[p]["grad_sum"] for p in ps])
            pad = padding if index == 0 or padding is None else groups.paddings[index - 1]
            batch = stack(lists, pad, index > 0)
            stacked.append(
                _Stacked(
                    param=batch[0],
                    grad=batch[1],
                    exp_avg=batch[2] if with_moments else None,
                    exp_avg_sq=batch[3] if with_moments else None,
                    grad_sum=batch[-1] if index > 0 and count > 1 else None,
                )
            )
        core, *factors = (t.param for t in stacked)  # factors: per group (B_g, n_g, width)
        d = groups.modes
        lam = group["lr"]
        # cutoffs of the stored precision: what lies below them is round-off of the stored factors
        rcond = geometry.default_rcond(first.dtype)
        rel_eps = 10 * torch.finfo(first.dtype).eps
        g_core, *g_factors = (t.grad for t in stacked)
        old = [u.shape[2] for u in factors]
        step = states[0].get("step", 0) + 1
        basis_step = None
        lam_bases = lam
        if group["basis_interval"] > 1:
            # the bases move once for the steps since their last move: by the mean of those steps' gradients and the
            # sum of their learning rates (the cores took their own steps in between, _core_steps)
            basis_step = states[0].get("basis_step", 0) + 1
            lam_bases = lam + states[0].get("lr_sum", 0.0)
            if count > 1:
                g_factors = [(t.grad_sum + grad) / count for t, grad in zip(stacked[1:], g_factors)]
        if core.dim() == 3 and d == 2:  # matrix cores: one SVD for both modes, in the mode-major order (2B, ...)
            polars = geometry.matrix_polars(core, rcond, padding.padded if padding is not None else None)
        else:
            polars = [list(t) for t in zip(*(geometry.unfolding_polar(core, i, rcond) for i in range(d)))]
        q, r_pinv = ([groups.pick(t, g) for g in range(len(factors))] for t in polars)  # per group
        k_grads = [geometry.k_gradient(grad, p) for grad, p in zip(g_factors, r_pinv)]

        moments = None
        if group["direction"] == "adam":
            # Adam for C and the K_i of every group at once (foreach ops); moments in torch's layout,
            # state[param]["exp_avg"], ...
            beta1 = group["betas"][0]
            # only the part of a K-step orthogonal to U reaches the update (the part inside span(U) is the core's
            # step), so the moments see only that part: the in-span gradient would inflate the second moment
            normal = [k - u @ (u.transpose(-1, -2) @ k) for u, k in zip(factors, k_grads)]
            grads = [g_core, *normal]
            # the moments of K are updated once per move of the bases (basis_interval)
            steps = [step] + [basis_step or step] * len(factors)
            m = [t.exp_avg if t.exp_avg is not None else torch.zeros_like(g) for t, g in zip(stacked, grads)]
            v = [t.exp_avg_sq if t.exp_avg_sq is not None else torch.zeros_like(g) for t, g in zip(stacked, grads)]
            m, v, directions = _foreach_adam(m, v, grads, group["betas"], group["eps"], steps)
            torch._foreach_mul_(directions, [1 / (1 - beta1**t) for t in steps])
            moments = list(zip(m, v))
            dir_core, *dir_factors = directions
            scale = group["adaptive_scale"]
            if scale == "auto":  # per layer, at its decided ranks (candidate directions do not dilute the step)
                scale = core.new_tensor([_core_scale(g, st) for (g, _), st in zip(members, states)])
                scale = scale.reshape(-1, *([1] * d), *([1] * (core.dim() - d - 1)))
            dir_core = dir_core * scale
        else:
            dir_core, dir_factors = g_core, k_grads

        old_block = core - lam * dir_core
        if group["weight_decay"]:
            old_block = old_block - lam * group["weight_decay"] * core
        k_steps = [-lam_bases * direction for direction in dir_factors]
        step_norms = [torch.linalg.norm(k.flatten(1), dim=1) for k in k_steps]
        # non-finite gradients (fp16 overflow) make these norms non-finite (inf and NaN propagate through every op
        # above), and a step whose result might not fit the stored dtype (an absurd learning rate) makes one of them
        # larger than its largest number over d + 1 (a layer's new core has at most the norm of its old block plus
        # its d K-steps); such a step is discarded (for every layer).  Bounded norms (sums of squares) also keep
        # the QRs and SVDs below from overflowing.
        norms = torch.cat([torch.linalg.norm(old_block.flatten(1), dim=1), *step_norms])
        finite = norms.max() <= torch.finfo(first.dtype).max / (d + 1)  # (False for NaN)

        def sanitize(t: torch.Tensor) -> torch.Tensor:
            # non-finite values become zeros so that nothing below fails; the step is then discarded
            return torch.where(finite, t, 0.0)

        old_block, *k_steps = (sanitize(t) for t in (old_block, *k_steps))
        new_blocks, augmented = [], []
        for g, (u, qq, k_step, step_norm) in enumerate(zip(factors, q, k_steps, step_norms)):
            order = groups.paddings[g].order if padding is not None else None
            u_aug, block = geometry.new_directions(u, k_step, step_norm, qq, rel_eps, order)
            new_blocks.append(block)
            augmented.append(u_aug)
        new_blocks = groups.to_modes(new_blocks)
        ct = geometry.augmented_core(old_block, new_blocks, d)
        svds = geometry.mode_svds(ct, d)
        norm = torch.linalg.norm(ct.flatten(1), dim=1)
        rank_norm, rank_sigmas = norm, [sigma for _, sigma in svds]
        if count > 1:
            # the new directions carry the steps of the whole interval; they are judged at one step's size, as with
            # basis_interval 1 (at k times that size more of them clear the tolerance and the ranks grow)
            judged = geometry.augmented_core(old_block, [b / count for b in new_blocks], d)
            rank_norm = torch.linalg.norm(judged.flatten(1), dim=1)
            rank_sigmas = geometry.mode_singular_values(judged, d)
        return _Batch(
            members=members,
            groups=groups,
            finite=finite,
            ct=ct,
            factors=augmented,
            svds=svds,
            norm=norm,
            rank_norm=rank_norm,
            rank_sigmas=rank_sigmas,
            step=step,
            moments=moments,
            old_ranks=old,
            member_ranks=member_ranks,
            # a layer's own augmented core has r_b + min(r_b, n - r_b) rows and columns (= 2 r_b: n >= 2 width)
            available=[2 * r[0] for r in member_ranks] if padding is not None else None,
            decided=[st.get("decided_ranks") for st in states],
            # a decision is due when one of its steps (every rank_interval after rank_warmup) lies since the last
            # move of the bases (with basis_interval 1: this step)
            decide=lam_bases > 0
            and step > group["rank_warmup"]
            and (step - group["rank_warmup"]) // group["rank_interval"]
            > (step - group["basis_interval"] - group["rank_warmup"]) // group["rank_interval"],
            frozen=lam_bases == 0,
            basis_step=basis_step,
        )

    def _core_steps(self, groups: list[dict]) -> _CoreSteps:
        """A step of the cores alone for the layers whose bases do not move this step (``basis_interval``): the
        same Adam (or SGD) step of ``C`` as in :meth:`_augment`, for all layers at once (``torch._foreach`` ops, no
        per-layer ops), and the basis gradients added to their sums for the next move.  Nothing is written here."""
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        assign: list[tuple[dict, str, Any]] = []
        checked: list[torch.Tensor] = []
        by_settings: dict[tuple, list[dict]] = {}
        for group in groups:
            by_settings.setdefault((group["direction"], group["betas"], group["eps"]), []).append(group)
        for (direction, (beta1, beta2), eps), members in by_settings.items():
            cores = [g["params"][0] for g in members]
            grads = [c.grad for c in cores]
            states = [self.state[c] for c in cores]
            steps = [st.get("step", 0) + 1 for st in states]
            if direction == "adam":
                m = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(c) for st, c in zip(states, cores)]
                v = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(c) for st, c in zip(states, cores)]
                m, v, update = _foreach_adam(m, v, grads, (beta1, beta2), eps, steps)
                step_sizes = [
                    -g["lr"] * _core_scale(g, st) / (1 - beta1**s) for g, st, s in zip(members, states, steps)
                ]
                torch._foreach_mul_(update, step_sizes)
                for st, m_new, v_new in zip(states, m, v):
                    if "exp_avg" in st:
                        copies.extend(((st["exp_avg"], m_new), (st["exp_avg_sq"], v_new)))
                    else:
                        assign.extend(((st, "exp_avg", m_new), (st, "exp_avg_sq", v_new)))
            else:
                update = torch._foreach_mul(grads, [-g["lr"] for g in members])
            if any(g["weight_decay"] for g in members):
                new = torch._foreach_mul(cores, [1 - g["lr"] * g["weight_decay"] for g in members])
                torch._foreach_add_(new, update)
            else:
                new = torch._foreach_add(cores, update)
            copies.extend(zip(cores, new))
            checked.extend(new)
            factors = [u for g in members for u in g["params"][1:]]
            factor_grads = [u.grad for u in factors]
            checked.extend(factor_grads)
            sums = [self.state[u].get("grad_sum") for u in factors]
            if all(t is not None for t in sums):
                copies.extend(zip(sums, torch._foreach_add(sums, factor_grads)))
            else:  # the first core step after a move of the bases: new sums, one op for all layers
                if any(t is not None for t in sums):  # (only a layer that had no gradient for a while)
                    factor_grads = [g if t is None else g + t for g, t in zip(factor_grads, sums)]
                new_sums = torch._foreach_mul(factor_grads, 1.0)
                assign.extend((self.state[u], "grad_sum", t) for u, t in zip(factors, new_sums))
            for g, st, s in zip(members, states, steps):
                assign.extend(
                    (
                        (st, "step", s),
                        (st, "lr_sum", st.get("lr_sum", 0.0) + g["lr"]),
                        (st, "core_steps", st.get("core_steps", 0) + 1),
                    )
                )
        # (norms in at least float32: those of fp16 tensors would overflow before their entries do)
        wide = functools.reduce(torch.promote_types, {t.dtype for t in checked}, torch.float32)
        finite = torch.isfinite(torch.stack(torch._foreach_norm(checked, 2, dtype=wide))).all()
        return _CoreSteps(finite=finite, copies=copies, assign=assign)

    def _rank_decisions(self, plan: _Batch, norms: list[float], sigmas: list[list[list[float]]]) -> list[_Decision]:
        """Per layer of a batch: the ranks to keep (host arithmetic on the synchronised singular values).

        Three kinds of steps: a rank decision (ranks by the tolerance ``tau``), a step between decisions (ranks held
        at the working rank ``min(headroom * decided, max_rank)``, the leading singular directions kept), and a step
        that carries no information about ranks (``lr = 0`` or a zero augmented core): the old directions are kept
        as they are (identity projections), so neither the ranks nor the moments change."""
        dense = tuple(plan.ct.shape[plan.groups.modes + 1 :])
        out = []
        for b, (group, layer) in enumerate(plan.members):
            decided = plan.decided[b] or plan.member_ranks[b]
            frozen = plan.frozen or not norms[b] > 0
            layer_sigmas = [per_mode[b] for per_mode in sigmas]
            if frozen:
                ranks = plan.member_ranks[b]
            elif plan.decide:
                ranks = decided = geometry.truncation_ranks(
                    layer_sigmas, group["tau"] * norms[b], group["min_rank"], group["max_rank"], dense
                )
            else:
                ranks = geometry.valid_working_ranks(
                    [min(group["rank_headroom"] * r, group["max_rank"]) for r in decided],
                    [len(s) for s in layer_sigmas],
                    dense,
                )
            out.append(
                _Decision(
                    layer=layer,
                    ranks=list(ranks),
                    decided=list(decided),
                    frozen=frozen,
                    decide=plan.decide and not frozen,
                    sigmas=layer_sigmas,
                    dense=dense,
                    min_rank=group["min_rank"],
                )
            )
        return out

    def _fit_budget(self, plans: list[_Batch], decisions: list[list[_Decision]], budget: int) -> None:
        """Global rank decision under ``budget``: while the adapter would exceed it, drop the direction with the
        smallest singular value times the layer's scale (its share of ``||s dW||``) among all deciding layers."""
        records = [rec for plan_decisions in decisions for rec in plan_decisions]
        deciding = {id(rec.layer) for rec in records}
        fixed = sum(
            _layer_size(layer, self.adapter_name, layer.ranks(self.adapter_name))
            for layer in self._layers
            if id(layer) not in deciding
        )
        # mode sizes once per layer: the greedy loop below recomputes a layer's size after every rank it drops
        shapes = [rec.layer.mode_sizes(self.adapter_name) for rec in records]
        sizes = [_size_at(n, rec.dense, rec.ranks) for n, rec in zip(shapes, records)]
        total = fixed + sum(sizes)
        scales = [rec.layer.scaling[self.adapter_name] for rec in records]
        # one entry per droppable mode: (share of the direction that would go, layer, mode, rank it has now); a
        # mode whose rank changes gets a new entry and its old one is skipped when popped (lazy deletion)
        heap = [
            (scales[index] * rec.sigmas[mode][r - 1], index, mode, r)
            for index, rec in enumerate(records)
            if rec.decide
            for mode, r in enumerate(rec.ranks)
            if r > rec.min_rank
        ]
        heapq.heapify(heap)
        while total > budget and heap:
            _, index, mode, r = heapq.heappop(heap)
            rec = records[index]
            if rec.ranks[mode] != r:  # stale entry: this mode changed since
                continue
            ranks = list(rec.ranks)
            ranks[mode] -= 1
            before = rec.ranks
            rec.ranks = rec.decided = geometry.valid_working_ranks(ranks, [len(s) for s in rec.sigmas], rec.dense)
            new_size = _size_at(shapes[index], rec.dense, rec.ranks)
            total += new_size - sizes[index]
            sizes[index] = new_size
            for m, (old, now) in enumerate(zip(before, rec.ranks)):
                if now != old and now > rec.min_rank:
                    heapq.heappush(heap, (scales[index] * rec.sigmas[m][now - 1], index, m, now))

    def _truncate(
        self, plan: _Batch, decisions: list[_Decision], copies: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Phase 2 for a batch: the factors, core and moments are projected on all singular vectors at once
        (batched), then each layer keeps its leading ``decisions[b].ranks`` of them (identity projections for a
        frozen layer, :meth:`_rank_decisions`).

        Only the singular vectors some layer keeps are applied.  Every layer's tensors are cut from the batch with one
        strided view per distinct ranks (per group of factors with their moments, and for the cores with theirs,
        :func:`_cut_corners`), and a
        parameter or moment whose shape does not change is only appended to ``copies`` (destination, source): the
        caller writes all of them with one ``torch._foreach_copy_``, so a step adds no per-layer ops unless ranks
        change.  A layer whose ranks change gets new tensors (:meth:`TuckerLayer.set_factors`)."""
        ct, groups = plan.ct, plan.groups
        frozen = [rec.frozen for rec in decisions]
        ranks = [tuple(rec.ranks) for rec in decisions]
        # only the leading singular vectors that some layer keeps (per mode; one width for all when groups mix modes)
        keep = [max(r[i] for r in ranks) for i in range(groups.modes)]
        if not groups.identity:
            keep = [max(keep)] * groups.modes
        projections = [p[..., :k] for (p, _), k in zip(plan.svds, keep)]
        if any(frozen):
            mask = torch.tensor(frozen, device=ct.device)[:, None, None]
            projections = [
                torch.where(mask, torch.eye(p.shape[1], p.shape[2], dtype=p.dtype, device=p.device), p)
                for p in projections
            ]
        # per group, the projections of its slots (matrix cores: all of one shape, taken from the mode-major order)
        per_mode = torch.cat(projections) if not groups.identity else projections
        group_projections = [groups.pick(per_mode, g) for g in range(len(plan.factors))]
        core, _ = geometry.truncate(ct, [], projections)
        factors = [u @ p for u, p in zip(plan.factors, group_projections)]
        moments = self._transport_moments(plan.moments, projections, group_projections, plan.old_ranks)
        # per parameter (C, U_0, ...): every layer's tensor cut to its ranks; moments likewise (views)
        window = tuple(core.shape[1 + groups.modes :])
        cores = _cut_corners([core, *(moments[0] if moments is not None else ())], [(*r, *window) for r in ranks])
        per_param = [cores[0]] + [[None] * len(ranks) for _ in range(groups.modes)]
        per_moment = [(cores[1], cores[2])] if moments is not None else []
        per_moment += [([None] * len(ranks), [None] * len(ranks)) for _ in range(groups.modes if moments else 0)]
        for g, (factor, slots) in enumerate(zip(factors, groups.slots)):
            n = factor.shape[1]
            cut = _cut_corners(
                [factor, *(moments[1 + g] if moments is not None else ())], [(n, ranks[b][i]) for b, i in slots]
            )
            for j, (b, i) in enumerate(slots):
                per_param[1 + i][b] = cut[0][j]
                if moments is not None:
                    per_moment[1 + i][0][b], per_moment[1 + i][1][b] = cut[1][j], cut[2][j]
        for j, ((group, layer), rec) in enumerate(zip(plan.members, decisions)):
            params = group["params"]
            new = [t[j] for t in per_param]
            if all(p.shape == n.shape for p, n in zip(params, new)):
                copies.extend(zip(params, new))
                for p in params:
                    p.grad = None
            else:
                layer.set_factors(self.adapter_name, new[0], new[1:])
            for index, param in enumerate(params):
                old = self.state.get(param, {})
                state = {"step": plan.step, "decided_ranks": list(rec.decided)} if index == 0 else {}
                if index == 0 and plan.basis_step is not None:
                    state["basis_step"] = plan.basis_step
                if per_moment:
                    m, v = per_moment[index][0][j], per_moment[index][1][j]
                    if old.get("exp_avg") is not None and old["exp_avg"].shape == m.shape:
                        copies.extend(((old["exp_avg"], m), (old["exp_avg_sq"], v)))
                        state["exp_avg"], state["exp_avg_sq"] = old["exp_avg"], old["exp_avg_sq"]
                    else:
                        state["exp_avg"] = m.to(param.dtype, copy=True)
                        state["exp_avg_sq"] = v.to(param.dtype, copy=True)
                self.state[param] = state

    @staticmethod
    def _transport_moments(
        moments: list[tuple[torch.Tensor, torch.Tensor]] | None,
        projections: list[torch.Tensor],
        group_projections: list[torch.Tensor],
        old_ranks: list[int],
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Carry a batch of Adam moments (of ``C``, then of ``K`` per group of factors) to the coordinates of the
        truncated factors, before the per-layer cut.

        Augmentation pads with zeros (new directions have no history); truncation applies the same ``P_i`` as the
        factors: ``m <- m P_i``, ``m_C <- m_C x_i P_i^T``, and for second moments the mixing form with ``P_i * P_i``
        (elementwise square).  ``projections`` ``(B, rt_i, k_i)`` per mode and ``group_projections`` the same per
        group of factors, moments ``(B, ...)`` at the old ranks (``old_ranks``: per group).
        """
        if moments is None:
            return None
        # the zero padding of the new directions meets the rows of P_i below the old ranks only: those rows suffice
        modes = [p[:, : moments[0][0].shape[1 + i]] for i, p in enumerate(projections)]
        groups = [p[:, :r] for p, r in zip(group_projections, old_ranks)]
        core_m, core_v = moments[0]
        out = [(geometry.truncate(core_m, [], modes)[0], geometry.truncate(core_v, [], [p * p for p in modes])[0])]
        for (m, v), p in zip(moments[1:], groups):
            out.append((m @ p, v @ (p * p)))
        return out

    # ------------------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load moments and step count; refuses state whose shapes disagree with the current ranks.

        A state saved by an older version is migrated: without the rank-schedule settings it gets this optimizer's;
        with all moments in the core's entry (``exp_avg_core``, ``exp_avg_K0``, ...) they move to torch's layout
        (``state[param]["exp_avg"]``, ``["exp_avg_sq"]`` for ``C`` and each ``U_i``)."""
        super().load_state_dict(_migrate_state_dict(state_dict))
        for group, layer in zip(self.param_groups, self._layers):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("reference_size", lora_reference_size(layer, self.adapter_name))
        problems = []
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                for key, value in self.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                        name = "C" if index == 0 else f"U_{index - 1}"
                        problems.append(
                            f"{group['name']}: {key} of {name} {tuple(value.shape)} vs {tuple(param.shape)}"
                        )
        if problems:
            raise ValueError(
                "The optimizer state does not match the current ranks of the adapter:\n  "
                + "\n  ".join(problems[:5])
                + "\nLoad the adapter weights saved at the same step (e.g. the same checkpoint) before the optimizer state."
            )


def _foreach_adam(
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    grads: list[torch.Tensor],
    betas: tuple[float, float],
    eps: float,
    steps: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Adam for a list of tensors in one set of ``torch._foreach`` ops: the new moments (the old ones are not
    modified) and the directions ``m / (sqrt(v / (1 - beta2^t)) + eps)``, without ``m``'s bias correction
    ``1 / (1 - beta1^t)``, which the caller folds into its step sizes."""
    beta1, beta2 = betas
    m = torch._foreach_mul(exp_avg, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    v = torch._foreach_mul(exp_avg_sq, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denominators = torch._foreach_div(v, [1 - beta2**t for t in steps])
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, eps)
    return m, v, torch._foreach_div(m, denominators)


def _cut_corners(batches: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[list[torch.Tensor]]:
    """Per batched tensor ``(B, ...)`` (a core or a group of factors, and its moments: all of one shape), every layer's
    leading corner of shape ``shapes[b]`` (views: a core cut to its ranks, a factor ``(n, k)`` to its ``r_b``
    columns).  The tensors are stacked and the layers sorted by their shapes (one gather, none when they are sorted
    already), then each run of equal shapes is cut with one strided view and ``unbind``."""
    size = len(shapes)
    order = sorted(range(size), key=shapes.__getitem__)
    stacked = torch.stack(batches, dim=1)  # (B, T, ...)
    if order != list(range(size)):
        stacked = stacked.index_select(0, _order_index(tuple(order), stacked.device))
    out: list[list[Any]] = [[None] * size for _ in batches]
    start = 0
    while start < size:
        shape = shapes[order[start]]
        end = start
        while end < size and shapes[order[end]] == shape:
            end += 1
        # the layers [start, end) of every tensor, cut (one strided view: B and T merge, stacked is contiguous)
        offset = stacked.storage_offset() + start * stacked.stride(0)
        views = stacked.as_strided(((end - start) * len(batches), *shape), stacked.stride()[1:], offset).unbind(0)
        for j, b in enumerate(order[start:end]):
            for t, per_layer in enumerate(out):
                per_layer[b] = views[j * len(batches) + t]
        start = end
    return out


@functools.lru_cache(maxsize=256)
def _order_index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(order, device=device)


def _padded_batches(members: list[tuple[dict, TuckerLayer]]) -> list[list[tuple[dict, TuckerLayer]]]:
    """The batches for layers of equal settings (matrix layers of any shapes, other layers of equal shapes): one batch,
    its factors in groups of equal sizes (:class:`_Groups`) and zero-padded to the largest rank where the ranks differ,
    when that is exact: all layers have the same shapes and ranks, or every factor has at least twice the largest rank
    in rows (then every layer's augmented core is ``2 r_b`` wide and the padding is exact, :class:`_Padding`); else one
    batch per shapes and ranks."""
    ranks = [tuple(u.shape[1] for u in g["params"][1:]) for g, _ in members]
    sizes = [tuple(u.shape[0] for u in g["params"][1:]) for g, _ in members]
    width = max(max(r) for r in ranks)
    if (len(set(ranks)) == 1 and len(set(sizes)) == 1) or all(n >= 2 * width for s in sizes for n in s):
        return [members]
    by_shape: dict[tuple, list] = {}
    for member, r, s in zip(members, ranks, sizes):
        by_shape.setdefault((r, s), []).append(member)
    return list(by_shape.values())


def _migrate_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An older ``TuckerOptimizer.state_dict()`` (every moment in the core's entry, keys ``exp_avg_core``,
    ``exp_avg_sq_K0``, ...) in torch's layout; a current one is returned as it is."""
    state = state_dict.get("state", {})
    if not any(isinstance(st, dict) and "exp_avg_core" in st for st in state.values()):
        return state_dict
    migrated = dict(state)
    for group in state_dict["param_groups"]:
        core_index, *factor_indices = group["params"]
        old = state.get(core_index)
        if not old or "exp_avg_core" not in old:
            continue
        migrated[core_index] = {k: v for k, v in old.items() if not k.startswith("exp_avg")}
        migrated[core_index].update(exp_avg=old["exp_avg_core"], exp_avg_sq=old["exp_avg_sq_core"])
        for i, index in enumerate(factor_indices):
            migrated[index] = {"exp_avg": old[f"exp_avg_K{i}"], "exp_avg_sq": old[f"exp_avg_sq_K{i}"]}
    return {**state_dict, "state": migrated}


def _core_scale(group: dict, state: dict) -> float:
    """Factor of a layer's core Adam direction (``adaptive_scale``; ``"auto"``: :func:`auto_adaptive_scale` at the
    decided ranks, so that candidate directions held between decisions do not dilute the step)."""
    scale = group["adaptive_scale"]
    if scale != "auto":
        return scale
    core, *factors = group["params"]
    ranks = state.get("decided_ranks", [u.shape[1] for u in factors])
    return auto_adaptive_scale(group["reference_size"], math.prod(ranks) * math.prod(core.shape[len(factors) :]))


def _size_at(mode_sizes, window, ranks) -> int:
    """Parameters of a Tucker adapter with factorized modes ``mode_sizes`` at ``ranks`` and a dense core
    ``window``: core and factors."""
    return math.prod(ranks) * math.prod(window) + sum(n * r for n, r in zip(mode_sizes, ranks))


def _layer_size(layer: TuckerLayer, adapter_name: str, ranks) -> int:
    """Parameters of a Tucker adapter on ``layer`` at ``ranks``: core (with its dense window) and factors."""
    core, factors = layer.core(adapter_name), layer.factors(adapter_name)
    return _size_at([u.shape[0] for u in factors], core.shape[len(factors) :], ranks)


def _layer_size_at(layer: TuckerLayer, adapter_name: str, rank: int) -> int:
    """Parameters of the adapter on ``layer`` with every mode at ``rank`` (clipped to the valid ranks)."""
    factors = layer.factors(adapter_name)
    window = layer.core(adapter_name).shape[len(factors) :]
    ranks = valid_tucker_ranks([min(rank, u.shape[0]) for u in factors], window)
    return _layer_size(layer, adapter_name, ranks)


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"`lr` must be a finite number >= 0; got {lr}.")


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    if isinstance(active, (list, tuple)) and active:
        return active[0]
    for _, layer in iter_tucker_layers(model):
        return layer.active_adapters[0]
    return "default"


def _adapter_config(model: nn.Module, adapter_name: str):
    from .config import TuckerLoraConfig

    configs = getattr(model, "peft_config", {}) or {}
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    return config if isinstance(config, TuckerLoraConfig) else TuckerLoraConfig()
