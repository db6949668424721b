"""The update's cost on an accelerator (issue 12's CUDA figures): one prepared run for a lent GPU machine.

Models are built from configs (random weights; nothing to download or carry): MiniLM's width (BERT, hidden 384,
intermediate 1536, 12 heads, 6 layers; batch 16 x 128) and the wide Llama-style point of ``update_cost.py`` (hidden
2048, 4 layers, q/k/v/o/gate/up/down; batch 1 x 256), r = 8, lr 1e-3.  Per point, in one process, interleaved
(alternating which goes first), medians of ``--steps`` after ``--warmup``:

- a whole training step (forward, backward, AdamW; tucker with ``tucker_peft.attach``) for LoRA and tucker;
- the optimizer step alone (LoRA: AdamW over its factors; tucker: AdamW over the head plus the geometric update),
  and its ratio to LoRA's forward + backward;
- top-level ``aten::`` ops and, on CUDA, kernel launches of one optimizer step (mean of ``--op-steps``) and of one
  forward + backward.

On CUDA every timed region ends with ``torch.cuda.synchronize()``.  It runs on CPU too (``--device cpu``, the
default), which is how it is checked without a GPU; the CPU figures of record are ``update_cost.py`` and
``step_cost.py``.

    python benchmarks/cuda_cost.py --device cuda [--steps 30] [--out benchmarks/results/cuda_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from update_cost import wide_llama  # the same wide point (benchmarks/ is the script's folder)

import tucker_peft
from tucker_peft import TuckerLoraConfig
from tucker_peft.profiling import top_level_ops

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def minilm_width():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=6, num_labels=2
    )
    return BertForSequenceClassification(config)


POINTS = {
    # name: (builder, task type, targets, batch, sequence length)
    "minilm": (minilm_width, "SEQ_CLS", BERT_TARGETS, 16, 128),
    "wide": (wide_llama, "CAUSAL_LM", LLAMA_TARGETS, 1, 256),
}


def launches(fn, device: torch.device) -> dict:
    """Top-level ``aten::`` ops of ``fn()`` and, on CUDA, the kernels it launched."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    out = {"top_level_ops": top_level_ops(events)}
    if device.type == "cuda":
        out["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def measure(point: str, device: torch.device, steps: int, warmup: int, op_steps: int) -> dict:
    build, task_type, targets, batch, seq = POINTS[point]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g).to(device)
    labels = (torch.randint(0, 2, (batch,), generator=g) if task_type == "SEQ_CLS" else ids.cpu()).to(device)
    runs, update = {}, None
    for method in ("lora", "tucker"):
        torch.manual_seed(0)
        if method == "lora":
            config = LoraConfig(task_type=task_type, r=8, lora_alpha=8, target_modules=targets)
        else:
            config = TuckerLoraConfig(task_type=task_type, r=8, alpha=8, target_modules=targets)
        model = get_peft_model(build(), config).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if method == "tucker":
            update = tucker_peft.attach(optimizer, model)
        runs[method] = (model, optimizer)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd_bwd(method):
        model, optimizer = runs[method]
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    times = {f"{m}_{part}": [] for m in runs for part in ("fwd_bwd", "optimizer_step", "step")}
    for i in range(warmup + steps):
        for method in ("lora", "tucker") if i % 2 else ("tucker", "lora"):
            sync()
            t0 = time.perf_counter()
            fwd_bwd(method)
            sync()
            t1 = time.perf_counter()
            runs[method][1].step()
            sync()
            t2 = time.perf_counter()
            if i >= warmup:
                times[f"{method}_fwd_bwd"].append(t1 - t0)
                times[f"{method}_optimizer_step"].append(t2 - t1)
                times[f"{method}_step"].append(t2 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    counts = {}
    for method in runs:
        counts[f"{method}_fwd_bwd"] = launches(lambda m=method: fwd_bwd(m), device)
        per_step = []
        for _ in range(op_steps):
            per_step.append(launches(runs[method][1].step, device))
            fwd_bwd(method)
        counts[f"{method}_optimizer_step"] = {k: statistics.mean(c[k] for c in per_step) for k in per_step[0]}
    ranks = [r for v in update.ranks().values() for r in v]
    return {
        "batch": [batch, seq],
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "tucker_step_over_lora_step": med["tucker_step"] / med["lora_step"],
        "tucker_optimizer_step_over_lora_fwd_bwd": med["tucker_optimizer_step"] / med["lora_fwd_bwd"],
        "slowest_tucker_step_over_median": max(times["tucker_step"]) / med["tucker_step"],
        f"per_step_counts (optimizer: mean of {op_steps})": counts,
        "tucker_ranks": {"min": min(ranks), "mean": statistics.mean(ranks), "max": max(ranks)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", default="minilm,wide")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--op-steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cuda_cost.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    points = {p: measure(p, device, args.steps, args.warmup, args.op_steps) for p in args.points.split(",")}
    result = {
        "command": f"python benchmarks/cuda_cost.py --device {args.device} --points {args.points} --steps {args.steps} "
        f"--warmup {args.warmup} --op-steps {args.op_steps}",
        "date": date.today().isoformat(),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "versions": {"torch": torch.__version__, "tucker_peft": tucker_peft.__version__},
        "points": points,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        "| point | LoRA step | tucker step | / LoRA | tucker optimizer step / LoRA fwd+bwd | optimizer ops | kernels |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in points.items():
        med = r["median_ms"]
        opt = next(v for k, v in r.items() if k.startswith("per_step_counts"))["tucker_optimizer_step"]
        print(
            f"| {name} | {med['lora_step']:.1f} ms | {med['tucker_step']:.1f} ms | "
            f"{r['tucker_step_over_lora_step']:.3f} | {r['tucker_optimizer_step_over_lora_fwd_bwd']:.3f} | "
            f"{opt['top_level_ops']:.0f} | {opt.get('kernels', '-')} |"
        )


if __name__ == "__main__":
    main()
