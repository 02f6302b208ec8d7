"""Scoped intra-op thread counts for ops made of many small steps.

NOTE: torch's intra-op thread count is process-wide; these scopes assume the ops run from one
Python thread at a time (as in training and in the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["one_thread", "outer_threads", "scan_threads"]

# The thread count that the innermost active ``one_thread`` replaced (0: none active).
_outer = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed ops on one intra-op thread, then restore the previous count.

    NOTE: the CPU scans issue from ~100 (SSD) to ~1000 (selective scan) small ops per layer.
    With several threads each op ends in an OpenMP barrier, and on a CPU shared with other
    processes a descheduled thread stalls every barrier: measured on 2 shared cores, one
    layer's selective scan took 9.3 s with 2 threads and 0.10 s with 1. One thread costs
    little at training shapes and keeps these ops predictable on a busy machine.
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


def scan_threads(*tensors: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
    """The thread scope for a scan's forward over ``tensors``: ``one_thread`` while autograd
    records it or while several ranks share the machine; torch's own count otherwise.

    NOTE: inference in one process (a long prefill, an encoder forward) has large ops and no
    neighbour to stall it, so the other cores pay: BiMamba2's encoder forward at 4k tokens on
    2 cores took 1.84 s with its scans on one thread and 1.64 s on two. Training and multi-rank runs keep one
    thread (``one_thread``'s note); backward passes use ``one_thread`` themselves.
    """
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return one_thread() if recording or shared else contextlib.nullcontext()
