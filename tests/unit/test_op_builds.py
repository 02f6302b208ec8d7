"""A build lock a killed job left in torch's extension folder does not hang the next job."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

from ports import free_port

from cald_scale.engines import op_builds
from cald_scale.engines.op_builds import build_folder, clear_stale_build_locks


def _lock(folder, op: str, age_s: float):
    lock = folder / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_an_old_lock_no_process_holds_is_removed_and_said(tmp_path, caplog):
    lock = _lock(tmp_path, "cpu_adam", age_s=3600)
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_locks(tmp_path) == [lock]
    assert not lock.exists()
    assert "cpu_adam that a killed job left unfinished" in caplog.text


def test_a_lock_a_build_holds_open_is_left_to_it_whatever_its_age(tmp_path, caplog):
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    # Opened through another path to the same file, as a holder in another mount namespace sees it.
    (tmp_path / "elsewhere").symlink_to(tmp_path / "deepspeed_shm_comm")
    code = "import sys, time; f = open(sys.argv[1]); print('open', flush=True); time.sleep(60)"
    builder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "elsewhere" / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "open"
        with caplog.at_level(logging.INFO):
            assert clear_stale_build_locks(tmp_path) == []
        assert lock.exists()
        assert f"being built by process {builder.pid}" in caplog.text
    finally:
        builder.kill()
        builder.wait()


def test_a_young_lock_without_a_holder_is_waited_for_then_removed_once_stale(tmp_path, caplog):
    """A build on another node sharing the folder (no holder here) may still finish: wait; one
    that never does was killed, and goes once it is older than a build takes."""
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_locks(tmp_path, stale_after_s=1.0, poll_s=0.05, warn_after_s=0.2) == [lock]
    assert time.monotonic() - started >= 0.9
    assert caplog.text.count("waiting for") == 1 and "removed" in caplog.text  # said once, not at every poll


def test_a_lock_released_while_it_is_checked_costs_no_warning(tmp_path, caplog):
    """Every rank takes the lock to load an op, even one already built: a lock seen for an
    instant is the usual case, and says nothing."""
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=0)
    threading.Timer(0.3, lock.unlink).start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_locks(tmp_path) == []
    assert time.monotonic() - started < 5 and caplog.text == ""


def test_a_lock_that_a_new_build_took_while_it_was_checked_is_never_removed(tmp_path, monkeypatch):
    """Another process removed the stale lock and its build created a new one during this
    process's scan for holders: the new one is not removed (it would break that build)."""
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    scans = []

    def scan(st):
        scans.append(st.st_mtime_ns)
        if len(scans) == 1:  # during the first scan: the stale file goes, a new build's lock comes
            lock.unlink()
            _lock(tmp_path, "deepspeed_shm_comm", age_s=3000)  # aged too (the file system may reuse the inode)
            return None
        return 1234  # the new build, holding its lock

    monkeypatch.setattr(op_builds, "_holder", scan)
    assert clear_stale_build_locks(tmp_path) == []
    assert lock.exists() and len(scans) == 2 and scans[0] != scans[1]  # looked again, at the new file


_INIT = r"""
import os, sys
os.environ["MASTER_PORT"] = sys.argv[1]
from cald_scale.engines.distributed import init_distributed
from cald_scale.launch import leave

print("WORLD", init_distributed().world_size, flush=True)
leave()
"""


def test_a_job_starts_over_a_build_lock_a_killed_job_left(tmp_path):
    """init_distributed builds DeepSpeed's CPU allreduce op: a lock left in its folder by a job
    killed mid-build made every later job wait there forever, with no message."""
    folder = tmp_path / "extensions"  # TORCH_EXTENSIONS_DIR holds the op folders themselves
    built = build_folder() / "deepspeed_shm_comm"
    if (built / "deepspeed_shm_comm.so").exists() and not (built / "lock").exists():  # reuse a finished build (else: ~20-35 s)
        shutil.copytree(built, folder / "deepspeed_shm_comm")
    lock = _lock(folder, "deepspeed_shm_comm", age_s=3600)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(folder)
    proc = subprocess.run([sys.executable, "-c", _INIT, str(free_port())], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "WORLD 1" in proc.stdout
    assert "deepspeed_shm_comm that a killed job left unfinished" in proc.stderr
    assert (folder / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists() and not lock.exists()
