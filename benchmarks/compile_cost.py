"""``torch.compile`` with rank-adaptive adapters: recompilations and step time against LoRA, compiled and eager.

The update changes the factors' shapes whenever a rank changes, and a compiled graph is specialized to its
parameters' shapes.  While the update trains them, tucker-peft therefore runs the adapters outside the compiled
graphs (a graph break at each adapted layer; ``TuckerLayer._adapter_delta``) and compiles the base model.  This measures, for MiniLM's width (hidden
384, intermediate 1536, 12 heads, ``--layers`` layers; random weights from the config, no download), adapters on the
6 attention and feed-forward linears of every layer, batch ``--batch`` x ``--seq``, lr 2e-3 (constant), r = 8:

- ``lora``: PEFT's LoRA + AdamW; ``tucker``: Tucker adapters (tau 0.1) + the update through ``tucker_peft.attach``;
- each eager and under ``torch.compile(model)`` (inductor); and ``tucker, adapters in the graph``: the adapters
  traced into the graph as before 2026-12-03 (the library's method swapped for its eager body in this process);
- per run: the first step (compilation), the median of the last half of the steps, the total, dynamo's graphs after
  step 2 and at the end (a graph made after step 2 is a recompilation: step 2 makes one for BERT's config change in
  its first forward, for every method), the number of steps at which a rank changed, and the final loss (compiled
  runs must equal the eager ones up to round-off).

    python benchmarks/compile_cost.py [--steps 30] [--layers 6] [--out benchmarks/results/compile_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

# every run compiles from scratch: inductor's on-disk caches would carry compiled graphs from one run to the next
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import tucker_peft
from tucker_peft import TuckerLoraConfig
from tucker_peft import layer as layer_module

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def model(layers: int):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_attention_heads=12,
        num_hidden_layers=layers,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def run(method: str, compiled: bool, args) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (reset() keeps the counters)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
            torch.randint(0, 2, (args.batch,), generator=g),
        )
        for _ in range(args.steps)
    ]
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=TARGETS)
    else:
        config = TuckerLoraConfig(task_type="SEQ_CLS", r=8, alpha=8, tau=0.1, target_modules=TARGETS)
    peft_model = get_peft_model(model(args.layers), config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    update = tucker_peft.attach(optimizer, peft_model) if method == "tucker" else None
    forward = torch.compile(peft_model) if compiled else peft_model
    times, rank_changes, graphs_after_2 = [], 0, None
    ranks = update.ranks() if update else None
    for step, (ids, labels) in enumerate(batches, 1):
        start = time.perf_counter()
        loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if update is not None:
            now = update.ranks()
            rank_changes += now != ranks
            ranks = now
        if step == 2:
            graphs_after_2 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tail = times[len(times) // 2 :]
    return {
        "first_step_s": round(times[0], 3),
        "median_step_s_last_half": round(statistics.median(tail), 4),
        "total_s": round(sum(times), 2),
        "graphs_after_step_2": graphs_after_2,
        "graphs_at_end": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "steps_with_a_rank_change": rank_changes if update else None,
        "final_loss": round(loss.item(), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/compile_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    rows = {}
    for name, method, compiled in (
        ("lora, eager", "lora", False),
        ("lora, compiled", "lora", True),
        ("tucker, eager", "tucker", False),
        ("tucker, compiled", "tucker", True),
    ):
        rows[name] = run(method, compiled, args)
        print(name, rows[name], flush=True)
    # before 2026-12-03 the adapters were traced into the graph: the same method without the torch.compiler.disable
    original = layer_module.TuckerLayer._adapter_delta
    layer_module.TuckerLayer._adapter_delta = lambda self, result, x, adapter: layer_module._adapter_delta(
        self, result, x, adapter
    )
    try:
        rows["tucker, compiled, adapters in the graph (before)"] = run("tucker", True, args)
    finally:
        layer_module.TuckerLayer._adapter_delta = original
    print("tucker, compiled, adapters in the graph (before)", rows["tucker, compiled, adapters in the graph (before)"])

    lora_compiled = rows["lora, compiled"]["median_step_s_last_half"]
    print(
        "\n| run | first step (s) | median step, last half (s) | / LoRA compiled | total (s) | graphs after step 2 "
        "| graphs at end | steps with a rank change | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['first_step_s']} | {r['median_step_s_last_half']} | "
            f"{r['median_step_s_last_half'] / lora_compiled:.2f} | {r['total_s']} | {r['graphs_after_step_2']} | "
            f"{r['graphs_at_end']} | {r['steps_with_a_rank_change'] if r['steps_with_a_rank_change'] is not None else '-'} "
            f"| {r['final_loss']} |"
        )
    result = {
        "command": "python benchmarks/compile_cost.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU",
        "settings": vars(args),
        "runs": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
