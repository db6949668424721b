"""DreamBooth quality proxy: training loss of tucker vs LoRA on the tiny offline pipeline with the real dog photos.

No Stable Diffusion weights exist offline, so this compares how well each adapter fits the DreamBooth objective
(noise-prediction MSE) on a tiny pipeline built from configs (``examples/dreambooth/make_tiny_pipeline.py``, 64 px)
over the same steps, seeds and data: 3 seeds x {tucker r=8 (adaptive), lora r=4}, reporting the mean loss of the
last 20 steps and the final adapter parameters.

    python benchmarks/dreambooth_proxy.py [--steps 60] [--out benchmarks/results/dreambooth_proxy.json]
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
import tempfile
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "dreambooth"))
DOG = os.path.join(ROOT, "..", "shared", "data", "dreambooth", "dog")
RUNS = {"tucker": "--method tucker --rank 8 --tau 0.1", "lora": "--method lora --rank 4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dreambooth_proxy.json"))
    args = parser.parse_args()
    import make_tiny_pipeline
    import train_dreambooth_tucker

    import tucker_peft

    work = tempfile.mkdtemp(prefix="dreambooth-proxy-")
    pipeline = os.path.join(work, "tiny-sd")
    make_tiny_pipeline.build_tiny_pipeline(seed=0, sample_size=64).save_pretrained(pipeline)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method, flags in RUNS.items():
            out = os.path.join(work, f"{method}-{seed}")
            argv = (
                f"--pretrained_model_name_or_path {pipeline} --instance_data_dir {DOG} --instance_prompt a_photo_of_sks_dog "
                f"--resolution 64 --train_batch_size 2 --max_train_steps {args.steps} --learning_rate 1e-3 {flags} "
                f"--output_dir {out} --report_to none --checkpointing_steps 100000 --seed {seed}"
            ).split()
            t0 = time.time()
            with contextlib.redirect_stderr(io.StringIO()):
                result = train_dreambooth_tucker.main(argv)
            unet = result["unet"]
            params = (
                tucker_peft.adapter_parameter_count(unet)
                if method == "tucker"
                else sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
            )
            losses = result["loss_history"]
            runs.append({
                "method": method, "seed": seed, "final_loss": statistics.mean(losses[-20:]), "params": params,
                "loss_history": losses, "seconds": time.time() - t0,
            })  # fmt: skip
            print(f"{method} seed {seed}: last-20 loss {runs[-1]['final_loss']:.4f}, params {params:,}", flush=True)
            del unet, result
    summary = {}
    for method in RUNS:
        mine = [r for r in runs if r["method"] == method]
        losses = [r["final_loss"] for r in mine]
        summary[method] = {
            "final_loss_mean": statistics.mean(losses),
            "final_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "params_mean": statistics.mean(r["params"] for r in mine),
        }
    result = {
        "command": f"python benchmarks/dreambooth_proxy.py --steps {args.steps} --seeds {args.seeds}",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "setup": "tiny SD pipeline from configs (64 px, random weights), 5 real dog photos, batch 2, lr 1e-3",
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| method | last-20-step loss (mean +- std over seeds) | final adapter parameters |\n|---|---|---|")
    for method, s in summary.items():
        print(f"| {method} | {s['final_loss_mean']:.4f} +- {s['final_loss_std']:.4f} | {s['params_mean']:,.0f} |")


if __name__ == "__main__":
    main()
