"""``tucker-peft`` command line: inspect a saved adapter, export it as LoRA, compress a LoRA adapter.

tucker-peft inspect DIR
tucker-peft export DIR OUT --format peft|diffusers|kohya|lycoris
tucker-peft compress LORA_DIR OUT --tau 0.1 [--max_rank R]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .export import FORMATS, _pipeline_parts, export_lora, from_lora, read_tucker_adapter


def inspect_adapter(directory: str) -> dict:
    """Per-layer ranks and parameters of a saved Tucker adapter, with the compression against LoRA of the same
    maximum rank (the largest rank of any layer, on every layer) and against the dense deltas (what
    ``tucker-peft inspect`` prints)."""
    config, modules, others = read_tucker_adapter(directory)
    lora_r = max(u.shape[1] for entry in modules.values() for u in entry["factors"][:2])
    layers = []
    for name, entry in sorted(modules.items()):
        core, factors = entry["core"], entry["factors"]
        ranks = [u.shape[1] for u in factors]
        sizes = [u.shape[0] for u in factors]
        window = math.prod(core.shape[len(factors) :]) * math.prod(sizes[2:])
        params = core.numel() + sum(u.numel() for u in factors)
        layers.append(
            {
                "module": name,
                "ranks": ranks,
                "params": params,
                "lora_params_max_rank": lora_r * (sizes[0] + sizes[1] * window),
                "dense_params": sizes[0] * sizes[1] * window,
            }
        )
    total = {k: sum(layer[k] for layer in layers) for k in ("params", "lora_params_max_rank", "dense_params")}
    history = os.path.join(directory, "tucker_ranks.json")
    plot = os.path.join(directory, "tucker_ranks.png")
    if not os.path.isfile(history):  # a checkpoint or final save inside a Trainer output_dir
        history = os.path.join(os.path.dirname(os.path.abspath(directory)), "tucker_ranks.json")
        plot = os.path.join(os.path.dirname(os.path.abspath(directory)), "tucker_ranks.png")
    return {
        "directory": directory,
        "base_model": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "tau": config.get("tau"),
        "layers": layers,
        "total": total,
        "other_params": sum(t.numel() for t in others.values()),
        "lora_max_rank": lora_r,
        "vs_lora_max_rank": total["params"] / total["lora_params_max_rank"],
        "vs_dense": total["params"] / total["dense_params"],
        "rank_history": history if os.path.isfile(history) else None,
        "rank_plot": plot if os.path.isfile(plot) else None,
    }


def _print_inspection(report: dict) -> None:
    base = f" of {report['base_model']}" if report["base_model"] else ""
    print(f"{report['directory']}: Tucker adapter (r={report['r']}, tau={report['tau']}){base}")
    width = max(len(layer["module"]) for layer in report["layers"])
    print(
        f"{'module':<{width}}  {'ranks':<14} {'params':>9} {'LoRA r=' + str(report['lora_max_rank']):>12} {'dense':>11}"
    )
    for layer in report["layers"]:
        ranks = "x".join(map(str, layer["ranks"]))
        print(
            f"{layer['module']:<{width}}  {ranks:<14} {layer['params']:>9,} {layer['lora_params_max_rank']:>12,} "
            f"{layer['dense_params']:>11,}"
        )
    total = report["total"]
    print(
        f"{'total':<{width}}  {'':<14} {total['params']:>9,} {total['lora_params_max_rank']:>12,} "
        f"{total['dense_params']:>11,}"
    )
    print(
        f"adapter parameters: {report['vs_lora_max_rank']:.3f}x LoRA of rank {report['lora_max_rank']}, {report['vs_dense']:.4f}x "
        f"the dense deltas; other saved parameters (modules_to_save): {report['other_params']:,}"
    )
    if report["rank_plot"] or report["rank_history"]:
        print(f"rank history: {report['rank_history']}  plot: {report['rank_plot']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tucker-peft", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help="per-layer ranks, parameters and compression of a saved Tucker adapter")
    p.add_argument(
        "directory", help="a folder written by save_pretrained / tucker_peft.save_adapter, or a DreamBooth output"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = commands.add_parser("export", help="write a saved Tucker adapter as a LoRA adapter (exact)")
    p.add_argument("directory", help="a saved Tucker adapter, or a DreamBooth output with unet/ (text_encoder/)")
    p.add_argument("output_dir", help="where to write the LoRA adapter")
    p.add_argument("--format", choices=FORMATS, default="peft", help="layout of the LoRA files (default: peft)")
    p = commands.add_parser("compress", help="turn a PEFT LoRA adapter into a Tucker adapter (truncated at --tau)")
    p.add_argument("lora_dir", help="a saved PEFT LoRA adapter")
    p.add_argument("output_dir", help="where to write the Tucker adapter")
    p.add_argument("--tau", type=float, default=0.1, help="relative truncation tolerance in [0, 1) (0: exact)")
    p.add_argument("--max_rank", type=int, default=None, help="largest rank per mode (default: the LoRA rank)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            parts = _pipeline_parts(args.directory)  # a DreamBooth output: one report per part (unet, text_encoder)
            reports = {part: inspect_adapter(folder) for part, folder in parts.items()}
            reports = reports or {None: inspect_adapter(args.directory)}
            if args.json:
                print(json.dumps(reports[None] if None in reports else reports, indent=1))
            else:
                for report in reports.values():
                    _print_inspection(report)
        elif args.command == "export":
            export_lora(args.directory, args.output_dir, args.format)
            print(f"wrote a {args.format} LoRA adapter to {args.output_dir}")
        else:
            from_lora(args.lora_dir, args.output_dir, tau=args.tau, max_rank=args.max_rank)
            report = inspect_adapter(args.output_dir)
            print(
                f"wrote a Tucker adapter to {args.output_dir}: {report['total']['params']:,} adapter parameters "
                f"({report['vs_lora_max_rank']:.3f}x LoRA of rank {report['lora_max_rank']})"
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"tucker-peft {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
