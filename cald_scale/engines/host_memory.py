"""Host (CPU) memory allocator settings that keep resident memory at what the accounting predicts.

glibc's malloc serves allocations below an adaptive threshold (up to 32 MB) from its heap,
and a heap fragmented by activations of a few MB each keeps freed memory resident. On the
default job (SmolLM2-135M, 1 rank, fp32) that held about 2.3 GB above what is in use.
Fixing the threshold (``train.malloc_mmap_threshold``, 16 MB by default; 1 MB returns the
most) returns it, at some speed on CPU; jemalloc, preloaded by the user with ``LD_PRELOAD=libjemalloc.so.2``,
is detected and left alone. ``train.malloc_mmap_threshold=null`` keeps glibc's fast
default; free heap pages go back when a teacher is released (``return_free_memory``) and,
with ``train.trim_heap_every``, every N steps. On the
default job, 7-step runs back to back: 6.2 GB at 15.9 s/step with the threshold, 7.5 GB
at 14.1 s/step without (docs/benchmarks.md, "Latest numbers").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

__all__ = ["configure_host_allocator", "preloaded_allocator", "return_free_memory"]

logger = logging.getLogger("cald_scale.host_memory")

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_fixed_threshold: int | None = None  # set in this process: glibc cannot go back to its adaptive one


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def preloaded_allocator() -> str | None:
    """"jemalloc" or "tcmalloc" when one is loaded into this process, else None (fixed at start-up)."""
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
    global _fixed_threshold
    if mmap_threshold is None:
        if _fixed_threshold is not None:  # a second run in one process (train() is re-entrant)
            logger.warning(
                "train.malloc_mmap_threshold=null, but this process fixed it at %d bytes before: glibc cannot return "
                "to its adaptive threshold, so that one stays", _fixed_threshold,
            )
            return f"glibc (mmap threshold {_fixed_threshold} bytes, fixed earlier in this process)"
        return "glibc (default thresholds)"
    libc = _libc()
    try:
        ok = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    except AttributeError:
        ok = False
    if not ok:
        logger.warning("could not set the malloc mmap threshold (not glibc?); host memory may exceed the accounting")
        return "unknown"
    _fixed_threshold = int(mmap_threshold)
    return f"glibc (mmap threshold {mmap_threshold} bytes)"


def return_free_memory() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if preloaded_allocator() or libc is None:
        return
    try:
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass
