"""Training integrations: one line in a PyTorch/accelerate loop (:func:`attach`) or a Trainer (:class:`TuckerLoraCallback`).

:func:`attach` hooks the geometric update into the optimizer the user already has, through torch's optimizer hooks:

- the Tucker factors stay in the optimizer's parameter groups, so ``GradScaler.unscale_``, gradient clipping,
  learning-rate schedulers, ``zero_grad`` and accelerate's gradient accumulation treat them like any parameter;
- a step pre-hook hides them from the optimizer's own update (no step, no weight decay, no moments), a step
  post-hook puts them back and runs :class:`~tucker_peft.TuckerOptimizer` with the learning rate (and weight decay,
  applied to the core only) of the group that holds them.  A step skipped by ``GradScaler`` (fp16 overflow) or by
  gradient accumulation is skipped for the factors too, since the hooks only run when the optimizer steps;
- ``optimizer.state_dict()`` carries the update's state under ``"tucker_peft"`` and ``load_state_dict`` restores it.

Distributed training: DDP (``torch.nn.parallel.DistributedDataParallel``, ``accelerate launch``, the Trainer with
several processes) is supported.  The factors change shape when ranks change, which DDP's gradient buckets cannot
follow, so :func:`attach` (called before the model is wrapped) tells DDP to leave them alone and the update
all-reduces their gradients itself and takes the rank decisions of process 0: every process ends every step with the
same ranks and factors.  Sharded parameters (FSDP, DeepSpeed ZeRO-3) are refused with an error; fp16 with a
GradScaler under DDP is refused by the Trainer callback (use bf16), because each process would decide on its own
whether an overflow skips the step.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import weakref
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .model import iter_tucker_layers
from .optimizer import ATTACHED, TuckerOptimizer, _unwrap, check_options, tucker_parameters

logger = logging.getLogger(__name__)

STATE_KEY = "tucker_peft"


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer & co.
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or accelerate's wrapper), got {type(optimizer).__name__}")
    return optimizer


def _refuse_sharded(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or type(module).__name__.startswith(
            "FSDP"
        ):
            raise NotImplementedError(
                "tucker-peft does not support FSDP: the geometric update needs whole factors on every process. "
                "Use DDP (the default of `accelerate launch` / torchrun with the Trainer)."
            )
    for p in model.parameters():
        if hasattr(p, "ds_id") or type(p).__name__ == "DTensor":
            raise NotImplementedError(
                "tucker-peft does not support sharded parameters (DeepSpeed ZeRO-3, DTensor): the geometric update "
                "needs whole factors on every process. Use DDP or DeepSpeed ZeRO-1/2."
            )


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def exclude_from_ddp(model: nn.Module) -> None:
    """Tell DDP (before it wraps ``model``) not to reduce the Tucker factors; :class:`TuckerOptimizer` does it."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if "tucker_" in n and p.requires_grad]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(set(existing) | set(names)))


def attach(optimizer: Any, model: nn.Module, **kwargs: Any) -> TuckerOptimizer:
    """Run the geometric update of ``model``'s Tucker adapters whenever ``optimizer`` steps: the one extra line.

    Call it after creating the optimizer and before ``accelerator.prepare`` / DDP wrapping (and, for an optimizer
    built without the factors, before creating its learning-rate scheduler)::

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tucker_peft.attach(optimizer, model)

    Args:
        optimizer: the optimizer of the rest of the model (it may hold the factors; they are taken away from its own
            update) or accelerate's wrapper of it.
        model: the model holding the Tucker adapters.
        kwargs: passed to :class:`TuckerOptimizer` (``direction``, ``betas``, ``tau``, ``min_rank``, ...).  The
            learning rate and weight decay follow the optimizer's group that holds the factors.

    Returns:
        The :class:`TuckerOptimizer` (for ``ranks()``, ``num_adapter_parameters()``).
    """
    inner = _torch_optimizer(optimizer)
    if inner in ATTACHED:
        raise RuntimeError("tucker_peft.attach was already called on this optimizer; call it once.")
    unwrapped = _unwrap(model)
    _refuse_sharded(model)
    if _is_distributed():
        if unwrapped is not model and not getattr(unwrapped, "_ddp_params_and_buffers_to_ignore", None):
            raise RuntimeError(
                "The model is already wrapped for distributed training, so DDP would reduce the Tucker factors, whose "
                "shapes change. Call tucker_peft.attach(optimizer, model) before accelerator.prepare(...) / DDP."
            )
        exclude_from_ddp(unwrapped)

    factors = tucker_parameters(unwrapped)
    ids = {id(p) for p in factors}
    holding = [g for g in inner.param_groups if any(id(p) in ids for p in g["params"])]
    added_group = not holding
    if added_group and getattr(inner.step, "_wrapped_by_lr_sched", False):
        # (torch's LR schedulers mark the step they wrap; one made before the group is added fails at its step)
        raise ValueError(
            "This optimizer does not hold the Tucker factors (built from non_tucker_parameters), so attach adds them "
            "as a new parameter group, which the learning-rate scheduler already made for it does not know. Call "
            "tucker_peft.attach(optimizer, model) before creating the scheduler."
        )
    # the factors follow the group that holds them, or the one added below (the optimizer's defaults, no weight decay)
    source = holding[0] if holding else {"lr": inner.defaults["lr"], "weight_decay": 0.0}
    follow_weight_decay = "weight_decay" not in kwargs
    kwargs.setdefault("lr", source["lr"])
    kwargs.setdefault("weight_decay", source.get("weight_decay", 0.0))
    tucker = TuckerOptimizer(unwrapped, **kwargs)  # checks its arguments before the optimizer is changed
    if added_group:  # built from non_tucker_parameters(model): add the factors so that unscale_/schedulers see them
        inner.add_param_group({"params": [p for p in factors if p.requires_grad], "weight_decay": 0.0})
        holding = [inner.param_groups[-1]]
    for p in factors:  # drop any moments the optimizer may already have for them
        inner.state.pop(p, None)
    tucker.distributed = _is_distributed()
    Attachment(inner, tucker, ids, holding, follow_weight_decay, added_group)
    return tucker


