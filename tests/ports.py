"""Ports for the servers a test starts (rendezvous stores, SLURM daemons): each pytest-xdist
worker draws from a range of its own, below the kernel's ephemeral ports.

NOTE: a port found by binding port 0 is only bound for real seconds later (a rank imports torch
first). In that window the other worker's gloo listeners, stores and probes all take ports from
the kernel's ephemeral range (32768-60999 on Linux), so they could take this one too. A port
below that range is never handed out by the kernel, and the workers' ranges do not overlap.
"""

from __future__ import annotations

import os
import random
import socket

_BASE, _SPAN, _RANGES = 20000, 4000, 3  # 20000-31999: below the ephemeral range
_draw = random.SystemRandom()  # not the random module's stream, which tests seed


def free_port() -> int:
    """A port nothing listens on now, from this xdist worker's range (gw0: 20000-23999, gw1: 24000-27999, ...)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = _BASE + (int(worker) % _RANGES if worker.isdigit() else 0) * _SPAN
    for _ in range(200):
        port = _draw.randrange(low, low + _SPAN)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT after an earlier test's run
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + _SPAN - 1}")
