"""Teacher and student, built partitioned and wrapped in their ZeRO-3 engines.

The order matters for memory. Both models are constructed under ``deepspeed.zero.Init``
and filled tensor by tensor from the teacher's checkpoint, so no rank ever holds a whole
model (``conversion/``, ``engines/partitioned.py``); only then are the engines created
around the already-partitioned modules. With frozen copied weights the student uses the
teacher's own parameters, so they exist once.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

from torch import nn

from ..config import RunConfig
from ..conversion.surgery import build_student
from ..conversion.teacher import TeacherSource, build_teacher
from ..distill.phases import Phase, PhasePlan
from ..distill.stages import LayerwiseModel, layerwise
from ..eval.perplexity import perplexity
from ..export.hf import export_model
from .distributed import rank, world_size
from .host_memory import return_free_memory
from .partitioned import frozen_row_pieces, full_shape, placement_for
from .teacher import ManagedTeacher, check_waypoints
from .ds_config import size_zero_buffers, teacher_ds_config
from .zero3 import begin_step, build_teacher_engine, build_training_engine, param_groups, parameter_kinds

__all__ = [
    "DistillationModels", "build_models", "block_numel", "check_new_head_trains", "checkpoint_excludes_frozen", "set_trainable", "shares_teacher_weights",
]

logger = logging.getLogger("cald_scale.engines")


@dataclasses.dataclass
class DistillationModels:
    student_engine: object
    student: LayerwiseModel
    shares_frozen_weights: bool
    """The student's frozen copied weights are the teacher's own tensors."""
    managed_teacher: ManagedTeacher | None = None
    """The teacher engine as guidance drives it (swapped, trained, released); None for an
    unguided run, where no teacher is built."""

    @property
    def teacher_engine(self):
        return self.managed_teacher.engine if self.managed_teacher is not None else None

    @property
    def teacher(self) -> LayerwiseModel | None:
        """The teacher, block by block (None once released, or in an unguided run)."""
        return self.managed_teacher.layerwise if self.managed_teacher is not None else None

    @property
    def shared_param_ids(self) -> set[int]:
        """The tensors student and teacher both hold (the student's frozen copies, when shared)."""
        if not self.shares_frozen_weights or self.teacher_engine is None:
            return set()
        teacher = {id(p) for p in self.teacher_engine.module.parameters()}
        return {id(p) for p in self.student_engine.module.parameters() if id(p) in teacher}

    def refresh_head_pieces(self) -> None:
        """A frozen student head is read by pieces of rows; call after changing what trains."""
        head = self.student.head_weight
        self.student.head_pieces = frozen_row_pieces(head) if head is not None else None

    # -- what train() asks of either mode (engines/pipeline.py's PipelineModels answers the same) --
    @property
    def student_model(self) -> nn.Module:
        return self.student_engine.module

    @property
    def data_parallel_rank(self) -> int:
        """Every rank is a data-parallel replica under ZeRO-3."""
        return rank()

    @property
    def data_parallel_size(self) -> int:
        return world_size()

    checkpoint_owner = None
    """DeepSpeed's ZeRO-3 file names say which rank wrote them (engines/checkpoint.py)."""

    @property
    def checkpoint_excludes_frozen(self) -> bool:
        """The checkpoints leave the frozen copied weights out: here when they are the teacher's."""
        return self.shares_frozen_weights

    def apply_phase(self, phase: Phase, base_trainable: str) -> None:
        """Set what trains in ``phase``: the mixers always; the copied weights when the phase trains
        everything; in a teacher-forced phase only the blocks (embedding and head are unused)."""
        if base_trainable == "all":  # else the copied weights are frozen (or the teacher's own) for the whole run
            only_blocks = self.student.blocks if phase.mode == "teacher_forced" else None
            set_trainable(self.student_engine.module, copied=phase.trainable == "all", only_blocks=only_blocks)
        self.refresh_head_pieces()

    def perplexity(self, which: Literal["student", "teacher"], datasets: dict, indices: dict, micro_batch_size: int) -> dict:
        """Held-out perplexity of the student or the teacher on each dataset (this rank's ``indices``)."""
        model = self.teacher if which == "teacher" else self.student
        engines = (self.teacher_engine, self.student_engine)
        return {
            name: perplexity(model, ds, indices[name], micro_batch_size, self.student_engine.device, before_batch=lambda: begin_step(*engines))
            for name, ds in datasets.items()
        }

    def export(self, tokenizer, target: Path, *, is_main: bool) -> Path:
        """The student as a HF folder (gathered from its partitions)."""
        return export_model(self.student_engine, tokenizer, target, is_main=is_main)


def set_trainable(student: nn.Module, *, copied: bool, only_blocks: nn.ModuleList | None = None) -> None:
    """The new mixers always train; the weights copied from the teacher only when ``copied``.
    ``only_blocks``: nothing outside these blocks trains (a teacher-forced phase never uses
    the student's embedding or head)."""
    kind = parameter_kinds(student, only_blocks)
    for p in student.parameters():
        p.requires_grad_(kind(p) == "mixers" or (copied and kind(p) == "copied"))


def block_numel(model: nn.Module, blocks: nn.ModuleList) -> int:
    """Parameters in the largest decoder block (full count, also when partitioned)."""
    import math

    return max(sum(math.prod(full_shape(p)) for p in block.parameters()) for block in blocks)


def check_new_head_trains(trainable: str, origin: TeacherSource) -> None:
    """A classifier student converted from an encoder without a head for the task
    (``origin.head_seed``: a head drawn new) must train that head: under
    ``student.trainable=mixers`` only the mixers train, and the head would stay random."""
    if trainable == "mixers" and getattr(origin, "head_seed", None) is not None:
        raise ValueError(
            f"the student starts from {origin.name!r}, an encoder without a head for this task, so its classification head is "
            "new; with student.trainable=mixers only the mixers train and that head would stay random: set student.trainable=all "
            "(the encoder recipes do), or start from a classifier fine-tuned for the task (student.init_from)"
        )


def checkpoint_excludes_frozen(cfg: RunConfig, plan: PhasePlan) -> bool:
    """Whether a run's checkpoints leave the student's frozen copied weights out (a resume rebuilds
    them from the teacher's files), in either mode: under ZeRO-3 when they are the teacher's own
    tensors (``shares_teacher_weights``); in pipeline mode whenever only the mixers train (a stage
    rebuilds them whether or not it shares them). A resume may not change it."""
    if cfg.train.pipeline_stages > 0:
        return cfg.student.trainable == "mixers"
    return shares_teacher_weights(cfg, plan)


def shares_teacher_weights(cfg: RunConfig, plan: PhasePlan) -> bool:
    """Whether the student's frozen copied weights are the teacher's own tensors (its checkpoints
    then leave them out): only the mixers train, ``student.share_frozen_weights``, a teacher
    that never changes (no trajectory, no waypoints), and a student converted from that
    teacher (no ``student.init_from``)."""
    return cfg.student.trainable == "mixers" and cfg.student.share_frozen_weights and plan.fixed_teacher and not cfg.student.init_from


def build_models(
    cfg: RunConfig, ds_config: dict, source: TeacherSource, plan: PhasePlan | None = None, *, student_source: TeacherSource | None = None,
    outside_groups: bool = True, first_step: int = 0,
) -> DistillationModels:
    """Teacher (when a step from ``first_step`` on needs one) and student, partitioned, in their
    ZeRO-3 engines. A run resumed past its last guided step (a hybrid after its switch) builds
    no teacher: it would be released before the first step.

    The student is converted from ``student_source`` (``student.init_from``) when given, else
    from the teacher's ``source``.

    The teacher gets a training engine when a phase fine-tunes it (trajectory guidance).
    The student shares the teacher's tensors for its frozen weights only when the teacher
    never changes (no trajectory, no waypoints). Every waypoint is checked against the
    teacher before anything trains.
    """
    plan = plan or cfg.plan(world_size=1)
    origin = student_source or source  # student_source: what student.init_from names
    check_new_head_trains(cfg.student.trainable, origin)
    placement = placement_for(ds_config)
    teacher = build_teacher(source, placement) if plan.teacher_needed_from(first_step) else None
    check_waypoints(plan.waypoints, source.config, teacher, placement)
    frozen_copies = cfg.student.trainable == "mixers"
    # What the checkpoints hold (the frozen weights left out) follows the plan; without a teacher
    # built, the student holds its own copies of them, converted from the same weights.
    share = shares_teacher_weights(cfg, plan)
    share_with = teacher if share else None
    if frozen_copies and (plan.trains_teacher or plan.swaps_teacher):
        # One message: the frozen copies are also why the student cannot share the teacher's tensors.
        logger.warning(
            "the teacher changes during the run (trajectory or waypoints) while the student's copied weights stay frozen "
            "at their conversion values (student.trainable=mixers; the student keeps its own copies): only the mixers "
            "can follow it; student.trainable=all lets every weight"
        )
    if origin is not source:
        copies = "; the student keeps its own frozen copies" if frozen_copies and teacher is not None else ""
        logger.info("student converted from %s (student.init_from); teacher: %s%s", origin.name, source.name, copies)
    student = build_student(
        origin.config,
        origin.weights(),
        cfg.student.conversion,
        seed=cfg.train.seed,
        placement=placement,
        teacher_name_or_path=source.name,  # the teacher that guided it (init_from is in the run config)
        share_with=share_with,
    )
    source.carry_generation_config(student)  # the teacher's end-of-turn tokens, exported with the student
    if frozen_copies:
        set_trainable(student, copied=False)

    # NOTE: the builds' freed buffers (each tensor's staging, its checkpoint range in another
    # dtype) lie between partitions on the heap and stay resident: 0.47 GB above the 1.98 GB of
    # Qwen2.5-0.5B's partitions on one rank, 11 MB after a trim.
    return_free_memory()
    student_lw = layerwise(student)
    numel = block_numel(student, student_lw.blocks)
    teacher_blocks = layerwise(teacher).blocks if teacher is not None else None
    if teacher is not None:
        numel = max(numel, block_numel(teacher, teacher_blocks))
    sized = size_zero_buffers(ds_config, numel, cfg.train.stage_size)
    leaves = cfg.train.zero3_leaves
    teacher_engine = managed = None
    if teacher is not None:
        if plan.trains_teacher:
            teacher.requires_grad_(True)
            trajectory = next(p.trajectory for p in plan.phases if p.guidance == "trajectory")
            groups = [{"params": list(teacher.parameters()), "lr": trajectory.lr, "weight_decay": trajectory.weight_decay, "name": "teacher"}]
            teacher_engine = build_training_engine(teacher, sized, groups, leaf_blocks=teacher_blocks, leaves=leaves)
        else:
            teacher_engine = build_teacher_engine(teacher, teacher_ds_config(sized), leaf_blocks=teacher_blocks, leaves=leaves)
        managed = ManagedTeacher(teacher_engine, layerwise(teacher_engine.module, head_chunk_tokens=cfg.loss.head_chunk_tokens), placement, str(source.folder))
    groups = param_groups(student, cfg.train.lr, cfg.train.copied_lr_scale, cfg.train.weight_decay, blocks=student_lw.blocks if outside_groups else None)
    student_engine = build_training_engine(
        student, sized, groups, shares_weights_with=teacher_engine if share_with is not None else None, leaf_blocks=student_lw.blocks, leaves=leaves
    )
    models = DistillationModels(
        student_engine=student_engine,
        student=layerwise(student_engine.module, activation_checkpointing=cfg.student.activation_checkpointing, head_chunk_tokens=cfg.loss.head_chunk_tokens),
        shares_frozen_weights=share,
        managed_teacher=managed,
    )
    models.refresh_head_pieces()
    return models
