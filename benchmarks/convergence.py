"""Convergence on planted low-rank problems: tucker-peft's geometric update vs PEFT LoRA + AdamW.

A frozen layer is fitted to a target ``W0 + dW*`` with a planted low-rank ``dW*`` by regression on fixed data
(4096 samples, batch 64, reshuffled every epoch, 600 steps), the way users train: AdamW for LoRA (r = 8,
alpha = 8), ``tucker_peft.attach`` for tucker (r = 8, alpha = 8, tau = 0.1), both with the same learning rate and
the same schedule (warmup 10 + linear decay to 0, or constant).  Reported: the relative error of the learned delta
``||s dW - dW*|| / ||dW*||`` and the loss against steps, and tucker's ranks.

- ``linear``: ``nn.Linear(48, 40)``, ``dW*`` of rank 3 with singular values 1, 0.8, 0.6.
- ``conv``: ``nn.Conv2d(16, 24, 3, padding=1)`` on 6 x 6 inputs, ``dW*`` with channel ranks (out 3, in 2) and norm
  ``sqrt(2)``.

    python benchmarks/convergence.py [--lrs 5e-4 1e-3 2e-3 5e-3] [--out benchmarks/results/convergence.json]
        [--tucker_config '{"tau": 0, "max_rank": 8}']  (TuckerLoraConfig over r=8, alpha=8, tau=0.1)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

import tucker_peft

LRS = (5e-4, 1e-3, 2e-3, 5e-3)
SCHEDULES = ("warmup_linear", "constant")
PROBLEMS = ("linear", "conv")


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def planted(problem: str, n: int = 4096, seed: int = 0):
    """``(base layer, dW*, inputs, targets)`` of a planted problem."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if problem == "linear":
        base = nn.Linear(48, 40)
        u = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]
        v = torch.linalg.qr(torch.randn(48, 3, generator=g))[0]
        dstar = u @ torch.diag(torch.tensor([1.0, 0.8, 0.6])) @ v.T
        x = torch.randn(n, 48, generator=g)
        y = F.linear(x, base.weight.detach() + dstar, base.bias.detach())
    else:
        base = nn.Conv2d(16, 24, 3, padding=1)
        u_out = torch.linalg.qr(torch.randn(24, 3, generator=g))[0]
        u_in = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
        dstar = torch.einsum("abxy,Aa,Bb->ABxy", torch.randn(3, 2, 3, 3, generator=g), u_out, u_in)
        dstar = 2**0.5 * dstar / dstar.norm()
        x = torch.randn(n, 16, 6, 6, generator=g)
        y = F.conv2d(x, base.weight.detach() + dstar, base.bias.detach(), padding=1)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, dstar, x, y


def run(
    problem: str,
    method: str,
    lr: float,
    schedule: str,
    steps: int,
    tucker_kwargs: dict,
    seed: int = 0,
    tucker_config: dict | None = None,
) -> dict:
    base, dstar, x, y = planted(problem, seed=seed)
    torch.manual_seed(seed)
    if method == "lora":
        model = get_peft_model(Net(base), LoraConfig(target_modules=["layer"], r=8, lora_alpha=8))
    else:
        model = get_peft_model(
            Net(base),
            tucker_peft.TuckerLoraConfig(
                target_modules=["layer"], **{"r": 8, "alpha": 8, "tau": 0.1, **(tucker_config or {})}
            ),
        )
    layer = model.base_model.model.layer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    tucker = tucker_peft.attach(optimizer, model, **tucker_kwargs) if method == "tucker" else None
    if schedule == "warmup_linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, 10, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, 0)
    g = torch.Generator().manual_seed(seed + 1)
    order, pos, batch = torch.randperm(len(x), generator=g), 0, 64
    scale = dstar.norm()

    def rel_error() -> float:
        return ((layer.get_delta_weight("default") - dstar).norm() / scale).item()

    curve = []
    for step in range(steps):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        pred = model(x[idx])
        loss = 0.5 * ((pred - y[idx]) ** 2).flatten(1).sum(1).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 20 == 19 or step == steps - 1:
            point = {"step": step + 1, "loss": loss.item(), "rel_error": rel_error()}
            if tucker is not None:
                point["ranks"] = list(tucker_peft.current_ranks(model)["layer"])
            curve.append(point)
    out = {"final_rel_error": curve[-1]["rel_error"], "final_loss": curve[-1]["loss"], "curve": curve}
    if tucker is not None:
        out["final_ranks"] = curve[-1]["ranks"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--methods", nargs="+", default=["tucker", "lora"], choices=["tucker", "lora"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tucker_args", type=json.loads, default={}, help="JSON kwargs for tucker_peft.attach")
    parser.add_argument(
        "--tucker_config",
        type=json.loads,
        default={},
        help='JSON kwargs for TuckerLoraConfig over r=8, alpha=8, tau=0.1 (e.g. \'{"tau": 0, "max_rank": 8}\': fixed rank 8)',
    )
    parser.add_argument("--out", default=None, help="result JSON (default: print only)")
    parser.add_argument("--plot", default=None, help="PNG of relative error against steps")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results, started = [], time.time()
    print("| problem | schedule | lr | " + " | ".join(f"{m} rel. error" for m in args.methods) + " | tucker ranks |")
    print("|---|---|---|" + "---|" * len(args.methods) + "---|")
    for problem in args.problems:
        for schedule in args.schedules:
            for lr in args.lrs:
                row = {"problem": problem, "schedule": schedule, "lr": lr}
                for method in args.methods:
                    row[method] = run(
                        problem, method, lr, schedule, args.steps, args.tucker_args, tucker_config=args.tucker_config
                    )
                results.append(row)
                errors = " | ".join(f"{row[m]['final_rel_error']:.2e}" for m in args.methods)
                ranks = row["tucker"]["final_ranks"] if "tucker" in row else "-"
                print(f"| {problem} | {schedule} | {lr:g} | {errors} | {ranks} |", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python benchmarks/convergence.py " + " ".join(os.sys.argv[1:]),
                    "date": date.today().isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                    f"{torch.__version__}, 1 thread",
                    "seconds": round(time.time() - started, 1),
                    "setup": "4096 samples, batch 64, 600 steps; LoRA r=8 alpha=8 + AdamW (wd 0); tucker r=8 alpha=8 "
                    "tau=0.1 via attach; same lr and schedule (warmup 10 + linear decay, or constant)",
                    "tucker_args": args.tucker_args,
                    "tucker_config": args.tucker_config,
                    "results": results,
                },
                f,
                indent=1,
            )
    if args.plot:
        plot(results, args.methods, args.plot)


def plot(results: list[dict], methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in results}, key=PROBLEMS.index)
    schedules = sorted({r["schedule"] for r in results}, key=SCHEDULES.index)
    fig, axes = plt.subplots(
        len(problems), len(schedules), figsize=(6 * len(schedules), 4 * len(problems)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, problem in enumerate(problems):
        for j, schedule in enumerate(schedules):
            ax = axes[i][j]
            rows = [r for r in results if r["problem"] == problem and r["schedule"] == schedule]
            for k, row in enumerate(rows):
                for method, style in zip(methods, ("-", "--")):
                    curve = row[method]["curve"]
                    ax.semilogy(
                        [p["step"] for p in curve],
                        [max(p["rel_error"], 1e-9) for p in curve],
                        style,
                        color=colors[k % len(colors)],
                        label=f"{method} lr {row['lr']:g}",
                    )
            ax.set_title(f"{problem}, {schedule}")
            ax.set_xlabel("step")
            ax.set_ylabel("relative error of the delta")
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
