"""Tucker adapter layers: ``W = W0 + s * C x_0 U_0 ... x_{d-1} U_{d-1}`` on Linear, transformers' Conv1D and ConvNd.

The layer owns, per adapter, a core ``tucker_core[adapter]`` and one orthonormal factor ``tucker_U{i}[adapter]``
per factorized mode ``i`` (docs/algorithm.md §1).  Modes are always ordered ``(out, in, window...)``:

- ``nn.Linear`` / ``Conv1D``: factors ``U0`` (out x r0), ``U1`` (in x r1), core ``(r0, r1)``;
  ``dW = U0 C U1^T`` in ``(out, in)`` layout (transposed for ``Conv1D``, whose weight is stored in x out).
- ``nn.ConvNd``, ``conv_mode="channels"``: factors ``U0`` (out), ``U1`` (in), core ``(r0, r1, k_1, ..., k_N)``
  with the kernel window dense.  ``conv_mode="full"``: also ``U2..`` (k_j x r_j), core ``(r0, r1, r2, ...)``.

Rank changes (the geometric update) are done *in place*: :meth:`TuckerLayer.set_factors` assigns new tensors of
any rank to ``param.data`` of the existing ``nn.Parameter`` objects.  We chose this over a fixed capacity with an
active rank because (a) the forward pass then never slices or masks, so it costs exactly what the active rank costs,
(b) memory follows the active rank, (c) ``state_dict`` and the saved adapter hold the active ranks with no extra
bookkeeping, and (d) the Parameter objects keep their identity, so every reference to them (the integrator's state,
a parameter list handed to an optimizer, ``named_parameters``) stays valid.  The Tucker factors are not meant to be
stepped by a ``torch.optim`` optimizer (the geometric update owns them and their moments), so no optimizer state of
the old shape can go stale.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .tensor_ops import mode_dot, multi_mode_dot, orthonormal, tucker_to_tensor, valid_tucker_ranks

MAX_MODES = 5  # Conv3d in "full" mode: out, in, k1, k2, k3


def _is_transformers_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def unsupported_reason(module: nn.Module) -> str | None:
    """``None`` if a Tucker adapter can wrap ``module`` (``nn.Linear``, transformers' ``Conv1D``, ungrouped
    ``nn.Conv1d/2d/3d``), else why not: the one place that decides which layers are supported."""
    if isinstance(module, nn.Linear) or _is_transformers_conv1d(module):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"grouped convolution (groups={module.groups}) is not supported" if module.groups != 1 else None
    return f"{type(module).__name__} is not supported (nn.Linear, transformers' Conv1D and nn.Conv1d/2d/3d are)"


def unsupported_message(problems: list[str]) -> str:
    """The error text for targets that cannot get a Tucker adapter, with the fix."""
    return (
        "Some target modules cannot get a Tucker adapter:\n  "
        + "\n  ".join(problems[:10])
        + "\nNarrow `target_modules` or add these modules to `exclude_modules`."
    )


#: every Tucker layer that got an adapter in this process (weakly held): the optimizer step check
#: (``optimizer._check_optimizer_step``) finds the factors that no geometric update owns through it
LIVE_LAYERS: weakref.WeakSet = weakref.WeakSet()


class TuckerLayer(BaseTunerLayer):
    """Mixin holding the Tucker adapters of one wrapped layer (see the module docstring for shapes)."""

    adapter_layer_names = ("tucker_core",) + tuple(f"tucker_U{i}" for i in range(MAX_MODES))
    other_param_names = ("r", "alpha", "scaling", "tucker_dropout")
    #: set while a TuckerOptimizer (the geometric update) trains one of this layer's adapters, whose shapes then change
    #: with the ranks: under ``torch.compile`` the adapters then run outside the compiled graph (:meth:`_adapter_delta`)
    _ranks_adapt = False

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.tucker_dropout = nn.ModuleDict({})
        self.tucker_core = nn.ParameterDict({})
        for i in range(MAX_MODES):
            setattr(self, f"tucker_U{i}", nn.ParameterDict({}))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        reason = unsupported_reason(base)
        if reason is not None:
            raise ValueError(unsupported_message([reason]))
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.kernel_size: tuple[int, ...] = ()
        elif _is_transformers_conv1d(base):
            self.in_features, self.out_features = base.weight.shape
            self.kernel_size = ()
        else:
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self.kernel_size = tuple(base.kernel_size)

    # ----------------------------------------------------------------------------------------------------------------
    # What the geometric update needs
    def factors(self, adapter_name: str) -> list[nn.Parameter]:
        """The orthonormal factors ``[U_0, U_1, ...]`` (each ``(n_i, r_i)``) of ``adapter_name``, in mode order."""
        out = []
        for i in range(MAX_MODES):
            store = getattr(self, f"tucker_U{i}")
            if adapter_name not in store:
                break
            out.append(store[adapter_name])
        return out

    def core(self, adapter_name: str) -> nn.Parameter:
        """The core ``C`` of ``adapter_name``: ``(r_0, ..., r_{d-1}, *dense window)``."""
        return self.tucker_core[adapter_name]

    def ranks(self, adapter_name: str) -> tuple[int, ...]:
        """Current rank of every factorized mode, ``(r_0, ..., r_{d-1})``."""
        return tuple(u.shape[1] for u in self.factors(adapter_name))

    def mode_sizes(self, adapter_name: str) -> tuple[int, ...]:
        """Size ``n_i`` of every factorized mode."""
        return tuple(u.shape[0] for u in self.factors(adapter_name))

    @torch.no_grad()
    def set_factors(self, adapter_name: str, core: torch.Tensor, factors: list[torch.Tensor]) -> None:
        """Replace ``C`` and the ``U_i`` of ``adapter_name`` in place, possibly with other ranks.

        Args:
            core: ``(r_0', ..., r_{d-1}', *dense window)``.
            factors: ``d`` matrices ``(n_i, r_i')`` with orthonormal columns, matching the core.

        The ``nn.Parameter`` objects are kept (their ``.data`` is replaced) and their ``.grad`` is cleared, since a
        gradient of the old shape means nothing for the new factors.
        """
        params = self.factors(adapter_name)
        if len(factors) != len(params):
            raise ValueError(f"expected {len(params)} factors for adapter {adapter_name!r}, got {len(factors)}")
        expected_core = tuple(f.shape[1] for f in factors) + tuple(self.core(adapter_name).shape[len(params) :])
        if tuple(core.shape) != expected_core:
            raise ValueError(f"core of shape {tuple(core.shape)} does not match factors/window {expected_core}")
        for i, (param, new) in enumerate(zip(params, factors)):
            if new.dim() != 2 or new.shape[0] != param.shape[0]:
                raise ValueError(f"factor {i} of shape {tuple(new.shape)} does not fit mode size {param.shape[0]}")
        ranks, window = list(expected_core[: len(params)]), expected_core[len(params) :]
        if valid_tucker_ranks(ranks, window) != ranks:
            raise ValueError(
                f"ranks {ranks} are not Tucker ranks (each at most the product of the others and the window {window}; "
                "for a matrix, equal): saved, this adapter could not be loaded. Truncate the core by its HOSVD first."
            )
        for param, new in zip([self.core(adapter_name), *params], [core, *factors]):
            # a fresh tensor with standard strides: kernels pick their algorithm by layout, and a saved and reloaded
            # adapter must compute bit-identically
            new = torch.empty(new.shape, dtype=param.dtype, device=param.device).copy_(new.detach())
            if new.shape != param.shape:
                # autograd keeps the parameter's gradient accumulator (with the old shape) alive as long as an old
                # graph references it, and ``.data =`` only drops it on a dtype/device change: pass through another
                # dtype so that the next backward pass builds an accumulator of the new shape.
                param.data = new.to(torch.float64 if new.dtype != torch.float64 else torch.float32)
            param.data = new
            param.grad = None

    # ----------------------------------------------------------------------------------------------------------------
    # Creating adapters
    def initial_ranks(self, r: int, conv_mode: str) -> list[int]:
        """Ranks of a new adapter of rank ``r``: ``r`` per factorized mode, clipped to valid Tucker ranks."""
        sizes, dense = self._factorized_sizes(conv_mode)
        return valid_tucker_ranks([min(r, n) for n in sizes], dense)

    def _factorized_sizes(self, conv_mode: str) -> tuple[list[int], tuple[int, ...]]:
        sizes = [self.out_features, self.in_features]
        if conv_mode == "full":
            return sizes + list(self.kernel_size), ()
        return sizes, self.kernel_size

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        conv_mode: str = "channels",
        ranks: list[int] | None = None,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create adapter ``adapter_name``: orthonormal random ``U_i``, zero core, fixed scale ``alpha / r``.

        ``ranks`` (one per factorized mode) gives exact shapes, e.g. from a saved ``module_ranks`` record; otherwise
        every mode gets rank ``r`` clipped to the layer (:meth:`initial_ranks`).
        """
        if r < 1:
            raise ValueError(f"`r` must be a positive integer; got {r}.")
        sizes, dense = self._factorized_sizes(conv_mode)
        if ranks is None:
            ranks = self.initial_ranks(r, conv_mode)
        else:
            ranks = [int(x) for x in ranks]
            if len(ranks) != len(sizes) or any(not 1 <= x <= n for x, n in zip(ranks, sizes)):
                raise ValueError(
                    f"The rank record {ranks} does not fit a layer with factorized mode sizes {sizes} "
                    f"(conv_mode={conv_mode!r}); the adapter_config.json does not belong to this model or was edited."
                )
            if valid_tucker_ranks(ranks, dense) != ranks:
                raise ValueError(f"The rank record {ranks} is not a valid Tucker rank for mode sizes {sizes}.")

        device = self._base_device()
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.tucker_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        core_shape = (*ranks, *dense)
        if init_weights:
            core = torch.zeros(core_shape)
        else:  # a non-zero delta from the start; for tests and experiments
            core = torch.randn(core_shape) / math.sqrt(math.prod(ranks))
        self.tucker_core[adapter_name] = nn.Parameter(core.to(device))
        for i, (n, rank) in enumerate(zip(sizes, ranks)):
            getattr(self, f"tucker_U{i}")[adapter_name] = nn.Parameter(orthonormal(n, rank).to(device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        LIVE_LAYERS.add(self)
        from .optimizer import ensure_step_check  # the optimizer module imports this one

        ensure_step_check()

    def _base_device(self) -> torch.device:
        weight = self.get_base_layer().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device, keeping its own (fp32) dtype even on fp16/bf16 models."""
        target = device if device is not None else self._base_device()
        for name in self.adapter_layer_names:
            store = getattr(self, name)
            if adapter_name in store and store[adapter_name].device != torch.device("meta"):
                store[adapter_name].data = store[adapter_name].data.to(target)

    # ----------------------------------------------------------------------------------------------------------------
    # Scale hooks (LoRA-compatible, used by diffusers' set_adapters / fuse_lora(lora_scale=...))
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's scale to ``scale * alpha / r`` (``scale = 1`` restores the creation value)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the scale of every active adapter by ``scale``."""
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer` (divide by ``scale``), or restore ``alpha / r`` when ``scale`` is None."""
        for adapter in self.active_adapters:
            if adapter not in self.scaling:
                continue
            if scale is None:
                self.scaling[adapter] = self.alpha[adapter] / self.r[adapter]
            else:
                self.scaling[adapter] /= scale

    # ----------------------------------------------------------------------------------------------------------------
    # Dense delta, merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * dW`` in the layout of the base weight (``(out, in, *k)``; ``(in, out)`` for ``Conv1D``), fp32."""
        delta = tucker_to_tensor(self.core(adapter_name), list(self.factors(adapter_name)))
        delta = delta * self.scaling[adapter_name]
        if _is_transformers_conv1d(self.get_base_layer()):
            delta = delta.T
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``s * dW`` of the active (or given) adapters to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.tucker_core:
                continue
            with torch.no_grad():
                delta = self.get_delta_weight(adapter)
                merged = base.weight.data.float() + delta
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.weight.data = merged.to(base.weight.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``s * dW`` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.tucker_core:
                with torch.no_grad():
                    base.weight.data = (base.weight.data.float() - self.get_delta_weight(adapter)).to(
                        base.weight.dtype
                    )

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``result + s * adapter(x)``: the layer classes fold the scale ``s`` into the small core and the sum into
        the last GEMM (``addmm`` / ``baddbmm`` with beta = 1). Against ``result + adapter(x) * s`` that is one
        output-sized tensor instead of three in the forward and no pass for the scale over the output's gradient in
        the backward (a MiniLM forward + backward 4-6% faster on CPU, benchmarks/README.md "Training step cost")."""
        raise NotImplementedError

    def _tucker_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + sum over active adapters of s * adapter(dropout(x))``, in the factored form; with
        ``adapter_names`` (one per row of the batch, set by ``model(..., adapter_names=[...])``) each row gets its
        own adapter, ``"__base__"`` none."""
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if len(adapter_names) != len(x):
                raise ValueError(
                    f"`adapter_names` needs one name per input row: got {len(adapter_names)} names for {len(x)} rows."
                )
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` while adapters are merged; call unmerge_adapter() first."
                )
            result = self.base_layer(x, *args, **kwargs)
            for adapter in dict.fromkeys(adapter_names):  # rows of "__base__" (or of an adapter this layer lacks)
                if adapter in self.tucker_core:  # keep the base output
                    rows = torch.tensor(
                        [i for i, name in enumerate(adapter_names) if name == adapter], device=x.device
                    )
                    result = result.index_copy(0, rows, self._adapter_delta(result[rows], x[rows], adapter))
            return result
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.tucker_core:
                result = self._adapter_delta(result, x, adapter)
        return result

    def _adapter_delta(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``result`` plus adapter ``adapter``'s output on ``x`` (its dropout, then the factored product).

        Under ``torch.compile``, while the update trains the layer, this runs outside the compiled graph: the factors
        change shape with every rank change, and a graph is specialized to its parameters' shapes (one recompile per
        change, then eager for the whole model once torch._dynamo's ``recompile_limit`` is reached). The base model
        stays compiled; without an update (inference, merged or not) the adapter is compiled with it."""
        if torch.compiler.is_compiling() and self._ranks_adapt:
            return _adapter_delta_outside_graph(self, result, x, adapter)
        return _adapter_delta(self, result, x, adapter)

    def __repr__(self) -> str:
        return "tucker." + super().__repr__()


def _adapter_delta(layer: TuckerLayer, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """The body of :meth:`TuckerLayer._adapter_delta` (a function, so that ``torch.compiler.disable`` wraps it once)."""
    x_a = layer.tucker_dropout[adapter](x)
    if not torch.is_autocast_enabled(x.device.type):
        x_a = x_a.to(layer.core(adapter).dtype)
    return layer._add_adapter(result, x_a, adapter)


_adapter_delta_outside_graph = torch.compiler.disable(_adapter_delta)


class Linear(nn.Module, TuckerLayer):
    """Tucker adapter on ``nn.Linear`` or transformers' ``Conv1D``: ``y = base(x) + s (x (C U1^T)^T) U0^T``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        TuckerLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tucker_forward(x, *args, **kwargs)

    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        # (s C U1^T) is r0 x n_in: folding the small core and the scale into the input factor costs n_in r^2 and
        # leaves two skinny GEMMs of LoRA's shapes and layouts, instead of a third pass over the activations
        u_out, u_in = self.factors(adapter)
        h = F.linear(x, (self.core(adapter) * self.scaling[adapter]) @ u_in.T)
        if h.dtype != result.dtype and not torch.is_autocast_enabled(h.device.type):
            return result + F.linear(h, u_out).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), u_out.T)
        return out.view(result.shape)


class Conv(nn.Module, TuckerLayer):
    """Tucker adapter on ``nn.Conv1d/2d/3d``, computed in whichever of two exact forms costs fewer operations:

    - factored: 1x1 conv with ``U1^T`` (n_in -> r1), the core's conv (r1 -> r0, the base layer's stride, padding
      and dilation), 1x1 conv with ``U0`` (r0 -> n_out): per output pixel ``n_in r1 + r1 r0 K + r0 n_out``
      multiply-adds (``K`` = window size); the cheap form for k x k windows;
    - folded: one conv with the kernel ``C x_1 U1`` (r0 x n_in x window), then the 1x1 conv with ``U0``:
      ``n_in r0 K + r0 n_out``, LoRA's conv structure; the cheap form for 1x1 convolutions.

    The 1x1 steps run as batched GEMMs over the pixels (:func:`_pointwise`).  In ``full`` mode the window modes of
    the core are first expanded by their factors (a tensor of the core's size with the full window, never the dense
    delta)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        TuckerLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.kernel_size)]
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tucker_forward(x, *args, **kwargs)

    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        factors = self.factors(adapter)
        u_out, u_in = factors[0], factors[1]
        kernel = self.core(adapter) * self.scaling[adapter]
        if len(factors) > 2:  # "full" mode: expand the window modes
            kernel = multi_mode_dot(kernel, factors[2:], range(2, len(factors)))
        window = math.prod(self.kernel_size)
        r_out, r_in = u_out.shape[1], u_in.shape[1]
        factored = self.in_features * r_in + r_in * r_out * window
        if factored < self.in_features * r_out * window:
            h = self.get_base_layer()._conv_forward(
                _pointwise(x, u_in.T, self._conv, len(self.kernel_size)), kernel, None
            )
        else:
            h = self.get_base_layer()._conv_forward(x, mode_dot(kernel, u_in, 1), None)
        spatial = len(self.kernel_size)
        same_dtype = h.dtype == result.dtype or torch.is_autocast_enabled(h.device.type)
        if same_dtype and h.dim() == spatial + 2 and h.is_contiguous() and result.is_contiguous():
            # _pointwise's batched GEMM with the sum inside it
            u = u_out.expand(h.shape[0], *u_out.shape)
            return torch.baddbmm(result.flatten(2), u, h.flatten(2)).view(result.shape)
        return result + _pointwise(h, u_out, self._conv, spatial).to(result.dtype)


def _pointwise(x: torch.Tensor, matrix: torch.Tensor, conv, spatial: int) -> torch.Tensor:
    """``matrix`` (m x c) applied to the channels of ``x`` (n, c, *spatial), a 1x1 convolution.

    For contiguous (channels-first) inputs this is one batched GEMM over the flattened pixels, which on CPU is
    faster than oneDNN's 1x1 convolution for the skinny shapes of an adapter (benchmarks/conv_cost.py).  ``bmm``
    with the matrix expanded (a view), not ``matmul``: broadcasting a 2-D matrix against (n, c, pixels) makes
    ``matmul`` fold the input into a transposed copy, which autograd then keeps (an extra input-sized tensor).
    Other memory formats (channels_last) and unbatched inputs take the convolution."""
    if x.is_contiguous() and x.dim() == spatial + 2:
        return torch.bmm(matrix.expand(x.shape[0], *matrix.shape), x.flatten(2)).unflatten(2, x.shape[2:])
    return conv(x, matrix.reshape(*matrix.shape, *(1,) * spatial))


def dispatch(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module | None:
    """Wrap ``target`` in the Tucker layer class for its type, or ``None`` if it is not supported (as PEFT's LoRA
    dispatchers do; the caller raises, with :func:`unsupported_reason`)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if unsupported_reason(base) is not None:
        return None
    if isinstance(base, nn.Linear) or _is_transformers_conv1d(base):
        return Linear(target, adapter_name, **kwargs)
    return Conv(target, adapter_name, **kwargs)
