"""A run as an ordered list of phases: how long each lasts, which teacher guides it, what trains.

The paper's guidance modes are recipes of phases (recipes/guidance/):

- unguided:   one phase, ``guidance: none`` (no teacher engine is built at all);
- target:     one phase, ``guidance: target`` (the frozen pretrained teacher);
- trajectory: ``guidance: trajectory``: the teacher is fine-tuned alongside (its own
  optimizer and LR, updated every ``trajectory.update_every`` student steps);
- waypoint:   ``guidance: waypoint`` with an ordered list of teacher checkpoints, switched
  at equal intervals of the phase;
- hybrid:     a target phase, then a ``guidance: none`` phase (the teacher engine is
  destroyed at the switch and its memory returned).

Each phase also says whether student blocks take the teacher's hidden states as input
(``mode: teacher_forced``: every block learns alone on the layer loss) or their own
(``end_to_end``), which weights train, its LR schedule and its loss weights. Everything a
phase leaves unset comes from the run's ``train`` and ``loss`` sections, so the one-phase
run is today's job. Phase boundaries are pure functions of the step, which is what makes
resume exact anywhere: mid-phase, at a switch, between waypoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal, Sequence

from .losses import LossConfig

__all__ = ["PhaseConfig", "TrajectoryConfig", "Phase", "PhasePlan", "plan_phases", "set_decay_and_betas", "set_phase_lr", "Guidance", "Mode"]

Guidance = Literal["none", "target", "trajectory", "waypoint"]
Mode = Literal["end_to_end", "teacher_forced"]


@dataclasses.dataclass(kw_only=True)
class TrajectoryConfig:
    """The teacher's own fine-tuning in a trajectory-guided phase."""

    lr: float = 1e-4
    """The teacher's learning rate (constant; its AdamW is separate from the student's)."""
    update_every: int = 1
    """T_u: the teacher takes one optimizer step (on the same batch, next-token CE) every this many student steps."""
    weight_decay: float = 0.0
    """The teacher's AdamW weight decay (its betas, eps and gradient clip are the student's)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"trajectory.lr must be > 0, got {self.lr}")
        if self.update_every < 1:
            raise ValueError(f"trajectory.update_every must be >= 1, got {self.update_every}")
        if self.weight_decay < 0:
            raise ValueError(f"trajectory.weight_decay must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(kw_only=True)
class PhaseConfig:
    """One phase of a run. Its length is ``steps``, ``tokens`` or ``fraction`` of
    ``train.max_steps``; at most one phase leaves all three unset and takes the rest."""

    name: str = "distill"
    """Shown in logs and metrics."""
    steps: int | None = None
    """Optimizer steps of this phase."""
    tokens: int | None = None
    """Training tokens of this phase (rounded up to whole steps of train.global_batch_size x data.seq_len)."""
    fraction: float | None = None
    """Share of train.max_steps (rounded to whole steps)."""
    guidance: Guidance = "target"
    """none: no teacher (CE only); target: the frozen pretrained teacher; trajectory: the
    teacher fine-tunes alongside; waypoint: the teacher checkpoints in ``waypoints``, in order."""
    waypoints: list[str] = dataclasses.field(default_factory=list)
    """Teacher checkpoints (HF folders of the teacher's architecture), switched at equal intervals of the phase."""
    trajectory: TrajectoryConfig = dataclasses.field(default_factory=TrajectoryConfig)
    """The teacher's optimizer (guidance: trajectory only)."""
    mode: Mode = "end_to_end"
    """end_to_end: student blocks take the student's own hidden states (CE, layer loss and KL
    apply); teacher_forced: each student block takes the teacher's input to it and learns
    alone on the layer loss, back-propagated stage by stage (no CE or KL)."""
    trainable: Literal["all", "mixers"] | None = None
    """What learns in this phase: every student weight, or only the new mixers (the copied
    weights are frozen for the phase); null: what student.trainable says. "all" needs
    student.trainable=all."""
    lr: float | None = None
    """Peak LR of the mixers in this phase (default: train.lr; with lr_schedule continue, the
    peak of the schedule it goes on with)."""
    copied_lr_scale: float | None = None
    """LR multiplier of the copied weights (default: train.copied_lr_scale)."""
    warmup_steps: int | None = None
    """Linear warmup at the start of the phase (default: train.warmup_steps, clamped to half the phase)."""
    lr_schedule: Literal["own", "continue"] = "own"
    """own: this phase warms up and decays on its own; continue: the previous phase's schedule
    goes on through this one (one warmup and one cosine over both, e.g. a hybrid that drops
    the teacher's losses mid-run without re-warming the LR)."""
    a_ce: float | None = None
    """Weight of the next-token CE in this phase (default: loss.a_ce)."""
    a_layer: float | None = None
    """Weight of the layerwise hidden-state MSE in this phase (default: loss.a_layer)."""
    a_kl: float | None = None
    """Weight of the logit KL to the teacher in this phase (default: loss.a_kl)."""

    def __post_init__(self):
        given = [k for k in ("steps", "tokens", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"phase {self.name!r}: give one of steps, tokens or fraction, not {given}")
        for key in ("steps", "tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"phase {self.name!r}: {key} must be >= 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"phase {self.name!r}: fraction must be in (0, 1], got {self.fraction}")
        if self.guidance == "waypoint" and not self.waypoints:
            raise ValueError(f"phase {self.name!r}: guidance waypoint needs a non-empty waypoints list")
        if self.waypoints and self.guidance != "waypoint":
            raise ValueError(f"phase {self.name!r}: waypoints are only read with guidance: waypoint (got {self.guidance})")
        self.waypoints = [os.path.expanduser(str(w)) for w in self.waypoints]  # as every other path setting
        if self.mode == "teacher_forced" and self.guidance == "none":
            raise ValueError(f"phase {self.name!r}: mode teacher_forced needs a teacher (guidance is none)")
        if self.trajectory != TrajectoryConfig() and self.guidance != "trajectory":
            raise ValueError(f"phase {self.name!r}: trajectory settings are only read with guidance: trajectory (got {self.guidance})")
        # A weight the phase would zero is refused, not silently dropped.
        if self.guidance == "none" and any((getattr(self, k) or 0) > 0 for k in ("a_layer", "a_kl")):
            raise ValueError(f"phase {self.name!r}: a_layer and a_kl need a teacher, and guidance is none (the task loss alone trains)")
        if self.mode == "teacher_forced" and any((getattr(self, k) or 0) > 0 for k in ("a_ce", "a_kl")):
            raise ValueError(f"phase {self.name!r}: mode teacher_forced trains on the layer loss alone; a_ce and a_kl have no end-to-end output to act on")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"phase {self.name!r}: lr must be > 0")
        if self.copied_lr_scale is not None and self.copied_lr_scale < 0:
            raise ValueError(f"phase {self.name!r}: copied_lr_scale must be >= 0 (0 freezes the copied weights), got {self.copied_lr_scale}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"phase {self.name!r}: warmup_steps must be >= 0")
        if self.lr_schedule == "continue" and self.warmup_steps is not None:
            raise ValueError(f"phase {self.name!r}: lr_schedule continue goes on with the previous phase's schedule, which did the warmup; drop warmup_steps")

    @property
    def fixed_length(self) -> bool:
        return self.steps is not None or self.tokens is not None or self.fraction is not None


@dataclasses.dataclass(frozen=True)
class Phase:
    """A phase resolved to concrete steps [start, end) and concrete settings."""

    index: int
    name: str
    start: int
    end: int
    guidance: Guidance
    waypoints: tuple[str, ...]
    trajectory: TrajectoryConfig
    mode: Mode
    trainable: Literal["all", "mixers"]
    lr: float
    copied_lr_scale: float
    warmup_steps: int
    min_lr_ratio: float
    loss: LossConfig
    schedule_start: int
    schedule_end: int
    """The steps [schedule_start, schedule_end) its LR schedule spans: the phase's own, or with
    ``lr_schedule: continue`` those of the phases it shares one schedule with."""

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def uses_teacher(self) -> bool:
        return self.guidance != "none"

    def lr_factor(self, step: int) -> float:
        """LR multiplier at global ``step`` (0-based, inside the phase): linear warmup, then cosine
        to min_lr_ratio, over the steps its schedule spans."""
        local = step - self.schedule_start
        if local < self.warmup_steps:
            return (local + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.schedule_end - self.schedule_start - self.warmup_steps)
        progress = min(1.0, (local - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def waypoint_at(self, step: int) -> str | None:
        """The waypoint guiding global ``step``: waypoint j covers the j-th equal share of the phase."""
        if not self.waypoints:
            return None
        local = step - self.start
        return self.waypoints[min(len(self.waypoints) - 1, local * len(self.waypoints) // self.steps)]

    def describe(self) -> str:
        extra = f", {len(self.waypoints)} waypoints" if self.waypoints else ""
        if self.schedule_start < self.start:
            extra += f", LR schedule continued from step {self.schedule_start + 1}"
        return (
            f"phase {self.index} {self.name!r}: steps {self.start + 1}-{self.end}, guidance {self.guidance}{extra}, "
            f"{self.mode}, trains {self.trainable}, lr {self.lr:g}"
        )


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    phases: tuple[Phase, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    def at(self, step: int) -> Phase:
        """The phase that runs optimizer step ``step + 1`` (``step`` steps are done)."""
        for phase in self.phases:
            if step < phase.end:
                return phase
        return self.phases[-1]

    def teacher_weights_at(self, step: int, base: str) -> str:
        """The checkpoint the teacher holds during optimizer step ``step + 1`` of a target or
        waypoint phase: the waypoint of a waypoint phase, else ``base`` (the pretrained teacher;
        a trajectory phase trains it in place from there)."""
        phase = self.at(step)
        return str(phase.waypoint_at(step)) if phase.guidance == "waypoint" else base

    def teacher_needed_from(self, step: int) -> bool:
        """Whether any step from ``step`` on (0-based) still needs a teacher."""
        return any(p.uses_teacher and p.end > step for p in self.phases)

    @property
    def uses_teacher(self) -> bool:
        return any(p.uses_teacher for p in self.phases)

    @property
    def trains_teacher(self) -> bool:
        return any(p.guidance == "trajectory" for p in self.phases)

    @property
    def fixed_teacher(self) -> bool:
        """A teacher that never changes (no trajectory, no waypoints): the student may share its
        frozen weights, which its checkpoints then leave out."""
        return self.uses_teacher and not (self.trains_teacher or self.swaps_teacher)

    @property
    def swaps_teacher(self) -> bool:
        return any(p.guidance == "waypoint" for p in self.phases)

    @property
    def waypoints(self) -> list[str]:
        return [w for p in self.phases for w in p.waypoints]


def plan_phases(phases: list[PhaseConfig], train, loss: LossConfig, *, tokens_per_step: int, student_trainable: str) -> PhasePlan:
    """Resolve phase configs into concrete step ranges and settings (``train`` is a TrainConfig)."""
    if not phases:
        raise ValueError("the run has no phase: give at least one entry in phases")
    rest = [p.name for p in phases if not p.fixed_length]
    if len(rest) > 1:
        raise ValueError(f"phases {rest} all leave their length unset; only one phase may take the rest of train.max_steps")

    def length(p: PhaseConfig) -> int:
        if p.steps is not None:
            return p.steps
        if p.tokens is not None:
            return max(1, math.ceil(p.tokens / tokens_per_step))
        if train.max_steps is None:
            raise ValueError(f"phase {p.name!r} is a fraction of (or the rest of) train.max_steps, which is null")
        return max(1, round(p.fraction * train.max_steps))

    fixed = {i: length(p) for i, p in enumerate(phases) if p.fixed_length}
    total = train.max_steps if train.max_steps is not None else sum(fixed.values())
    remainder = total - sum(fixed.values())
    shares = [i for i, p in enumerate(phases) if p.fraction is not None]
    if not rest and remainder and shares and math.isclose(sum(phases[i].fraction for i in shares) + sum(fixed[i] for i in fixed if i not in shares) / total, 1.0):
        # Fractions that add up to the whole: each phase ends where its share of the run ends,
        # rounded, so no boundary is off by more than half a step (rounded one by one, their
        # errors added up and all landed on the last of them).
        exact_end, end = 0.0, 0
        for i, p in enumerate(phases[: shares[-1]]):  # every phase has a length here (no rest phase)
            exact_end += p.fraction * total if p.fraction is not None else fixed[i]
            if p.fraction is not None:
                fixed[i] = max(1, round(exact_end) - end)
            end += fixed[i]
        fixed[shares[-1]] = total - sum(length for i, length in fixed.items() if i != shares[-1])
        remainder = 0
        if fixed[shares[-1]] < 1:
            raise ValueError(f"phase {phases[shares[-1]].name!r} rounds to no step of train.max_steps={total}")
    if rest and remainder < 1:
        raise ValueError(f"phases take {sum(fixed.values())} of train.max_steps={total} steps, nothing is left for phase {rest[0]!r}")
    if not rest and remainder != 0:
        raise ValueError(
            f"phases add up to {sum(fixed.values())} steps but train.max_steps={total}; "
            "leave one phase's length unset to take the rest, or set train.max_steps=null"
        )

    resolved, warmups, start = [], [], 0
    for i, p in enumerate(phases):
        steps = fixed.get(i, remainder)
        if p.waypoints and steps < len(p.waypoints):
            raise ValueError(f"phase {p.name!r} has {len(p.waypoints)} waypoints but {steps} step(s): some would guide no step")
        trainable = p.trainable or student_trainable
        if trainable == "all" and student_trainable != "all":
            raise ValueError(f"phase {p.name!r} trains all weights but student.trainable={student_trainable}")
        if p.copied_lr_scale is not None and trainable != "all":
            raise ValueError(
                f"phase {p.name!r} sets copied_lr_scale, but it trains the mixers alone (trainable {trainable}): the copied "
                "weights do not train in it; leave the setting out, or train them (trainable: all, with student.trainable=all)"
            )
        warmup = train.warmup_steps if p.warmup_steps is None else p.warmup_steps
        warmups.append(warmup)
        weights: dict = {k: getattr(p, k) for k in ("a_ce", "a_layer", "a_kl") if getattr(p, k) is not None}
        if p.guidance == "none":
            weights.update(a_layer=0.0, a_kl=0.0)  # no teacher: the task loss alone
        if p.mode == "teacher_forced":
            # No student path end to end: the layer loss alone, over every block (the CE that
            # trains the last block end to end, where skip_last leaves it out, is not there).
            weights.update(a_ce=0.0, a_kl=0.0, skip_last=False)
        elif weights.get("a_ce", loss.a_ce) <= 0 and weights.get("a_kl", loss.a_kl) <= 0:
            weights.update(skip_last=False)  # end to end with the layer loss alone: the same (nothing else reaches the last block)
        if p.mode == "teacher_forced" and weights.get("a_layer", loss.a_layer) <= 0:
            raise ValueError(f"phase {p.name!r}: mode teacher_forced trains on the layer loss alone, so a_layer must be > 0")
        try:
            phase_loss = dataclasses.replace(loss, **weights)
        except ValueError as err:
            raise ValueError(f"phase {p.name!r}: {err}") from err
        resolved.append(
            Phase(
                index=i,
                name=p.name,
                start=start,
                end=start + steps,
                guidance=p.guidance,
                waypoints=tuple(p.waypoints),
                trajectory=p.trajectory,
                mode=p.mode,
                trainable=trainable,
                # A phase that goes on with the schedule before it goes on at its peak LR unless it says otherwise.
                lr=p.lr if p.lr is not None else resolved[-1].lr if p.lr_schedule == "continue" and resolved else train.lr,
                copied_lr_scale=p.copied_lr_scale if p.copied_lr_scale is not None else train.copied_lr_scale,
                # NOTE: clamped, not refused: a short phase (or a quick test) keeps a sensible schedule.
                warmup_steps=min(warmup, steps // 2),
                min_lr_ratio=train.min_lr_ratio,
                loss=phase_loss,
                schedule_start=start,
                schedule_end=start + steps,
            )
        )
        start += steps
    return PhasePlan(tuple(_shared_schedules(resolved, phases, warmups)))


def _shared_schedules(resolved: list[Phase], specs: Sequence[PhaseConfig], warmups: list[int]) -> list[Phase]:
    """Phases with ``lr_schedule: continue`` share the schedule of the phase before them: one
    span, one warmup (the first phase's as asked, ``warmups``, clamped to half the span) and one peak LR."""
    if specs and specs[0].lr_schedule == "continue":
        raise ValueError(f"phase {specs[0].name!r}: lr_schedule continue needs a phase before it")
    out, group, warmup = [], [], 0
    for phase, spec, asked in zip(resolved, specs, warmups):
        if spec.lr_schedule == "continue":
            if phase.lr != group[0].lr:
                raise ValueError(
                    f"phase {spec.name!r}: lr_schedule continue goes on with phase {group[0].name!r}'s schedule, peak LR "
                    f"{group[0].lr:g}, and this phase sets {phase.lr:g}; drop its lr, or give it its own schedule"
                )
        else:
            out += _one_schedule(group, warmup)
            group, warmup = [], asked
        group.append(phase)
    return out + _one_schedule(group, warmup)


def _one_schedule(group: list[Phase], warmup: int) -> list[Phase]:
    if len(group) < 2:
        return group
    first, last = group[0], group[-1]
    shared = dict(schedule_start=first.start, schedule_end=last.end, warmup_steps=min(warmup, (last.end - first.start) // 2))
    return [dataclasses.replace(p, **shared) for p in group]


def set_phase_lr(engine, phase: Phase, step: int) -> None:
    """LR of every parameter group of ``engine``'s optimizer at optimizer step ``step + 1``: the
    phases own the schedule. The copied weights (``engines.zero3.param_groups``) train at
    copied_lr_scale only when the phase trains everything; those outside the blocks not in a
    teacher-forced phase, which never uses them."""
    factor = phase.lr_factor(step)
    for group in engine.optimizer.param_groups:
        group["lr"] = phase.lr * group_lr_scale(group.get("name", ""), phase) * factor


def set_decay_and_betas(engine, weight_decay: float, betas) -> None:
    """train.weight_decay and train.betas on every parameter group of ``engine``'s optimizer
    (those of the ``_no_decay`` groups stay at 0: ``engines.zero3.param_groups``)."""
    for group in engine.optimizer.param_groups:
        group["weight_decay"] = 0.0 if group.get("name", "").endswith("_no_decay") else weight_decay
        group["betas"] = tuple(betas)


def group_lr_scale(name: str, phase: Phase) -> float:
    """The LR multiplier of the optimizer group ``name`` in ``phase``."""
    if name.startswith("outside") and phase.mode == "teacher_forced":
        return 0.0
    if name.startswith(("copied", "outside")):
        return phase.copied_lr_scale if phase.trainable == "all" else 0.0
    return 1.0