def detach(optimizer: Any) -> None:
    """Undo :func:`attach`: remove its hooks from ``optimizer`` and take the Tucker factors out of its parameter
    groups (so that it does not go on training them as plain parameters).  The adapter keeps its current ranks."""
    attachment = ATTACHED.get(_torch_optimizer(optimizer))
    if attachment is None:
        raise ValueError(
            "tucker_peft.detach: this optimizer has no geometric update attached (see tucker_peft.attach)."
        )
    attachment.detach()


def _group_holding(groups: list[dict], param: torch.Tensor) -> dict | None:
    """The parameter group of ``groups`` that holds ``param`` (by identity), if any."""
    return next((g for g in groups if any(p is param for p in g["params"])), None)


class Attachment:
    """The geometric update hooked into an optimizer by :func:`attach`, in the manner of torch's hooks: it owns the
    hook handles and the state they share, is found through the registry ``ATTACHED`` (optimizer -> attachment), and
    :meth:`detach` removes it.

    - a step pre-hook hides the factors from the optimizer's own update (and refuses a step while another, untrained
      Tucker adapter is active); a step post-hook puts them back and runs the :class:`TuckerOptimizer` with the
      learning rate (and weight decay) of the group that holds each layer's core;
    - ``optimizer.state_dict()`` carries the update's state under ``"tucker_peft"``; ``load_state_dict`` restores it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tucker: TuckerOptimizer,
        factor_ids: set[int],
        holding: list[dict],
        follow_weight_decay: bool,
        added_group: bool,
    ) -> None:
        # a weak reference: the registry ATTACHED is keyed by the optimizer, which must stay collectable
        self._optimizer = weakref.ref(optimizer)
        self.tucker = tucker
        self._factor_ids = factor_ids
        self._follow_weight_decay = follow_weight_decay
        self._added_group = added_group
        # each layer follows the group that holds its core; kept as indices, since load_state_dict replaces the dicts
        index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
        self._follow_group = [
            index[id(_group_holding(holding, group["params"][0]) or holding[0])] for group in tucker.param_groups
        ]
        self._hidden: list[tuple[dict, list]] = []
        self._stashed_state: dict | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._hide),
            optimizer.register_step_post_hook(self._restore_and_update),
            optimizer.register_state_dict_post_hook(self._save_state),
            optimizer.register_load_state_dict_pre_hook(self._take_state),
            optimizer.register_load_state_dict_post_hook(self._load_state),
        ]
        ATTACHED[optimizer] = self

    def detach(self) -> None:
        """Remove the hooks, release the factors and take them out of the optimizer's groups."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tucker.release()
        optimizer = self._optimizer()
        if optimizer is None:
            return
        ATTACHED.pop(optimizer, None)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in self._factor_ids]
        if self._added_group and not optimizer.param_groups[-1]["params"]:
            optimizer.param_groups.pop()

    def _hide(self, optimizer, args, kwargs) -> None:
        self.tucker.check_active_adapter()  # before the optimizer moves anything
        for group in optimizer.param_groups:
            if any(id(p) in self._factor_ids for p in group["params"]):
                self._hidden.append((group, group["params"]))
                group["params"] = [p for p in group["params"] if id(p) not in self._factor_ids]

    def _restore_and_update(self, optimizer, args, kwargs) -> None:
        while self._hidden:
            group, params = self._hidden.pop()
            group["params"] = params
        for group, i in zip(self.tucker.param_groups, self._follow_group):
            source = optimizer.param_groups[i]
            group["lr"] = source["lr"]
            if self._follow_weight_decay:
                group["weight_decay"] = source.get("weight_decay", 0.0)
        self.tucker.step()

    def _save_state(self, optimizer, state_dict: dict) -> dict:
        state_dict[STATE_KEY] = self.tucker.state_dict()
        return state_dict

    def _take_state(self, optimizer, state_dict: dict) -> dict:
        if STATE_KEY in state_dict:
            state_dict = dict(state_dict)
            self._stashed_state = state_dict.pop(STATE_KEY)
        return state_dict

    def _load_state(self, optimizer) -> None:
        if self._stashed_state is not None:
            state, self._stashed_state = self._stashed_state, None
            self.tucker.load_state_dict(state)


