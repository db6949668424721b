"""Cost of a Tucker conv adapter vs PEFT's LoRA on ``nn.Conv2d`` at equal trainable parameters, SD-1.5 shapes.

Stable Diffusion 1.5's ResNet 3x3 convolutions: 320 channels at 64 x 64 latents, 640 at 32 x 32, 1280 at 16 x 16;
batch 2, CPU.  LoRA has rank 8 (A: r x C x 3 x 3, B: C x r); the Tucker adapter (channels mode, U_out, U_in and an
r x r x 3 x 3 core) gets the rank whose parameter count is closest to LoRA's.  Forward + backward of the adapted
layer (base weight frozen), the two methods interleaved, medians, once with an input that needs no gradient (the
first layer of a network) and once with one that does (a layer inside it: the backward also computes the input's
gradient, through the base conv too); memory: the bytes autograd saves for the backward pass (activations kept by
the layer), counted with ``saved_tensors_hooks``.

    python benchmarks/conv_cost.py [--repeats 15] [--out benchmarks/results/conv_cost.json]
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
from torch import nn

import tucker_peft

SHAPES = [(320, 64), (640, 32), (1280, 16)]


class Net(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def tucker_rank_for(params: int, channels: int) -> int:
    """Rank r of a channels-mode Tucker 3x3 adapter (2 C r + 9 r^2 parameters) closest to ``params``."""
    return min(range(1, channels + 1), key=lambda r: abs(2 * channels * r + 9 * r * r - params))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv_cost.json"))
    args = parser.parse_args()
    rows = []
    for channels, size in SHAPES:
        torch.manual_seed(0)
        lora = get_peft_model(Net(channels), LoraConfig(target_modules=["conv"], r=args.lora_rank, lora_alpha=8))
        n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        r = tucker_rank_for(n_lora, channels)
        tucker = get_peft_model(
            Net(channels),
            tucker_peft.TuckerLoraConfig(target_modules=["conv"], r=r, max_rank=max(32, r), init_weights=False),
        )
        n_tucker = tucker_peft.adapter_parameter_count(tucker)
        for input_grad in (False, True):  # a first layer vs a layer inside the network (grad w.r.t. its input)
            x = torch.randn(2, channels, size, size, requires_grad=input_grad)
            times = {"lora": [], "tucker": []}
            for i in range(args.repeats + 2):
                order = (("lora", lora), ("tucker", tucker)) if i % 2 else (("tucker", tucker), ("lora", lora))
                for name, model in order:
                    model.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    model(x).sum().backward()
                    if i >= 2:
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            mem = {"lora": saved_bytes(lora, x), "tucker": saved_bytes(tucker, x)}
            rows.append({
                "channels": channels, "latent": size, "input_requires_grad": input_grad, "lora_rank": args.lora_rank,
                "tucker_rank": r, "lora_params": n_lora, "tucker_params": n_tucker,
                "median_seconds": med, "time_ratio": med["tucker"] / med["lora"],
                "saved_bytes": mem, "memory_ratio": mem["tucker"] / mem["lora"],
            })  # fmt: skip
    result = {
        "command": f"python benchmarks/conv_cost.py --repeats {args.repeats}",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        "| channels x latent | input grad | LoRA r / params | Tucker r / params | fwd+bwd LoRA | Tucker | ratio | saved activations ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['channels']} x {row['latent']}^2 | {'yes' if row['input_requires_grad'] else 'no'} | {row['lora_rank']} / {row['lora_params']:,} | "
            f"{row['tucker_rank']} / {row['tucker_params']:,} | {1000 * row['median_seconds']['lora']:.1f} ms | "
            f"{1000 * row['median_seconds']['tucker']:.1f} ms | {row['time_ratio']:.3f} | {row['memory_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
