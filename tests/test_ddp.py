"""Two CPU processes (gloo) under DDP end every step with identical ranks and factors, equal to one process
training on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tucker_peft

from . import ddp_worker

STEPS = 8


@pytest.mark.slow
@pytest.mark.parametrize("basis_interval", [1, 3])
def test_two_process_ddp_agrees(tmp_path, basis_interval):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(tmp_path), str(STEPS), str(basis_interval)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # the workers end themselves after 200 s with their stacks on stderr
        pytest.fail(f"the DDP run hung; its stderr ends with:\n{(e.stderr or b'')[-6000:].decode(errors='replace')}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    first, second = torch.load(tmp_path / "ddp_result.pt", weights_only=False)
    assert first["ranks"] == second["ranks"]
    assert set(first["ranks"].values()) != {(6, 6)}  # ranks changed during the run
    for name, p in first["params"].items():
        torch.testing.assert_close(second["params"][name], p, atol=1e-7, rtol=0, msg=name)

    # the same training in one process on the whole batch: DDP's gradient average is the full-batch mean
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _single_process_matches(first, basis_interval)
    finally:
        torch.set_num_threads(threads)


def _single_process_matches(first, basis_interval):
    model = ddp_worker.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    tucker = tucker_peft.attach(optimizer, model, basis_interval=basis_interval)
    for batch in ddp_worker.batches(STEPS):
        halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
        optimizer.zero_grad()
        for half in halves:
            (model(**half).loss / 2).backward()
        optimizer.step()
    assert tucker.ranks() == first["ranks"]
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), first["params"][name], atol=1e-4, rtol=1e-3, msg=name)
