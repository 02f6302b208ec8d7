"""Crash-safe file writes: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Container, Iterator

__all__ = ["absolute_if_local", "sha256_of", "tag_cache_dir", "CACHE_TAG", "atomic_write_text", "fsync_path", "atomic_dir", "check_replaceable", "is_model_folder", "model_type_of", "file_lock", "NO_LOCKS", "update_json", "hold_lock", "wait_for_file", "read_json", "write_failure_note", "read_failure_note", "cache_root", "env_flag", "process_identity", "process_gone"]


def absolute_if_local(value: str, *, names: Container[str] = ()) -> str:
    """``value`` made absolute when it names a local file or folder (or a megatron prefix,
    PREFIX.bin), else as it is: a built-in name in ``names`` (which wins over a same-named path),
    a hub id, a path on another machine. A run records where its inputs are, so a later command
    started in another folder (``cald-scale generate``/``evaluate``, a resume) finds them."""
    if value in names or value.startswith("hf:"):
        return value
    path = os.path.expanduser(value)
    if os.path.exists(path) or os.path.exists(path + ".bin"):
        return os.path.abspath(path)
    return value


def sha256_of(*paths: str | Path) -> str:
    """The sha256 of the files' bytes, one after the other (read 8 MiB at a time)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is switched on (1, true, yes or on, any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted teachers and fetched corpora live: ``cache_dir``, else $CALD_SCALE_CACHE, else ~/.cache/cald_scale."""
    root = cache_dir or os.environ.get("CALD_SCALE_CACHE") or os.path.join(Path.home(), ".cache", "cald_scale")
    return Path(root).expanduser()


def work_cache_dir(cache_dir: str | None, kind: str) -> str:
    """A run's data cache folder (tokenised corpora, classification splits), absolute, as the run
    records it: ``cache_dir``; else ``$CALD_SCALE_CACHE/<kind>`` when that is set (one cache for
    every project, e.g. on a cluster's shared disk); else ``.cache/cald_scale/<kind>`` under the
    working folder. Absolute, so `cald-scale evaluate RUN` started elsewhere reads the same cache
    instead of tokenising again there ("~" is the home folder)."""
    if cache_dir is None:
        env = os.environ.get("CALD_SCALE_CACHE")
        cache_dir = os.path.join(env, kind) if env else os.path.join(".cache", "cald_scale", kind)
    return os.path.abspath(os.path.expanduser(cache_dir))


CACHE_TAG = "CACHEDIR.TAG"
_CACHE_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by cald_scale (https://bford.info/cachedir/).\n"
)

logger = logging.getLogger("cald_scale.fileio")


def tag_cache_dir(cache_dir: str | Path) -> None:
    """Mark ``cache_dir`` as a cache (the Cache Directory Tagging convention): backup tools skip
    it, and a corpus folder that holds it leaves it out (data/corpora.py)."""
    tag = Path(cache_dir) / CACHE_TAG
    if not tag.is_file():
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write_text(tag, _CACHE_TAG_TEXT)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``.

    ``durable``: also fsync the file before the rename and the folder after it, so the new
    content survives a node crash once this returns (not only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: unique across hosts too (two nodes may run the same pid on a shared file system), and
    # created exclusively ("x"), with the umask's permissions (mkstemp's are owner-only).
    tmp = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "x") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # a full disk or a folder in the way: no stray temp file left
        if isinstance(err, OSError) and err.filename is None:  # a write's error ("No space left on device") names no file: say which
            raise type(err)(err.errno, f"{err.strerror or err}: writing {path}") from err
        raise
    if durable:
        fsync_path(path.parent)
    return path


def _read_proc(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:  # no /proc (not Linux), or no such process
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot): with the pid, it names one process."""
    stat = _read_proc(f"/proc/{pid}/stat")
    return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None  # field 22; the name may hold spaces


def _boot_id() -> str | None:
    boot = _read_proc("/proc/sys/kernel/random/boot_id")
    return boot.strip() if boot else None


def process_identity() -> dict:
    """This process, as another process can tell later whether it still runs: the machine's
    boot, the pid namespace, the pid and the pid's start time (a pid alone is reused, and in
    another container names another process)."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "pid": os.getpid(), "start": _start_ticks(os.getpid())}


