"""Launch-count proxy for the accelerator cost of a step (used by ``benchmarks/`` and the tests).

On a GPU every small op is at least one kernel launch, so the number of top-level ``aten::`` ops (ops whose parent is
not an ``aten::`` op) decides the cost of a step made of many small ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def count_top_level_ops(fn: Callable[[], Any]) -> int:
    """Number of ``aten::`` ops run by ``fn()`` whose parent is not an ``aten::`` op (counted with ``torch.profiler``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return top_level_ops(prof.events())


def top_level_ops(events: Iterable[Any]) -> int:
    """Number of ``aten::`` events among a profile's ``events`` whose parent is not an ``aten::`` op."""
    count = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            count += 1
    return count