def rank_summary(tucker: TuckerOptimizer) -> dict[str, float]:
    """``{"tucker_rank_mean", "tucker_rank_min", "tucker_rank_max", "tucker_params"}`` of the current adapter."""
    ranks = [r for v in tucker.ranks().values() for r in v]
    return {
        "tucker_rank_mean": sum(ranks) / len(ranks),
        "tucker_rank_min": float(min(ranks)),
        "tucker_rank_max": float(max(ranks)),
        "tucker_params": float(tucker.num_adapter_parameters()),
    }


def save_rank_report(history: list[dict], ranks: dict[str, tuple[int, ...]], output_dir: str) -> tuple[str, str]:
    """Write ``tucker_ranks.json`` (final per-layer ranks and the history) and ``tucker_ranks.png`` (rank evolution)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "tucker_ranks.json")
    with open(json_path, "w") as f:
        json.dump({"final_ranks": {k: list(v) for k, v in ranks.items()}, "history": history}, f, indent=1)
    png_path = os.path.join(output_dir, "tucker_ranks.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.fill_between(
        steps, [h["tucker_rank_min"] for h in history], [h["tucker_rank_max"] for h in history], alpha=0.25
    )
    ax.plot(steps, [h["tucker_rank_mean"] for h in history], label="mean rank (band: min-max)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank per mode")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["tucker_params"] for h in history], color="tab:red", linestyle="--", label="adapter parameters")
    ax2.set_ylabel("adapter parameters")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right")
    ax.set_title(f"tucker-peft ranks ({len(ranks)} layers)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def _checkpoints_to_resume_from(args, state) -> list[str]:
    """Folders that may hold the checkpoint the Trainer is resuming from, the most likely first.

    The Trainer loads the checkpoint's optimizer state before any callback runs and before the update is attached
    (so our part of it is dropped), and it tells callbacks neither ``train(resume_from_checkpoint=...)`` nor the
    folder it resolved: it is read from the calling ``Trainer._inner_training_loop`` frame, then from
    ``args.resume_from_checkpoint``, then the ``checkpoint-<step>`` folder of ``output_dir``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    frame = sys._getframe(1)
    while frame is not None and not found:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(
            frame.f_locals.get("resume_from_checkpoint"), (str, os.PathLike)
        ):
            found.append(os.fspath(frame.f_locals["resume_from_checkpoint"]))
        frame = frame.f_back
    if isinstance(args.resume_from_checkpoint, str):
        found.append(args.resume_from_checkpoint)
    found.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
    return list(dict.fromkeys(found))


def _refuse_another_scale(folder: str, model: nn.Module, adapter_name: str) -> None:
    """A checkpoint's factors mean something only under its own scale ``alpha / r`` (per module with
    ``rank_pattern`` / ``alpha_pattern``): refuse to continue from it under another one."""
    path = os.path.join(folder, "adapter_config.json")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None or not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    keys = ("r", "alpha", "rank_pattern", "alpha_pattern")
    now = {k: getattr(config, k) for k in keys}
    before = {k: saved.get(k, now[k]) for k in keys}
    if before != now:

        def show(settings: dict) -> str:
            return ", ".join(f"{k}={v}" for k, v in settings.items() if not k.endswith("_pattern") or v)

        raise ValueError(
            f"Resuming would load the Tucker factors under another scale alpha / r: the checkpoint {folder} was "
            f"trained with {show(before)}, the adapter config now has {show(now)}. Resume with the checkpoint's "
            "r and alpha (see its adapter_config.json), or start a new training."
        )


