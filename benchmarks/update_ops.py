"""Launch-count proxy for the accelerator cost of the update: top-level ``aten::`` ops per optimizer step.

On a GPU every small op is at least one kernel launch, so the number of top-level ``aten::`` ops (ops whose parent
is not an ``aten::`` op, counted with ``torch.profiler``) is what decides the update's cost there.  Measured for
MiniLM's width (hidden 384, intermediate 1536, 12 heads; random weights from the config, so no download) at 6 and
24 layers, adapters on the 6 attention and feed-forward linears of every layer, batch 8 x 32, lr 1e-3, r = 8,
the update's count averaged over ``--steps`` optimizer steps after ``--warmup`` (so that ranks have spread out and
periodic work is included; the forward+backward and AdamW counts, the same every step, over 5 steps).  Reported per step: the model's forward+backward, ``TuckerOptimizer.step()``, and for LoRA
``torch.optim.AdamW`` (foreach) over its factors.

    python benchmarks/update_ops.py [--steps 50] [--warmup 30] [--out benchmarks/results/update_ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from datetime import date

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from tucker_peft import TuckerLoraConfig, TuckerOptimizer
from tucker_peft.profiling import count_top_level_ops

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def model(layers: int):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=layers, num_labels=2
    )
    return BertForSequenceClassification(config)


def measure(layers: int, steps: int, warmup: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    tucker = get_peft_model(model(layers), TuckerLoraConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=TARGETS))
    update = TuckerOptimizer(tucker, lr=1e-3)
    head = torch.optim.AdamW([p for n, p in tucker.named_parameters() if p.requires_grad and "tucker_" not in n])
    lora = get_peft_model(model(layers), LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=TARGETS))
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3, foreach=True)

    def fwd_bwd(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=labels).loss.backward()

    counts = {"tucker_fwd_bwd": [], "tucker_update": [], "lora_fwd_bwd": [], "lora_adamw": []}
    for i in range(warmup + steps):
        # the update's count varies with the ranks: every step is counted; the others are the same every step, so
        # (profiling being slow) the first 5 counted steps are enough for them
        for name, fn in (
            ("tucker_fwd_bwd", lambda: fwd_bwd(tucker)),
            ("tucker_update", update.step),
            ("lora_fwd_bwd", lambda: fwd_bwd(lora)),
            ("lora_adamw", lora_opt.step),
        ):
            if i >= warmup and (name == "tucker_update" or i < warmup + 5):
                counts[name].append(count_top_level_ops(fn))
            else:
                fn()
        head.step()
    ranks = [r for v in update.ranks().values() for r in v]
    return {
        "layers": layers,
        "adapted_layers": len(update.param_groups),
        "ops_per_step": {k: statistics.mean(v) for k, v in counts.items()},
        "ops_max": {k: max(v) for k, v in counts.items()},
        "ranks": {"min": min(ranks), "mean": statistics.mean(ranks), "max": max(ranks)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "update_ops.json"))
    args = parser.parse_args()
    rows = [measure(layers, args.steps, args.warmup, args.batch, args.seq) for layers in (6, 24)]
    small, large = rows
    result = {
        "command": f"python benchmarks/update_ops.py --steps {args.steps} --warmup {args.warmup} "
        f"--batch {args.batch} --seq {args.seq}",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "rows": rows,
        "update_over_fwd_bwd": {
            r["layers"]: r["ops_per_step"]["tucker_update"] / r["ops_per_step"]["tucker_fwd_bwd"] for r in rows
        },
        "update_24_over_6_layers": large["ops_per_step"]["tucker_update"] / small["ops_per_step"]["tucker_update"],
        "targets (issue 12)": "update <= 0.25x fwd+bwd ops; 24 layers <= 1.2x 6 layers",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| layers | tucker fwd+bwd | tucker update | update / fwd+bwd | LoRA fwd+bwd | LoRA AdamW | mean rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["ops_per_step"]
        print(
            f"| {r['layers']} | {o['tucker_fwd_bwd']:.0f} | {o['tucker_update']:.0f} | "
            f"{o['tucker_update'] / o['tucker_fwd_bwd']:.2f} | {o['lora_fwd_bwd']:.0f} | {o['lora_adamw']:.0f} | "
            f"{r['ranks']['mean']:.2f} |"
        )
    print(f"update ops, 24 / 6 layers: {result['update_24_over_6_layers']:.2f}")


if __name__ == "__main__":
    main()
