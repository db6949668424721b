"""benchmarks/cuda_cost.py is the one prepared run for a lent GPU (issue 12): its code runs here on CPU, on a tiny
BERT point, so it has not rotted when a GPU comes."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import cuda_cost  # noqa: E402


def _small_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(  # measure() draws token ids from [1000, 20000)
        vocab_size=20000, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2
    )
    return BertForSequenceClassification(config)


def test_cuda_cost_measure_runs_on_cpu(monkeypatch):
    monkeypatch.setitem(cuda_cost.POINTS, "small", (_small_bert, "SEQ_CLS", cuda_cost.BERT_TARGETS, 2, 16))
    row = cuda_cost.measure("small", torch.device("cpu"), steps=2, warmup=1, op_steps=2)
    assert row["batch"] == [2, 16]
    assert set(row["median_ms"]) == {
        f"{m}_{part}" for m in ("lora", "tucker") for part in ("fwd_bwd", "optimizer_step", "step")
    }
    assert all(v > 0 for v in row["median_ms"].values())
    counts = row["per_step_counts (optimizer: mean of 2)"]
    assert all("kernels" not in c for c in counts.values())  # CUDA kernels are counted only on CUDA
    # tucker's optimizer step is AdamW over the head plus the geometric update: more ops than LoRA's AdamW alone
    assert counts["tucker_optimizer_step"]["top_level_ops"] > counts["lora_optimizer_step"]["top_level_ops"] > 0
    assert 1 <= row["tucker_ranks"]["min"] <= row["tucker_ranks"]["max"] <= 8
