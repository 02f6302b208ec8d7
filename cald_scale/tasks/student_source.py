"""Where the student is converted from, when that is not the teacher (``student.init_from``)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..config_loader import ConfigError
from ..conversion.teacher import TeacherSource, open_teacher
from ..conversion.weights import WeightsMismatchError
from ..engines.teacher import geometry_mismatch

__all__ = ["student_init_source"]


def student_init_source(cfg, teacher: TeacherSource, adapt: Callable[[TeacherSource], TeacherSource] = lambda s: s) -> TeacherSource | None:
    """The source named by ``student.init_from`` (``adapt``ed as the task adapts its teacher), or
    None; checked against the teacher's geometry before any weight is read."""
    if not cfg.student.init_from:
        return None
    try:
        source, _ = open_teacher(dataclasses.replace(cfg.teacher, name_or_path=cfg.student.init_from, gguf_file=None))
        source = adapt(source)
    except (FileNotFoundError, OSError, ValueError) as err:
        # NOTE: the loaders speak of "the teacher"; here the model is the student's starting point.
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ConfigError
        raise kind(f"student.init_from {cfg.student.init_from!r}: {err}") from err
    differ = geometry_mismatch(source.config, teacher.config)
    if differ:
        raise WeightsMismatchError(f"student.init_from {cfg.student.init_from!r} does not match the teacher {teacher.name!r} ({'; '.join(differ)})")
    return source
