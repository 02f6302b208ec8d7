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

from torch import nn

from ..config import RunConfig
from ..conversion.surgery import build_student
from ..conversion.teacher import TeacherSource, build_teacher
from ..distill.stages import LayerwiseModel
from .partitioned import frozen_row_pieces, full_shape, placement_for
from .zero3 import (
    build_student_engine,
    build_teacher_engine,
    param_groups,
    size_zero_buffers,
    teacher_ds_config,
)

__all__ = ["DistillationModels", "build_models", "block_numel"]

logger = logging.getLogger("cald_scale.engines")


@dataclasses.dataclass
class DistillationModels:
    teacher_engine: object
    student_engine: object
    teacher: LayerwiseModel
    student: LayerwiseModel
    shares_frozen_weights: bool
    """The student's frozen copied weights are the teacher's own tensors."""


def block_numel(model: nn.Module, blocks: nn.ModuleList) -> int:
    """Parameters in the largest decoder block (full count, also when partitioned)."""
    import math

    return max(sum(math.prod(full_shape(p)) for p in block.parameters()) for block in blocks)


def build_models(cfg: RunConfig, ds_config: dict, source: TeacherSource) -> DistillationModels:
    placement = placement_for(ds_config)
    teacher = build_teacher(source, placement)
    frozen_copies = cfg.student.trainable == "mixers"
    share = frozen_copies and cfg.student.share_frozen_weights
    student = build_student(
        source.config,
        source.weights(),
        cfg.student.conversion,
        seed=cfg.train.seed,
        placement=placement,
        teacher_name_or_path=source.name,
        share_with=teacher if share else None,
    )
    if frozen_copies:
        mixer_ids = {id(p) for p in student.mixer_parameters()}
        for p in student.parameters():
            p.requires_grad_(id(p) in mixer_ids)

    teacher_lw, student_lw = LayerwiseModel(teacher), LayerwiseModel(student)
    sized = size_zero_buffers(ds_config, max(block_numel(teacher, teacher_lw.blocks), block_numel(student, student_lw.blocks)), cfg.train.stage_size)
    teacher_engine = build_teacher_engine(teacher, teacher_ds_config(sized))
    groups = param_groups(student, cfg.train.lr, cfg.train.copied_lr_scale, cfg.train.weight_decay)
    student_engine = build_student_engine(student, sized, groups, shares_weights_with=teacher_engine if share else None)
    student_lw = LayerwiseModel(student_engine.module, activation_checkpointing=cfg.student.activation_checkpointing)
    head = student_lw.head_weight
    student_lw.head_pieces = frozen_row_pieces(head) if head is not None else None
    return DistillationModels(
        teacher_engine=teacher_engine,
        student_engine=student_engine,
        teacher=LayerwiseModel(teacher_engine.module),
        student=student_lw,
        shares_frozen_weights=share,
    )
