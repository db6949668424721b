"""Worker for tests/test_ddp.py: trains a tiny BERT with Tucker adapters under DDP (gloo, CPU) via ``attach``.

Run by ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR STEPS``.
Every process gets its own half of each batch; process 0 writes every process's factors and ranks to OUT_DIR.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

import tucker_peft
from tucker_peft import TuckerLoraConfig

try:
    from .conftest import reproducible_bert
except ImportError:  # run as a script by torch.distributed.run
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import reproducible_bert


def build():
    return get_peft_model(reproducible_bert(), TuckerLoraConfig(task_type="SEQ_CLS", r=6, tau=0.1))


def batches(steps: int, size: int = 16):
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        ids = torch.randint(10, 60, (size, 12), generator=g)
        labels = (ids == 7).any(dim=1).long() | (ids[:, 0] > 35).long()
        yield {"input_ids": ids, "labels": labels}


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    basis_interval = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(1)
    # a stuck run fails with every thread's stack on stderr (which the test reports) instead of hanging the test:
    # collectives time out after 120 s, and the whole worker is dumped and ended after 200 s (a run takes ~10 s)
    faulthandler.dump_traceback_later(200, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    tucker = tucker_peft.attach(optimizer, model, basis_interval=basis_interval)  # before DDP wraps the model
    ddp = DistributedDataParallel(model)
    for batch in batches(steps):
        part = {k: v[rank::world] for k, v in batch.items()}
        optimizer.zero_grad()
        ddp(**part).loss.backward()
        optimizer.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gathered = [None] * world
    dist.all_gather_object(gathered, {"params": params, "ranks": tucker.ranks()})
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "ddp_result.pt"))
        with open(os.path.join(out_dir, "ddp_ranks.json"), "w") as f:
            json.dump({str(i): {k: list(v) for k, v in g["ranks"].items()} for i, g in enumerate(gathered)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
