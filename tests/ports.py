"""Ports for the servers a test starts (rendezvous stores, SLURM daemons): each pytest-xdist
worker draws from a range of its own, below the kernel's ephemeral ports.

NOTE: a port found by binding port 0 is only bound for real seconds later (a rank imports torch
first). In that window the other worker's gloo listeners, stores and probes all take ports from
the kernel's ephemeral range, so they could take this one too. A port below that range is never
handed out by the kernel, and the workers' ranges do not overlap.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket

_LOW = 20000
_HIGH = 29500  # DeepSpeed's default rendezvous port, and launch/slurm's 29500-30499 above it
_draw = random.SystemRandom()  # not the random module's stream, which tests seed


def _worker_range() -> tuple[int, int]:
    """This worker's share of [_LOW, min(_HIGH, the first ephemeral port))."""
    high = _HIGH
    with contextlib.suppress(OSError, ValueError):
        high = min(high, int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0]))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) % workers if worker.isdigit() else 0
    span = (high - _LOW) // workers
    return _LOW + index * span, _LOW + (index + 1) * span


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on now (each probe stays bound until all are drawn)."""
    low, high = _worker_range()
    draws = 50 * count if high - low >= 8 * count else 0  # none: a host that gives out every port
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            port, draws = (_draw.randrange(low, high) if draws > 0 else 0), draws - 1  # 0: the kernel's choice
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT after an earlier test's run
                continue
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    """A port nothing listens on now, from this xdist worker's range."""
    return free_ports(1)[0]
