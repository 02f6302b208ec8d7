"""DeepSpeed's just-in-time built ops (the CPU shared-memory allreduce, CPU Adam, ...): build
locks a killed job left behind.

torch builds an op under a ``lock`` file in its build folder (``torch.utils.cpp_extension``,
``FileBaton``) and every other process waits for that file to go, polling, with no time limit
and no message. A job killed during a build (a preemption or scancel while the ranks start, a
time limit) leaves the file, and every later job on the machine, or on every node sharing the
home folder, then hangs at start-up, silently, forever. Seen here: a test run killed while it
built ``deepspeed_shm_comm`` stopped the next training job inside ``init_distributed``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

__all__ = ["STALE_AFTER_S", "build_root", "clear_stale_build_locks"]

logger = logging.getLogger(__name__)

STALE_AFTER_S = 600.0
"""A lock no process here holds open and older than this is an interrupted build's. A build
holds its lock open from start to end (torch keeps the file's descriptor), so one held open on
this machine is alive whatever its age; one without a holder here may still be a build on
another node sharing the folder, which these ops finish in a minute or two."""


def build_root() -> Path:
    """Where torch builds extensions (``TORCH_EXTENSIONS_DIR``, else its default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, *, stale_after_s: float = STALE_AFTER_S, poll_s: float = 5.0) -> list[Path]:
    """Remove the build locks under ``root`` (default: ``build_root()``) that no build holds;
    wait for one without a holder here until it goes or turns stale. Returns those removed.

    Every rank calls this before DeepSpeed builds or loads an op; ranks that race to remove
    the same lock are harmless (the file goes once)."""
    root = build_root() if root is None else root
    removed = []
    # <root>/<op>/lock under TORCH_EXTENSIONS_DIR; <root>/py311_cpu/<op>/lock under torch's default root
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        said = False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # released (or removed by another rank)
            if _held_open(lock):
                break  # a build in progress on this machine: torch waits for it
            if age > stale_after_s:
                try:
                    lock.unlink()
                    removed.append(lock)
                    logger.warning("removed %s: a build of %s that a killed job left unfinished (%.0f min old, no process holds it)", lock, lock.parent.name, age / 60)
                except FileNotFoundError:
                    pass
                break
            if not said:
                logger.warning(
                    "waiting for %s: %s is being built on another node, or a build killed %.0f s ago left it (removed once %.0f min old)",
                    lock, lock.parent.name, age, stale_after_s / 60,
                )
                said = True
            time.sleep(poll_s)
    return removed


def _held_open(path: Path) -> bool:
    """Whether a process of this machine that we may inspect has ``path`` open."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:  # gone, or another user's
            continue
    return False
