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

import contextlib
import fcntl
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

__all__ = ["STALE_ENV", "build_folder", "clear_stale_build_locks"]

logger = logging.getLogger(__name__)

STALE_ENV = "CALD_BUILD_LOCK_STALE_S"
_STALE_AFTER_S = 600.0
"""A lock no process here holds open and older than this is an interrupted build's. A build
holds its lock open from start to end (torch keeps the file's descriptor), so one held open on
this machine is alive whatever its age. One without a holder that can be seen (a build on
another node sharing the folder, in another container, by another user) is taken for dead at
this age: DeepSpeed's CPU ops build in under a minute; a CUDA op's longer build needs a larger
``$CALD_BUILD_LOCK_STALE_S``."""


def build_folder() -> Path:
    """The folder torch builds this interpreter's extensions in, one sub-folder per op, named as
    ``torch.utils.cpp_extension._get_build_directory`` names it."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:  # torch's test: an empty value is the current folder
        return Path(root)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def clear_stale_build_locks(
    folder: Path | None = None, *, stale_after_s: float | None = None, poll_s: float = 0.5, warn_after_s: float = 10.0
) -> list[Path]:
    """Remove the build locks in ``folder`` (default: ``build_folder()``) that an interrupted
    build left; wait for one without a holder here until it goes or turns stale. Returns those
    removed. Every rank calls this before DeepSpeed builds or loads an op."""
    folder = build_folder() if folder is None else folder
    limit = float(os.environ.get(STALE_ENV, _STALE_AFTER_S)) if stale_after_s is None else stale_after_s
    return [lock for lock in sorted(folder.glob("*/lock")) if _settle(lock, limit, poll_s, warn_after_s)]


def _settle(lock: Path, limit: float, poll_s: float, warn_after_s: float) -> bool:
    """Return once ``lock`` is gone (False), held by a build here (False), or stale: then it is
    removed (True)."""
    started, said = time.monotonic(), False
    while True:
        # NOTE: the ranks of a node check one at a time, or one could remove the lock of the
        # build another started right after removing the stale one.
        with _one_at_a_time(lock.parent):
            try:
                seen = lock.stat()
                holder = _holder(seen)
                if _identity(lock.stat()) != _identity(seen):
                    continue  # replaced during the scan: look again
            except FileNotFoundError:
                return False
            if holder is not None:
                logger.info("%s is being built by process %d; torch waits for it", lock.parent.name, holder)
                return False
            age = time.time() - seen.st_mtime
            if age > limit:
                with contextlib.suppress(FileNotFoundError):
                    if _identity(lock.stat()) == _identity(seen):  # still the file judged stale
                        lock.unlink()
                        logger.warning(
                            "removed %s: a build of %s that a killed job left unfinished (%.0f min old, no process here holds it)",
                            lock, lock.parent.name, age / 60,
                        )
                        return True
                return False
        if not said and time.monotonic() - started >= warn_after_s:
            logger.warning(
                "waiting for %s: no process here holds it (a build on another node or in another container, or one killed "
                "%.0f s ago); it is removed once %.0f min old ($%s)", lock, age, limit / 60, STALE_ENV,
            )
            said = True
        time.sleep(poll_s)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def _one_at_a_time(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` for the processes of this machine (none where the folder
    cannot be opened or locked: the checks then run unserialized)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(st: os.stat_result) -> int | None:
    """The pid of a process of this machine, that we may inspect, with the file ``st`` open;
    matched by inode, not path (a holder in another mount namespace sees another path)."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if not os.readlink(fd).endswith("/lock"):
                        continue  # no stat of every descriptor (one on a hung network mount would block)
                    opened = os.stat(fd)
                    if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino):
                        return int(fd_dir.parent.name)
                except OSError:
                    continue
        except OSError:  # gone, or another user's
            continue
    return None
