"""Gloo ranks in child processes, for tests of code that runs collectives outside DeepSpeed's launcher."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable


def run_on_ranks(
    fn: Callable, folder: Path, *args, world: int = 2, start: str = "spawn", timeout_s: float | None = None, wait_s: float = 120
) -> list:
    """``fn(rank, *args)`` on each of ``world`` ranks inside one gloo group; each rank's return
    value, in rank order, as JSON gives it back (a tuple comes back a list). ``fn`` must be a
    module-level function (it is pickled by name); ``timeout_s``: the group's collective timeout
    (torch's default when None); ``wait_s``: how long all the ranks may take."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context(start)
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, str(folder), timeout_s, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + wait_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    assert not hung, f"ranks {hung} still ran after {wait_s} s and were killed"
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * world, f"rank exit codes {codes} (the child tracebacks are in the captured stderr)"
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def _rank_main(fn: Callable, rank: int, world: int, folder: str, timeout_s: float | None, args: tuple) -> None:
    import torch.distributed as dist

    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{folder}/gloo_init", rank=rank, world_size=world, **kwargs)
    code = 1
    try:
        result = fn(rank, *args)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        code = 0
    except BaseException:  # noqa: BLE001 - printed for the test's report, then the exit code says it
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):  # fn may have closed it; os._exit must run whatever happens
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # NOTE: no interpreter finalization, as launch.leave: a gloo worker thread still releasing
        # a finished collective's tensors when it starts aborts the process (SIGABRT, "terminate
        # called without an active exception"; 7 of 134 two-rank resumes here, with the CPUs
        # busy). destroy_process_group does not stop those threads once DeepSpeed or torch._dynamo
        # was imported after the group was made: the group lives on.
        os._exit(code)
