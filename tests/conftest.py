"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import tucker_peft

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bert(seed: int, **config):
    """A 2-layer, 32-wide BERT classifier built from a config (no download), seeded; ``config`` overrides."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    defaults = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    return BertForSequenceClassification(BertConfig(**(defaults | config)))


def tiny_bert(num_labels: int = 2):
    return _bert(0, vocab_size=120, max_position_embeddings=64, num_labels=num_labels).eval()


def reproducible_bert(seed: int = 0):
    """A 2-layer BERT without dropout (runs are reproducible step for step); also used by ``ddp_worker.py``."""
    return _bert(
        seed, vocab_size=60, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def token_task(n: int = 96, seed: int = 0) -> list[dict]:
    """Label 1 iff token 7 occurs in the sequence: learnable by a tiny BERT in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(10, 60, (12,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[torch.randint(0, 12, (1,), generator=g)] = 7
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": torch.tensor(label)}
        )
    return rows


def loop_model(seed: int = 0):
    """A reproducible BERT with Tucker adapters (r = 6, tau = 0.1) and one batch of :func:`token_task`."""
    from peft import get_peft_model

    model = get_peft_model(reproducible_bert(seed), tucker_peft.TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1))
    batch = {k: torch.stack([r[k] for r in token_task(16)]) for k in ("input_ids", "attention_mask", "labels")}
    return model, batch


def train_steps(tmp_path, max_steps: int, resume=None, save_steps=None):
    """Train :func:`loop_model`'s model with the Trainer and the callback (batch 8, lr 2e-2); optional checkpoints."""
    from transformers import Trainer

    model = loop_model()[0]
    args = trainer_args(
        tmp_path,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        per_device_train_batch_size=8,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_task(), callbacks=[tucker_peft.TuckerLoraCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model


def planted_lora(tmp_path, rank: int = 3):
    """A LoRA r=8 adapter on tiny BERT, saved to ``tmp_path/lora``, whose every delta has rank ``rank``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape[0], rank, generator=g) @ torch.randn(rank, b.shape[1], generator=g) / 4)
    model.save_pretrained(tmp_path / "lora")
    return model


class Net(nn.Module):
    """One layer of the type under test, wrapped so that PEFT can target it by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 5, 24, generator=g),
    )


UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "time_emb_proj",
    "ff.net.2",
]


@torch.no_grad()
def randomize_adapter(model, adapter_name: str = "default", seed: int = 0, vary_ranks: bool = True) -> dict:
    """Give every Tucker layer a random non-zero core and (if ``vary_ranks``) a different rank per layer/mode.

    Returns the new ranks.  Used to test forward, merging and save/load away from the zero-core init.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = {}
    for i, (name, layer) in enumerate(tucker_peft.iter_tucker_layers(model, adapter_name)):
        factors = layer.factors(adapter_name)
        core = layer.core(adapter_name)
        new_ranks = []
        for j, u in enumerate(factors):
            r = u.shape[1]
            new_ranks.append(max(1, r - (i + j) % r) if vary_ranks else r)
        dense = tuple(core.shape[len(factors) :])
        new_ranks = tucker_peft.tensor_ops.valid_tucker_ranks(new_ranks, dense)
        new_factors = [u[:, :r].clone() for u, r in zip(factors, new_ranks)]
        new_core = torch.randn(*new_ranks, *dense, generator=g) * 0.3
        layer.set_factors(adapter_name, new_core, new_factors)
        ranks[name] = tuple(new_ranks)
    return ranks


def run_fresh_python(code: str, cwd, **env_vars: str) -> str:
    """Run ``code`` in a new Python process (nothing imported yet, ``env_vars`` added to the environment) and return
    its stdout; fail with its stderr."""
    # same thread count as this process: reductions (and so the last bits of results) depend on it
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.update(env_vars)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"fresh process failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


class Regression(nn.Module):
    """A frozen linear layer fitted to a planted target; returns the loss the Trainer expects."""

    def __init__(self, base):
        super().__init__()
        self.layer = base

    def forward(self, x, y):
        return {"loss": 0.5 * ((self.layer(x) - y) ** 2).sum(-1).mean()}


def trainer_args(tmp_path, **kw) -> TrainingArguments:
    """Small CPU ``TrainingArguments`` for the tests (constant lr 2e-2, 40 steps, no saving); ``kw`` overrides."""
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        learning_rate=2e-2,
        max_steps=40,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)
