"""Paired-by-seed comparison of GLUE runs already in ``benchmarks/results/``: no training, a few seconds.

The GLUE runs of one method on one task come from several result files (more seeds were added run by run), so
the comparisons the README reports are collected here, with the runs each one uses named file by file:

    .venv/bin/python benchmarks/glue/paired.py      # prints the table, writes results/glue_paired.json

Every comparison pairs a tucker method with a baseline on the same task, data, schedule and seed (``run.py``'s
full profile; and full fine-tuning with LoRA r = 8, how far above LoRA any method gets at this profile), and gives
both methods' mean +- std over the seeds, their dev loss, their final trainable parameters, and the paired
difference of the task metric (mean +- its standard error, the t statistic, and on how many seeds the method is
ahead). Add a comparison to ``COMPARISONS`` when new runs land.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")

#: (file in benchmarks/results, method in that file, learning rate or None for the file's only rate); the files of
#: ``tucker_sched`` are the runs of the update as it is now (its step in float64 since 2026-12-02)
SOURCES = {
    "tucker_sched": {
        "sst2": [
            ("glue_float64_step_sst2.json", "tucker_sched", None),
            ("glue_float64_step_sst2_seeds_4_5.json", "tucker_sched", None),
            ("glue_float64_step_sst2_seeds_6_11.json", "tucker_sched", None),
        ],
        "mrpc": [
            ("glue_float64_step_stsb_mrpc.json", "tucker_sched", None),
            ("glue_float64_step_mrpc_seeds_3_11.json", "tucker_sched", None),
        ],
        "stsb": [("glue_float64_step_stsb_mrpc.json", "tucker_sched", None)],
    },
    "lora": {  # LoRA r = 8, lr 2e-3 (STS-B 1e-3): the tuned rates of run.py
        task: [
            ("glue_full.json", "lora", None),
            ("glue_full_more_seeds.json", "lora", None),
            (f"glue_full_more_seeds_{task}.json", "lora", None),
            (f"glue_full_seeds_7_11_{task}.json", "lora", None),
        ]
        for task in ("sst2", "mrpc")
    }
    | {task: [("glue_full.json", "lora", None)] for task in ("stsb", "rte")},
    "lora_r4": {  # LoRA r = 4, the matched budget (0.50x LoRA r = 8's parameters)
        task: [("glue_frontier.json", "lora_r4", None), (f"glue_lora_r4_seeds_3_11_{task}.json", "lora_r4", None)]
        for task in ("sst2", "mrpc")
    }
    | {"stsb": [("glue_tuning_sched.json", "lora_r4", 1e-3), ("glue_lora_r4_stsb.json", "lora_r4", None)]},
    # the default tolerance (tau = 0.1): on the update as it is now (SST-2, MRPC, STS-B), and on RTE as of
    # 2026-11-29, its step still in fp32 (RTE is at chance for every method)
    "tucker": {task: [("glue_float64_step_tucker_default.json", "tucker", None)] for task in ("sst2", "mrpc", "stsb")},
    "tucker_fp32_step": {"rte": [("glue_full_dynamics_rte.json", "tucker", None)]},
    "lora_r2": {  # LoRA r = 2, the LoRA rank nearest below the default tolerance's final size
        "sst2": [("glue_full_dynamics.json", "lora_r2", None)],
        "mrpc": [("glue_full_dynamics.json", "lora_r2", None)],
        "rte": [("glue_full_dynamics_rte.json", "lora_r2", None)],
        "stsb": [(f"glue_full_dynamics_stsb{part}.json", "lora_r2", None) for part in ("", "1", "2")],
    },
    # full fine-tuning (all 22.7M parameters, AdamW at its tuned 1e-4, STS-B 2e-4): how far above LoRA r = 8 any
    # method gets
    "full": {
        "sst2": [
            ("glue_tuning_full_ft.json", "full", 1e-4),
            ("glue_full_ft_sst2.json", "full", None),
            ("glue_full_ft_sst2_seeds_3_11.json", "full", None),
        ],
        "mrpc": [("glue_full_ft_mrpc.json", "full", None)],
        "stsb": [("glue_tuning_full_ft_stsb.json", "full", 2e-4), ("glue_full_ft_stsb.json", "full", None)],
    },
}
#: (task, method, baseline): a tucker method against a baseline, and full fine-tuning against LoRA r = 8
COMPARISONS = (
    [(task, "tucker_sched", baseline) for task in ("sst2", "mrpc", "stsb") for baseline in ("lora", "lora_r4")]
    + [
        (task, method, baseline)
        for task, method in (("sst2", "tucker"), ("mrpc", "tucker"), ("stsb", "tucker"), ("rte", "tucker_fp32_step"))
        for baseline in ("lora", "lora_r2")
    ]
    + [
        (task, method, baseline)
        for task in ("sst2", "mrpc", "stsb")
        for method, baseline in (("full", "lora"), ("tucker_sched", "full"))
    ]
)


def load_runs(method: str, task: str) -> dict[int, dict]:
    """``method``'s runs on ``task`` by seed, from the files ``SOURCES`` names; a missing file or a seed found twice
    is an error (a comparison must not silently lose or double a run)."""
    by_seed: dict[int, dict] = {}
    for name, file_method, lr in SOURCES[method][task]:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: named in paired.py's SOURCES[{method!r}][{task!r}] but not there.")
        with open(path) as f:
            runs = json.load(f)["runs"]
        mine = [
            r
            for r in runs
            if r.get("task") == task and r.get("method") == file_method and (lr is None or r["learning_rate"] == lr)
        ]
        if not mine:
            raise ValueError(f"{name} has no {file_method} run on {task}" + (f" at lr {lr}" if lr else "") + ".")
        for run in mine:
            if run["seed"] in by_seed:
                raise ValueError(f"{method} on {task}: seed {run['seed']} is in {name} and in an earlier file.")
            by_seed[run["seed"]] = run | {"file": name}
    return by_seed


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(task: str, method: str, baseline: str) -> dict:
    """The paired comparison of ``method`` with ``baseline`` on ``task`` over the seeds both have."""
    mine, theirs = load_runs(method, task), load_runs(baseline, task)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        raise ValueError(f"{method} and {baseline} share no seed on {task}.")
    row = {"task": task, "method": method, "baseline": baseline, "seeds": seeds, "metric": mine[seeds[0]]["metric"]}
    for key, runs in (("tucker", mine), ("reference", theirs)):
        values = [runs[s]["value"] for s in seeds]
        losses = [runs[s]["eval_metrics"]["eval_loss"] for s in seeds]
        row[key] = {
            "mean": _mean_std(values)[0],
            "std": _mean_std(values)[1],
            "dev_loss": statistics.mean(losses),
            "params_end": statistics.mean(runs[s]["trainable_params_end"] for s in seeds),
            "per_seed": values,
            "files": sorted({runs[s]["file"] for s in seeds}),
        }
    diffs = [mine[s]["value"] - theirs[s]["value"] for s in seeds]
    mean, std = _mean_std(diffs)
    se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    loss_diffs = [mine[s]["eval_metrics"]["eval_loss"] - theirs[s]["eval_metrics"]["eval_loss"] for s in seeds]
    row["paired"] = {
        "diff_mean": mean,
        "diff_se": se,
        "t": mean / se if se and not math.isnan(se) else float("nan"),
        "ahead": sum(d > 0 for d in diffs),
        "level": sum(d == 0 for d in diffs),
        "dev_loss_diff_mean": statistics.mean(loss_diffs),
        "dev_loss_diff_se": _mean_std(loss_diffs)[1] / math.sqrt(len(seeds)) if len(seeds) > 1 else float("nan"),
        "params_ratio": row["tucker"]["params_end"] / row["reference"]["params_end"],
        "std_ratio": row["tucker"]["std"] / row["reference"]["std"],
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "glue_paired.json"))
    args = parser.parse_args()
    rows = [compare(*c) for c in COMPARISONS]
    with open(args.out, "w") as f:
        json.dump(
            {"command": ".venv/bin/python benchmarks/glue/paired.py", "date": date.today().isoformat()}
            | {"sources": SOURCES, "rows": rows},
            f,
            indent=2,
        )
    print(
        "| task | method | baseline | seeds | method mean ± std | baseline mean ± std | paired diff (points) | t | "
        "method ahead | dev loss diff | params ratio | std ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, p = r["tucker"], r["reference"], r["paired"]
        print(
            f"| {r['task']} ({r['metric']}) | {r['method']} | {r['baseline']} | {len(r['seeds'])} | "
            f"{a['mean']:.4f} ± {a['std']:.4f} | {b['mean']:.4f} ± {b['std']:.4f} | "
            f"{100 * p['diff_mean']:+.2f} ± {100 * p['diff_se']:.2f} | {p['t']:+.1f} | "
            f"{p['ahead']} of {len(r['seeds'])}"
            + (f" ({p['level']} level)" if p["level"] else "")
            + f" | {p['dev_loss_diff_mean']:+.4f} ± {p['dev_loss_diff_se']:.4f} | "
            f"{_ratio(p['params_ratio'])} | {_ratio(p['std_ratio'])} |"
        )


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (0.0066x, not 0.01x)."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


if __name__ == "__main__":
    main()
