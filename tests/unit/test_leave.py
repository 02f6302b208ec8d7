"""launch.leave: how a process that trained ends (the training command, its ranks, a user's script)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ports import free_port

_TRAINED = r"""
import atexit, os, sys, threading

import torch
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed  # noqa: F401  (after the group, as train() does: destroy_process_group then keeps gloo's threads)

dist.all_reduce(torch.ones(4))
atexit.register(lambda: print("exit handlers ran", flush=True))
print("not yet flushed", end="")
threading.Thread(target=threading.Event().wait).start()  # never ends: a finalizing exit would wait for it
from cald_scale.launch import leave

leave(eval(sys.argv[2]))
"""


@pytest.mark.parametrize(("code", "status", "said"), [("None", 0, None), ("0", 0, None), ("3", 3, None), ("'the run failed'", 1, "the run failed"), ("2.5", 1, "2.5")])
def test_leave_exits_with_the_status_after_the_exit_handlers_and_flushed_output(code, status, said):
    """As sys.exit would, but without the interpreter's finalization: it does not wait for a thread
    that never ends (nor would a gloo thread abort it)."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", _TRAINED, str(port), code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "not yet flushedexit handlers ran" in proc.stdout  # written before the exit handlers, then flushed
    if said:  # the message, last, as Python prints a non-int exit code
        assert proc.stderr.rstrip().endswith(said), proc.stderr[-2000:]
