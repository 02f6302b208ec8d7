"""Scoped intra-op thread counts for ops made of many small steps.

NOTE: torch's intra-op thread count is process-wide; these scopes assume the ops run from one
Python thread at a time (as in training and in the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_thread", "outer_threads"]

# The thread count that the innermost active ``one_thread`` replaced (0: none active).
_outer = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed ops on one intra-op thread, then restore the previous count.

    NOTE: the CPU scans issue from ~100 (SSD) to ~1000 (selective scan) small ops per layer.
    With several threads each op ends in an OpenMP barrier, and on a CPU shared with other
    processes a descheduled thread stalls every barrier: measured on 2 shared cores, one
    layer's selective scan took 9.3 s with 2 threads and 0.10 s with 1. One thread costs
    little when the machine is idle and keeps these ops predictable when it is not.
    """
    global _outer
    threads, saved_outer = torch.get_num_threads(), _outer
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    _outer = threads
    try:
        yield
    finally:
        _outer = saved_outer
        torch.set_num_threads(threads)


@contextlib.contextmanager
def outer_threads() -> Iterator[None]:
    """Inside ``one_thread``: give the few big ops (matmuls) all threads back for a moment."""
    if _outer <= 1:
        yield
        return
    torch.set_num_threads(_outer)
    try:
        yield
    finally:
        torch.set_num_threads(1)
