"""Host allocator settings: glibc's mmap threshold is set (or a preloaded allocator is named)."""

from __future__ import annotations

import subprocess
import sys


def test_configure_host_allocator_in_a_fresh_process():
    code = (
        "from cald_scale.engines.host_memory import configure_host_allocator as c;"
        "print(c(None)); print(c(1 << 20)); print(c(None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] in ("glibc (default thresholds)", "jemalloc", "tcmalloc")
    assert out[1] in ("glibc (mmap threshold 1048576 bytes)", "jemalloc", "tcmalloc")
    # glibc cannot go back to its adaptive threshold: a later run in the process says the fixed one stays.
    assert out[2] in ("glibc (mmap threshold 1048576 bytes, fixed earlier in this process)", "jemalloc", "tcmalloc")


def test_freed_activations_leave_the_process_with_the_threshold():
    """Allocate and free many 2 MB tensors amid small ones: with the threshold, resident memory returns."""
    code = """
import torch
from cald_scale.engines.host_memory import configure_host_allocator
import sys
if sys.argv[1] == "on":
    configure_host_allocator(1 << 20)
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
base = rss()
temp = torch.ones(512 * 1024); del temp  # glibc raises its adaptive threshold when a mapped block is freed
bigs, smalls = [], []
for i in range(300):
    bigs.append(torch.ones(512 * 1024))  # 2 MB: an activation
    smalls.append(torch.ones(1000))  # a small survivor after it pins the heap
del bigs
print(rss() - base)
"""
    held = {}
    for mode in ("off", "on"):
        held[mode] = int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert held["on"] < 100e6 and held["on"] < held["off"] / 2, held
