"""Preemption: a warning signal ends the run cleanly at a step boundary, with a checkpoint.

SLURM sends a warning signal (``--signal=USR1@120``) or SIGTERM before it stops a job.
The handler only records the signal; the training loop asks after every optimizer step
whether any rank got one (all ranks must agree: they all save, or none does), saves a
complete checkpoint, and exits with ``PREEMPTED_EXIT_CODE``. The batch script sees that
code and requeues the job; the requeued job resumes from the checkpoint.

While the run starts, the long waits outside any collective (rank 0 tokenising the corpus
part by part while the others poll for it, a universal checkpoint conversion) ask
``raise_if_preempted`` instead: each rank that got the signal stops at once, before the
time limit's SIGKILL, and the build resumes from its finished parts when the job is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Sequence

import torch

from .distributed import gather_objects

__all__ = ["PREEMPTED_EXIT_CODE", "PreemptionWatch", "Preempted", "PreemptedWhileStarting", "raise_if_preempted", "run_interruptible"]

logger = logging.getLogger("cald_scale.preemption")

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: "stopped on request, checkpoint saved, run me again"."""


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, after saving a complete checkpoint."""

    def __init__(self, step: int | None, signal_name: str, resumed_at: int | None = None):
        if step is None and resumed_at:  # a resumed session stopped before its first step: its checkpoint stands
            message = (
                f"stopped on {signal_name} before this session's first step: the checkpoint at step {resumed_at} stands, "
                "rerun the same command to resume"
            )
        elif step is None:  # before the run was built: nothing trained, nothing to save
            message = f"stopped on {signal_name} before training started: rerun the same command to resume"
        else:
            message = f"stopped at step {step} on {signal_name}: checkpoint saved, rerun the same command to resume"
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
        self.resumed_at = resumed_at

    def __reduce__(self):  # pickled whole (engines/distributed.on_main hands it to every rank)
        return type(self), (self.step, self.signal_name, self.resumed_at)


class PreemptedWhileStarting(Preempted):
    """Stopped on a signal inside one of the start's long waits: this rank alone decided (no
    collective is open there), so the ranks may stand at different points."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(None, signal_name)
        self.args = (f"stopped on {signal_name} while {where}, before training started: rerun the same command to resume",)
        self.where = where

    def __reduce__(self):
        return type(self), (self.signal_name, self.where)


_active: "PreemptionWatch | None" = None
"""The watch in force in this process (train() holds one for the whole run)."""


def raise_if_preempted(where: str, *, signalled: str | None = None) -> None:
    """Raise ``PreemptedWhileStarting`` if this rank got a preemption signal (a local check,
    for the start's long waits outside any collective; a no-op without a watch, as in
    ``cald-scale prepare-data``), or if ``signalled`` names the one another rank got (its
    failure note). ``where``: what the rank was doing, for the message."""
    received = _active.received if _active is not None else None
    if received or signalled:
        raise PreemptedWhileStarting(received or signalled, where)


def _killed_by_watched_signal(returncode: int) -> str | None:
    """The watched signal that ended a child (``returncode`` -N), if any."""
    if returncode >= 0 or _active is None:
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return None
    return name if name in _active.signals else None


def run_interruptible(cmd: list[str], what: str, poll_s: float = 1.0) -> tuple[int, str]:
    """Run ``cmd`` to its end: (exit code, stdout + stderr). A preemption signal to this rank
    (``raise_if_preempted``) kills it and raises: a conversion can outlast SLURM's warning."""
    # NOTE: a session of its own, so the kill reaches the child's own workers (DeepSpeed's
    # converter runs a process pool, whose workers would otherwise outlive it).
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:  # nothing is lost: communicate() goes on reading
                    raise_if_preempted(what)
        except BaseException:  # the signal, a Ctrl-C (which no longer reaches that session): no orphans
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if proc.returncode != 0:
        # The signal may have reached the child too (a job-wide SIGTERM): a preemption, not a failure.
        raise_if_preempted(what, signalled=_killed_by_watched_signal(proc.returncode))
    return proc.returncode, out + err


# What a preemption signal's notice says happens next, by the trainer's stage.
_WHEN = {
    "starting": "before the first step (the run is starting: at its next wait or check)",
    "training": "after this step, with a checkpoint",
    "finishing": "after the final evaluation, with the last step's checkpoint (the requeued job evaluates and exports); once the export has begun, the run finishes instead",
}


class PreemptionWatch:
    """Records the first of ``signals`` received; ``requested`` asks every rank collectively.

    ``received_before``: signal names the process got before the watch began (launch/train.py
    records them while it imports); read once the watch's handlers are in place, so no signal
    falls between the two."""

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), *, received_before: Sequence[str] = ()):
        self.signals = signals
        self.received: str | None = None
        self._before = received_before
        self._previous: dict[int, object] = {}
        self._outer: PreemptionWatch | None = None  # the watch in force before this one
        self.stage = "starting"  # then "training", then "finishing" (the trainer sets it): what a signal's notice says happens next

    def __enter__(self) -> "PreemptionWatch":
        global _active
        self._outer, _active = _active, self
        for name in self.signals:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._record)
        for name in self._before:
            if name in self.signals:
                self._record(getattr(signal, name), None)
                break
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        _active = self._outer

    def _record(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            # NOTE: logging from a handler is not reentrant-safe in general; one record, once, is fine.
            logger.warning("received %s: stopping %s", self.received, _WHEN.get(self.stage, _WHEN["starting"]))

    def requested(self, device: torch.device) -> str | None:
        """The signal some rank received (collective when distributed), else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor([0 if self.received is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        names = gather_objects(self.received)  # only once: which signal, for the record
        return next(name for name in names if name is not None)
