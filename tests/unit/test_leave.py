"""launch.leave: how a process that trained ends (the training command, its ranks, a user's script)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ports import free_port

_TRAINED = r"""
import atexit, os, sys

import torch
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed  # noqa: F401  (after the group, as train() does: destroy_process_group then keeps gloo's threads)

dist.all_reduce(torch.ones(4))
atexit.register(lambda: print("exit handlers ran", flush=True))
print("not yet flushed", end="")
from cald_scale.launch import leave

leave(eval(sys.argv[2]))
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [("None", 0, ""), ("0", 0, ""), ("3", 3, ""), ("'the run failed'", 1, "the run failed")])
def test_leave_exits_with_the_status_after_the_exit_handlers_and_flushed_output(code, status, stderr):
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", _TRAINED, str(port), code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "not yet flushedexit handlers ran" in proc.stdout  # written before the exit handlers, then flushed
    assert stderr in proc.stderr
