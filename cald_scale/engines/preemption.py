"""Preemption: a warning signal ends the run cleanly at a step boundary, with a checkpoint.

SLURM sends a warning signal (``--signal=USR1@120``) or SIGTERM before it stops a job.
The handler only records the signal; the training loop asks after every optimizer step
whether any rank got one (all ranks must agree: they all save, or none does), saves a
complete checkpoint, and exits with ``PREEMPTED_EXIT_CODE``. The batch script sees that
code and requeues the job; the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Sequence

import torch

from .distributed import gather_objects

__all__ = ["PREEMPTED_EXIT_CODE", "PreemptionWatch", "Preempted"]

logger = logging.getLogger("cald_scale.preemption")

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL: "stopped on request, checkpoint saved, run me again"."""


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, after saving a complete checkpoint."""

    def __init__(self, step: int | None, signal_name: str):
        if step is None:  # before the run was built: nothing trained, nothing to save
            message = f"stopped on {signal_name} before training started: rerun the same command to resume"
        else:
            message = f"stopped at step {step} on {signal_name}: checkpoint saved, rerun the same command to resume"
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name


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

    def __enter__(self) -> "PreemptionWatch":
        for name in self.signals:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._record)
        for name in self._before:
            if name in self.signals:
                self._record(getattr(signal, name), None)
                break
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            # NOTE: logging from a handler is not reentrant-safe in general; one record, once, is fine.
            logger.warning("received %s: stopping after this step with a checkpoint", self.received)

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
