"""A build lock a killed job left in torch's extension folder does not hang the next job."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

from ports import free_port

from cald_scale.engines.op_builds import build_root, clear_stale_build_locks


def _lock(root, op: str, age_s: float):
    lock = root / "py311_cpu" / op / "lock"
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


def test_a_lock_a_build_holds_open_is_left_to_it_whatever_its_age(tmp_path):
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    builder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print('open', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "open"
        assert clear_stale_build_locks(tmp_path) == []
        assert lock.exists()
    finally:
        builder.kill()
        builder.wait()


def test_a_young_lock_without_a_holder_is_waited_for_then_removed_once_stale(tmp_path, caplog):
    """A build on another node sharing the folder (no holder here) may still finish: wait; one
    that never does was killed, and goes once it is older than a build takes."""
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_locks(tmp_path, stale_after_s=1.0, poll_s=0.1) == [lock]
    assert time.monotonic() - started >= 0.9
    assert "waiting for" in caplog.text and "removed" in caplog.text
    assert caplog.text.count("waiting for") == 1  # said once, not at every poll


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
    root = tmp_path / "extensions"
    built = next(iter(build_root().glob("*/deepspeed_shm_comm")), None)
    if built is not None and (built / "deepspeed_shm_comm.so").exists():  # reuse the build (else it is built here: ~20 s)
        shutil.copytree(built, root / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    lock = root / "deepspeed_shm_comm" / "lock"  # TORCH_EXTENSIONS_DIR holds the op folders themselves
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(root)
    proc = subprocess.run([sys.executable, "-c", _INIT, str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "WORLD 1" in proc.stdout
    assert "deepspeed_shm_comm that a killed job left unfinished" in proc.stderr
    assert (root / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists() and not lock.exists()