def process_gone(identity: dict | None) -> bool:
    """Whether the process ``identity`` (``process_identity``'s) has ended, as far as this one
    can tell: only on the same boot of the same machine, in the same pid namespace. Anywhere
    else (another node or container, no /proc) it is not known to be gone: False."""
    here = (_boot_id(), _pid_namespace())
    if not identity or None in here or (identity.get("boot_id"), identity.get("pid_namespace")) != here:
        return False
    return _start_ticks(int(identity["pid"])) != identity.get("start")


def fsync_path(path: str | Path) -> None:
    """fsync a file's content, or a folder's entries (new names and renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_type_of(folder: Path) -> str | None:
    """The ``model_type`` a saved HF model's config.json names (None: no such config; a run
    folder's config.json names none)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_model_folder(folder: Path, model_type: str | None = None) -> bool:
    """A saved HF model (of ``model_type`` if given): what an export may replace."""
    found = model_type_of(folder)
    return found is not None and model_type in (None, found)


def check_replaceable(target: Path, replaceable: Callable[[Path], bool] = is_model_folder) -> None:
    """Raise FileExistsError unless ``target`` is absent, an empty folder, or a folder that
    ``replaceable`` recognises (never the working directory or a folder above it)."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if target.exists() and (cwd == target or target in cwd.parents):
        # NOTE: also an empty one: the export would take its place by a rename, and this process
        # (and its shell) would be left in a deleted folder that lists as empty.
        raise FileExistsError(f"will not replace {target}: it holds the working directory")
    if not target.exists() or not any(target.iterdir()):
        return
    if not replaceable(target):
        raise FileExistsError(f"will not replace {target}: it is not empty and not an earlier export; choose a new or empty folder")


@contextlib.contextmanager
def atomic_dir(
    target: str | Path, *, replace: bool = False, replaceable: Callable[[Path], bool] = is_model_folder, clear_stale: bool = False,
) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it becomes ``target`` by one rename.

    With ``replace`` an existing ``target`` is replaced (the old content stays readable
    until the new one is complete, and is moved aside, not deleted, until the new one is
    in its place: a failed rename puts it back), but only an empty folder or one that
    ``replaceable`` recognises as an earlier output of the same kind: anything else (a
    user's folder, a run folder, the working directory) raises FileExistsError before any
    work. On error the temp folder is deleted. The folder gets the umask's permissions (not
    mkdtemp's owner-only 0700), so others on a shared cluster can read an export.
    ``clear_stale``: the caller holds a lock that excludes every other writer of ``target``, so
    temp folders beside it are a killed writer's (a SIGKILL skips the cleanup here: a 7B
    teacher's conversion left 28 GB) and are removed first.
    """
    target = Path(target).expanduser().absolute()
    if replace:
        check_replaceable(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    if clear_stale:
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        aside = None
        if replace and target.exists():
            aside = tmp.with_name(tmp.name + ".old")
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None:
                os.replace(aside, target)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
"""What flock raises on a file system that takes no locks (NFS without lockd, Lustre without -o flock)."""


@contextlib.contextmanager
def file_lock(path: str | Path, *, interrupt: Callable[[], None] | None = None, poll_s: float = 1.0) -> Iterator[bool]:
    """An exclusive advisory lock held for the duration of the block (across processes).
    With ``interrupt`` (which may raise: ``raise_if_preempted``), the wait for another holder
    polls (``hold_lock``) and asks it every ``poll_s``: a blocking flock waits through a signal.

    Yields True; False on a file system that takes no locks: the block then runs unlocked,
    with a warning naming the lock file (one job alone needs no lock; the caller keeps
    concurrent ones apart as it can)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = None
    try:
        if interrupt is None:
            handle = open(path, "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                handle.close()
                handle = None
                raise
        else:  # hold_lock's polling wait, with no deadline
            handle = hold_lock(path, f"pid {os.getpid()}", wait_s=math.inf, poll_s=poll_s, interrupt=interrupt)
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise
        logger.warning("cannot lock %s: its file system takes no locks (%s); going on unlocked (jobs started together each do this work)", path, err.strerror)
    if handle is None:  # NOTE: outside the except: the block's own errors do not chain onto the lock's
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def update_json(path: str | Path, update: Callable[[Any], Any], *, sort_keys: bool = False) -> None:
    """A read-merge-write of a JSON file that several processes update at once (an index, a
    file of choices), under ``file_lock(<path>.lock)``: ``update(current)`` (None where the file
    is absent or does not parse) returns the new content, which replaces the file atomically."""
    path = Path(path)
    with file_lock(path.with_name(path.name + ".lock")):  # unlocked (warned) where locks are not taken
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        atomic_write_text(path, json.dumps(update(current), indent=1, sort_keys=sort_keys))


def hold_lock(
    path: str | Path, owner: str, *, wait_s: float, poll_s: float = 1.0, on_wait: Callable[[str], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> IO[str]:
    """Take an exclusive advisory lock on ``path`` for as long as the returned handle stays
    open: the process's end releases it, a SIGKILL too. The file then says ``owner``. While
    another process holds it, wait up to ``wait_s`` (``on_wait(holder)`` is called once, and
    ``interrupt()``, which may raise, at every poll), then raise BlockingIOError naming the holder."""
    path = Path(path)
    handle = open(path, "a+")  # NOTE: not "w": that would erase the holder's line before the lock is ours
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            if time.monotonic() >= deadline:
                handle.close()
                raise BlockingIOError(f"{holder} still holds {path} after {wait_s:.0f} s") from None
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            if interrupt is not None:
                try:
                    interrupt()
                except BaseException:
                    handle.close()
                    raise
            time.sleep(poll_s)
        except OSError:  # e.g. a file system without flock (ENOLCK, EOPNOTSUPP): the caller decides
            handle.close()
            raise
    handle.seek(0)
    handle.truncate()
    handle.write(owner + "\n")
    handle.flush()
    return handle


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that does not parse is named in the error."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def write_failure_note(path: str | Path, err: BaseException, *, job: str = "") -> None:
    """Tell the ranks waiting on rank 0 (``wait_for_file``) that it gave up: its error, and
    the signal when a preemption stopped it (``err.signal_name``). ``job``: the launch the note
    is about (a later launch ignores it)."""
    note = {"job": job, "error": f"{type(err).__name__}: {err}"}
    if signal_name := getattr(err, "signal_name", None):
        note["preempted"] = signal_name
    try:
        atomic_write_text(path, json.dumps(note))
    except OSError:
        pass  # the waiting ranks time out instead


def read_failure_note(path: str | Path, *, job: str = "") -> dict | None:
    """``write_failure_note``'s note at ``path`` if it is about launch ``job``, else None."""
    try:
        note = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and note.get("job") == job else None


def wait_for_file(
    path: str | Path, *, failure_note: str | Path, what: str, timeout_s: float, poll_s: float = 1.0, hint: str = "", job: str = "",
    interrupt: Callable[..., None] | None = None,
) -> None:
    """Wait for rank 0 to ``what`` (e.g. "build the data cache X"), until ``path`` exists: the
    file system is polled, outside any collective, so no NCCL/gloo timeout applies however
    long it takes. Raises RuntimeError as soon as rank 0's ``failure_note`` about launch ``job``
    appears, and TimeoutError after ``timeout_s`` (its message ends with ``hint``).

    ``interrupt(where, signalled=None)`` is called at every poll (``raise_if_preempted``): it
    raises when this rank got a preemption signal, or with ``signalled`` when rank 0's note
    says a signal stopped it (a rank on another node may never get the signal itself)."""
    deadline = time.monotonic() + timeout_s
    where = f"waiting for rank 0 to {what}"
    while not Path(path).exists():
        if interrupt is not None:
            interrupt(where)
        if (note := read_failure_note(failure_note, job=job)) is not None:
            if interrupt is not None and note.get("preempted"):
                interrupt(f"{where} (rank 0 stopped on it)", signalled=note["preempted"])
            raise RuntimeError(f"rank 0 could not {what}: {note.get('error')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to {what}{hint}")
        time.sleep(poll_s)
