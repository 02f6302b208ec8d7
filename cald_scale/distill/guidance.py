"""Guidance: which teacher guides each step of a run (the paper's guidance modes).

The phase plan says, for every step, whether a teacher guides it and which one (the
frozen target, a trajectory teacher that fine-tunes alongside, or the current waypoint).
``Guide`` turns that into actions on the one teacher engine of the run:

- before a step (``enter``): swap in the waypoint the step needs; after the last step that
  needs a teacher (the hybrid switch), destroy the engine and return its memory;
- after a micro-batch (``after_micro_batch``): a trajectory teacher learns on the same batch
  every ``update_every`` student steps;
- at a checkpoint: a trajectory teacher's weights and optimizer go into the same tag.

Everything but the trajectory teacher's own state follows from the step number, so a run
resumed at any step (mid-phase, at a switch, between waypoints) guides as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .phases import Phase, PhasePlan
from .stages import LayerwiseModel

__all__ = ["Guide"]

logger = logging.getLogger("cald_scale.guidance")


class Guide:
    def __init__(self, plan: PhasePlan, teacher, *, base_weights: str, shared_param_ids: set[int] = frozenset(), first_step: int = 0):
        """``teacher``: a ``engines.teacher.ManagedTeacher``, or None when no step from
        ``first_step`` on needs one (an unguided run; a hybrid resumed after its switch).
        ``shared_param_ids``: the student's frozen weights that are the teacher's own tensors
        (they outlive the teacher's release)."""
        if plan.teacher_needed_from(first_step) and teacher is None:
            raise ValueError("the phases need a teacher but none was built")
        self.plan = plan
        self.teacher = teacher
        self.base_weights = base_weights
        self._shared = set(shared_param_ids)
        self.release_stats: dict | None = None

    # -- per step ------------------------------------------------------------------------
    def enter(self, step: int) -> LayerwiseModel | None:
        """Make the teacher right for optimizer step ``step + 1``; returns it (None: unguided step)."""
        phase = self.plan.at(step)
        if self.teacher is not None and not self.plan.teacher_needed_from(step):
            self.release(step)
        if not phase.uses_teacher:
            return None
        if phase.guidance == "trajectory":
            # It fine-tunes from the pretrained teacher, then goes on from its own training so far.
            if self.teacher.loaded is not None:
                self.teacher.load(self.base_weights)  # a no-op unless a waypoint is in
            self.teacher.set_lr(phase.trajectory.lr, phase.trajectory.weight_decay)
        else:  # the pretrained teacher again after a trajectory phase, or a waypoint
            self.teacher.load(self.plan.teacher_weights_at(step, self.base_weights))  # a no-op unless it changes
        return self.teacher.layerwise

    def updates_teacher(self, phase: Phase, step: int) -> bool:
        """Whether the trajectory teacher learns during optimizer step ``step + 1``."""
        return phase.guidance == "trajectory" and (step - phase.start) % phase.trajectory.update_every == phase.trajectory.update_every - 1

    def after_micro_batch(self, phase: Phase, step: int, batch: dict) -> float | None:
        """Trajectory guidance: the teacher's own task-loss step on the batch the student just used."""
        if not self.updates_teacher(phase, step):
            return None
        return self.teacher.train_step(batch)

    def release(self, step: int) -> dict:
        """Destroy the teacher engine (the hybrid switch); its memory goes back to the OS."""
        self.release_stats = {"step": step, **self.teacher.release(keep=self._shared)}
        self.teacher = None
        s = self.release_stats
        logger.info(
            "teacher released before step %d: %.1f MB of partitions freed, %d teacher parameters still alive; RSS %.2f -> %.2f GB",
            step + 1, s["freed_partition_bytes"] / 1e6, s["teacher_params_alive"], s["rss_before"] / 1e9, s["rss_after"] / 1e9,
        )
        return self.release_stats

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def _saves_teacher(self) -> bool:
        return self.teacher is not None and self.plan.trains_teacher

    def state(self) -> dict:
        return {"teacher_saved": self._saves_teacher}

    def save(self, tag_dir: Path) -> None:
        if self._saves_teacher:
            self.teacher.save(tag_dir)

    def restore(self, tag_dir: Path, client_state: dict) -> None:
        if client_state.get("guide", {}).get("teacher_saved") and self.teacher is not None:
            self.teacher.resume(tag_dir)