class TuckerLoraCallback(TrainerCallback):
    """The Trainer integration: ``Trainer(..., callbacks=[TuckerLoraCallback()])`` is the only line to add.

    - At the start of training it attaches the geometric update to the Trainer's optimizer (:func:`attach`): the
      optimizer no longer updates, decays or keeps moments for the Tucker factors, and after each real optimizer
      step (not a skipped fp16 step, not an accumulation micro-step) the update runs with the learning rate just
      used.
    - It adds ``tucker_rank_mean/min/max`` and ``tucker_params`` to every log (progress bar, ``report_to``
      backends, ``trainer.state.log_history``).
    - Checkpoints hold the adapter at its current ranks (``save_pretrained``) and the update's state (inside
      ``optimizer.pt``); ``trainer.train(resume_from_checkpoint=...)`` continues exactly.
    - At the end it writes ``tucker_ranks.json`` (per-layer ranks and their history) and ``tucker_ranks.png`` into
      ``output_dir``.

    Keyword arguments go to :class:`TuckerOptimizer` (e.g. ``direction="sgd"``, ``tau=0.05``); ``total_steps``
    (which a ``budget_schedule`` needs) defaults to the Trainer's ``max_steps``.
    """

    def __init__(self, **optimizer_kwargs: Any) -> None:
        check_options(**optimizer_kwargs)  # a wrong option fails here, before the model is even loaded
        self.optimizer_kwargs = optimizer_kwargs
        self.tucker: TuckerOptimizer | None = None
        self.history: list[dict] = []

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None or not any(True for _ in iter_tucker_layers(_unwrap(model))):
            raise ValueError(
                "TuckerLoraCallback needs a model with Tucker adapters: wrap it with "
                "get_peft_model(model, TuckerLoraConfig(...)) before creating the Trainer."
            )
        if getattr(args, "fsdp", None):
            raise NotImplementedError("tucker-peft does not support FSDP; use DDP (plain multi-process training).")
        if args.world_size > 1:
            if args.fp16:
                raise NotImplementedError(
                    "fp16 with several processes is not supported by tucker-peft (each process would decide alone "
                    "whether an overflow skips the step); use bf16=True."
                )
            exclude_from_ddp(_unwrap(model))
        self._move_to_front()

    def _move_to_front(self) -> None:
        """Run before the reporting callbacks, so that the rank figures we add to ``logs`` reach them.

        ``Trainer`` places user callbacks after its reporting integrations and gives callbacks no handle on the
        callback list, so the list holding this callback is found through the garbage collector's referrers."""
        from transformers.trainer_callback import CallbackHandler

        for holder in gc.get_referrers(self):
            if isinstance(holder, list) and any(isinstance(h, CallbackHandler) for h in gc.get_referrers(holder)):
                holder.remove(self)
                holder.insert(0, self)
                return

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # a second trainer.train() on the same optimizer keeps the update that is already attached
        attachment = ATTACHED.get(_torch_optimizer(optimizer))
        # the Trainer's number of optimizer steps, for a budget schedule (which is given in fractions of it)
        options = {"total_steps": state.max_steps, **self.optimizer_kwargs}
        self.tucker = attachment.tucker if attachment else attach(optimizer, model, **options)
        self.history = [{"step": state.global_step, **rank_summary(self.tucker)}]
        if state.global_step > 0:
            self._resume_state(args, state, model)

    def _resume_state(self, args, state, model) -> None:
        for folder in _checkpoints_to_resume_from(args, state):
            path = os.path.join(folder, "optimizer.pt")
            if os.path.isfile(path):
                _refuse_another_scale(folder, _unwrap(model), self.tucker.adapter_name)
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if STATE_KEY in saved:
                    self.tucker.load_state_dict(saved[STATE_KEY])
                    history = os.path.join(folder, "tucker_ranks.json")
                    if os.path.isfile(history):
                        with open(history) as f:
                            self.history = json.load(f)["history"]
                    return
        logger.warning(
            "Resuming at step %d but no tucker-peft optimizer state was found in %s; the Adam moments of the "
            "Tucker factors restart from zero.",
            state.global_step,
            _checkpoints_to_resume_from(args, state),
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.tucker is not None:
            self.history.append({"step": state.global_step + 1, **rank_summary(self.tucker)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tucker is None or logs is None or ("loss" not in logs and "train_loss" not in logs):
            return
        summary = rank_summary(self.tucker)
        logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)

    def on_save(self, args, state, control, **kwargs):
        if self.tucker is None or not state.is_world_process_zero:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, "tucker_ranks.json"), "w") as f:
                json.dump(
                    {"final_ranks": {k: list(v) for k, v in self.tucker.ranks().items()}, "history": self.history}, f
                )

    def on_train_end(self, args, state, control, **kwargs):
        if self.tucker is not None and state.is_world_process_zero:
            json_path, png_path = save_rank_report(self.history, self.tucker.ranks(), args.output_dir)
            logger.info("tucker-peft: wrote %s and %s", json_path, png_path)
