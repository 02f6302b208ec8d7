"""Host (CPU) memory allocator settings that keep resident memory at what the accounting predicts.

glibc's malloc serves allocations below an adaptive threshold (up to 32 MB) from its heap,
and a heap fragmented by activations of a few MB each keeps freed memory resident. On the
default job (SmolLM2-135M, 1 rank, fp32) that held about 2.3 GB above what is in use:
peak RSS 9.2 GB, against 6.9 GB with the threshold fixed at 1 MB or with jemalloc
(benchmarks/results/scale_memory*.json). jemalloc, preloaded with
``LD_PRELOAD=libjemalloc.so.2`` (the launch scripts do it when it is installed), gives the
low number at full speed; without it, fixing glibc's threshold gives the low number at
about 1.3x the step time on CPU. ``train.malloc_mmap_threshold=null`` keeps glibc's fast
default and only returns free heap pages after each step (``return_free_memory``): on the
default job 7.3 GB at 11.8 s/step, against 6.2 GB at 15.8 s/step with the threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path

__all__ = ["configure_host_allocator", "preloaded_allocator", "return_free_memory"]

logger = logging.getLogger("cald_scale.host_memory")

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def preloaded_allocator() -> str | None:
    """"jemalloc" or "tcmalloc" when one is loaded into this process, else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def configure_host_allocator(mmap_threshold: int | None) -> str:
    """Set glibc's mmap threshold (unless another allocator is preloaded); returns what is in use."""
    preloaded = preloaded_allocator()
    if preloaded:
        return preloaded
    if mmap_threshold is None:
        return "glibc (default thresholds)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        ok = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        logger.warning("could not set the malloc mmap threshold (not glibc?); host memory may exceed the accounting")
        return "unknown"
    return f"glibc (mmap threshold {mmap_threshold} bytes)"


def return_free_memory() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    if preloaded_allocator():
        return
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
