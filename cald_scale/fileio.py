"""Crash-safe file writes: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write_text", "fsync_path", "atomic_dir", "file_lock", "wait_for_file", "cache_root"]


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted teachers and fetched corpora live: ``cache_dir``, else $CALD_SCALE_CACHE, else ~/.cache/cald_scale."""
    root = cache_dir or os.environ.get("CALD_SCALE_CACHE") or os.path.join(Path.home(), ".cache", "cald_scale")
    return Path(root).expanduser()


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``.

    ``durable``: also fsync the file before the rename and the folder after it, so the new
    content survives a node crash once this returns (not only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path


def fsync_path(path: str | Path) -> None:
    """fsync a file's content, or a folder's entries (new names and renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it becomes ``target`` by one rename.

    With ``replace`` an existing ``target`` is removed first (the old content stays
    readable until the new one is complete); on error the temp folder is deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock held for the duration of the block (across processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for_file(path: str | Path, *, failure: Callable[[], str | None], what: str, timeout_s: float, poll_s: float = 1.0, hint: str = "") -> None:
    """Wait for rank 0 to ``what`` (e.g. "build the data cache X"), until ``path`` exists: the
    file system is polled, outside any collective, so no NCCL/gloo timeout applies however
    long it takes. Raises RuntimeError as soon as ``failure()`` returns rank 0's error, and
    TimeoutError after ``timeout_s`` (its message ends with ``hint``)."""
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if (error := failure()) is not None:
            raise RuntimeError(f"rank 0 could not {what}: {error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to {what}{hint}")
        time.sleep(poll_s)
