"""``TuckerLoraConfig``: the PEFT configuration of a Tucker-factorized, rank-adaptive adapter."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registry import TUCKER_PEFT_TYPE

CONV_MODES = ("channels", "full")


def check_budget_schedule(schedule, budget) -> list[float]:
    """``schedule`` as ``[start, end]`` floats, or a ValueError that names the fix."""
    if budget is None:
        raise ValueError(
            "`budget_schedule` shrinks the adapter to `budget`: set budget=<adapter parameters> as well, or drop "
            "budget_schedule."
        )
    if (
        not isinstance(schedule, (list, tuple))
        or len(schedule) != 2
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in schedule)
        or not 0 <= schedule[0] < schedule[1] <= 1
    ):
        raise ValueError(
            "`budget_schedule` must be [start, end], fractions of the training steps with 0 <= start < end <= 1 "
            f"(e.g. [0.2, 0.8]); got {schedule!r}."
        )
    return [float(f) for f in schedule]


@dataclass
class TuckerLoraConfig(PeftConfig):
    """Configuration of a [`TuckerLoraModel`]: adapters ``W = W0 + s * C x_0 U_0 ... x_{d-1} U_{d-1}`` (docs/algorithm.md §1).

    Each targeted layer gets orthonormal factors ``U_i`` (one per factorized mode) and a core ``C`` that starts at
    zero, so the model is unchanged at creation.  The scale ``s = alpha / r`` is fixed when the adapter is created
    (``r`` from ``rank_pattern`` or ``r``) and never changes when ranks adapt during training.

    Modes: ``nn.Linear`` and transformers' ``Conv1D`` have modes (out, in).  Convolutions factorize (out, in) and
    keep the kernel window dense inside the core (``conv_mode="channels"``), or factorize the window modes too
    (``conv_mode="full"``).

    ``module_ranks`` records the current per-mode ranks of every adapted module.  It is filled in when the adapter
    is saved, so that loading rebuilds exactly the saved shapes; users normally leave it empty.

    A ``LoraConfig``'s arguments carry over: ``lora_alpha`` and ``lora_dropout`` are taken as ``alpha`` and
    ``dropout``, ``init_lora_weights=True`` or ``"gaussian"`` (a zero delta at creation, as here) as they are,
    ``fan_in_fan_out`` as it is (transformers' ``Conv1D`` is recognized by its type); LoRA-only choices
    (``bias`` other than ``"none"``, ``use_rslora``, ``use_dora``, other initializations) are refused with the fix.
    """

    r: int = field(default=8, metadata={"help": "Initial rank of every factorized mode (clipped to the layer size)."})
    max_rank: int = field(
        default=32, metadata={"help": "Largest rank a mode may reach when ranks adapt during training (>= r)."}
    )
    min_rank: int = field(
        default=1, metadata={"help": "Smallest rank a mode may be truncated to (1 <= min_rank <= r)."}
    )
    tau: float = field(
        default=0.1,
        metadata={
            "help": "Relative truncation tolerance in [0, 1): after each update the discarded singular values of every "
            "mode have norm <= tau * ||core||. 0 never truncates anything that matters."
        },
    )
    budget: int | None = field(
        default=None,
        metadata={
            "help": "Largest number of adapter parameters (cores and factors of all layers) that the rank decisions "
            "may keep, like AdaLoRA's target budget: the ranks are then decided across layers, dropping first the "
            "directions with the smallest share of the scaled delta, within [min_rank, max_rank] and tau. None: no "
            "global limit (each layer by tau alone)."
        },
    )
    budget_schedule: list[float] | None = field(
        default=None,
        metadata={
            "help": "[start, end] as fractions of the training steps, with `budget`: no global limit before start "
            "(ranks by tau), then the limit shrinks from the adapter's initial size to `budget` by end (cubic, like "
            "AdaLoRA's schedule) and stays there, so that the adapter trains at full size first and its smallest "
            "directions are dropped gradually. Needs the number of training steps (TuckerLoraCallback takes it from "
            "the Trainer; a plain loop passes total_steps to tucker_peft.attach). None: `budget` from the first step."
        },
    )
    alpha: float = field(
        default=8.0,
        metadata={"help": "Scale numerator: the adapter is scaled by alpha / r, fixed at creation (> 0)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input, in [0, 1)."})
    conv_mode: Literal["channels", "full"] = field(
        default="channels",
        metadata={
            "help": "How convolutions are factorized: 'channels' (Tucker on out/in channels, dense kernel window in "
            "the core) or 'full' (the window modes are factorized too)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or a regex of the modules to adapt, e.g. ['query', 'value'] "
            "or 'all-linear'. If None, a default is chosen from the model architecture."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (needs list target_modules)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers, used with layers_to_transform ('layers', 'h')."
        },
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Initial rank per module name or regex, overriding r (like LoRA's rank_pattern); the module's "
            "scale is alpha / that rank. Example: {'^encoder.layer.0.attention.self.query': 4}."
        },
    )
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "alpha per module name or regex, overriding alpha (like LoRA's alpha_pattern); the module's scale "
            "is that alpha / its initial rank. Example: {'^encoder.layer.0.attention.self.query': 16}."
        },
    )
    module_ranks: dict = field(
        default_factory=dict,
        metadata={
            "help": "Current per-mode ranks per adapted module (full module name -> list of ints). Written by "
            "save_pretrained so that loading rebuilds the saved shapes exactly; leave empty when creating an adapter."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True (default): zero core, so the model is unchanged at creation. False: a random core (a non-zero "
            "delta from the start), only for tests and experiments."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapters that are trained and saved, e.g. a classifier head."},
    )
    # LoraConfig's names, so that a LoRA config carries over (read once, not stored; see the class docstring)
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None
    bias: InitVar[str] = "none"
    init_lora_weights: InitVar[bool | str] = True
    fan_in_fan_out: InitVar[bool] = False
    use_rslora: InitVar[bool] = False
    use_dora: InitVar[bool] = False

    def __post_init__(self, lora_alpha, lora_dropout, bias, init_lora_weights, fan_in_fan_out, use_rslora, use_dora):
        super().__post_init__()
        self.peft_type = TUCKER_PEFT_TYPE
        self._take_lora_arguments(lora_alpha, lora_dropout, bias, init_lora_weights, use_rslora, use_dora)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _take_lora_arguments(self, lora_alpha, lora_dropout, bias, init_lora_weights, use_rslora, use_dora) -> None:
        for lora_name, name, value in (("lora_alpha", "alpha", lora_alpha), ("lora_dropout", "dropout", lora_dropout)):
            if value is None:
                continue
            if getattr(self, name) not in (self.__dataclass_fields__[name].default, value):
                raise ValueError(
                    f"`{lora_name}` is LoraConfig's name for `{name}`: give one of them; got {name}="
                    f"{getattr(self, name)!r} and {lora_name}={value!r}."
                )
            setattr(self, name, value)
        if bias != "none":
            raise ValueError(
                f"bias={bias!r}: Tucker adapters add no bias terms (bias='none'); to train biases too, list their "
                "modules in modules_to_save."
            )
        if init_lora_weights not in (True, "gaussian", False):
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} is a LoRA initialization: a Tucker adapter starts with a zero "
                "core on orthonormal bases (init_lora_weights=True or 'gaussian', the default), and its ranks adapt "
                "during training."
            )
        if init_lora_weights is False:
            self.init_weights = False
        if use_rslora:
            raise ValueError(
                "use_rslora=True: the Tucker adapter's scale is alpha / r (fixed at creation); for rsLoRA's scale "
                "alpha / sqrt(r) set alpha to alpha * sqrt(r)."
            )
        if use_dora:
            raise ValueError("use_dora=True: DoRA is a LoRA variant that Tucker adapters do not implement.")

    def _validate(self) -> None:
        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")

        for name in ("r", "max_rank", "min_rank"):
            positive_int(name, getattr(self, name))
        if self.min_rank > self.max_rank:
            raise ValueError(
                f"`min_rank` ({self.min_rank}) must be <= `max_rank` ({self.max_rank}); lower min_rank or raise max_rank."
            )
        if not self.min_rank <= self.r <= self.max_rank:
            raise ValueError(
                f"`r` ({self.r}) must lie in [min_rank, max_rank] = [{self.min_rank}, {self.max_rank}]; "
                "change r or the bounds."
            )
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise ValueError(f"`tau` must be a float in [0, 1) (relative truncation tolerance); got {self.tau!r}.")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise ValueError(f"`budget` must be None or a positive integer (adapter parameters); got {self.budget!r}.")
        if self.budget_schedule is not None:
            self.budget_schedule = check_budget_schedule(self.budget_schedule, self.budget)
        for name, value in [
            ("alpha", self.alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0 (the scale is alpha / r); got {value!r}.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"`dropout` must be a probability in [0, 1); got {self.dropout!r}.")
        if self.conv_mode not in CONV_MODES:
            raise ValueError(f"`conv_mode` must be one of {CONV_MODES}; got {self.conv_mode!r}.")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or not self.min_rank <= value <= self.max_rank:
                raise ValueError(
                    f"`rank_pattern[{key!r}]` must be an integer in [min_rank, max_rank] = "
                    f"[{self.min_rank}, {self.max_rank}]; got {value!r}."
                )
        for key, value in self.module_ranks.items():
            if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 1 for v in value)):
                raise ValueError(
                    f"`module_ranks[{key!r}]` must be a non-empty list of integers >= 1 (one per factorized mode); "
                    f"got {value!r}. It is written by save_pretrained; do not edit it by hand."
                )
            self.module_ranks[key] = list(value)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "`layers_to_transform` cannot be used when `target_modules` is a str (regex); pass a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
