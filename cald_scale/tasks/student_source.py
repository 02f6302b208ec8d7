"""Where the student is converted from, when that is not the teacher (``student.init_from``)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..config_loader import ConfigError
from ..conversion.modeling import CaldStudentConfig
from ..conversion.teacher import TeacherSource, open_teacher
from ..conversion.weights import WeightsMismatchError
from ..engines.teacher import geometry_mismatch

__all__ = ["student_init_source"]


def student_init_source(
    cfg, teacher: TeacherSource, teacher_tokenizer=None, adapt: Callable[[TeacherSource], TeacherSource] = lambda s: s,
) -> TeacherSource | None:
    """The source named by ``student.init_from`` (``adapt``ed as the task adapts its teacher), or
    None; checked against the teacher's geometry and tokenizer before any weight is read."""
    if not cfg.student.init_from:
        return None
    try:
        source, tokenizer = open_teacher(dataclasses.replace(cfg.teacher, name_or_path=cfg.student.init_from, gguf_file=None))
        source = adapt(source)
    except (FileNotFoundError, OSError, ValueError) as err:
        # NOTE: the loaders speak of "the teacher"; here the model is the student's starting point.
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ConfigError
        raise kind(f"student.init_from {cfg.student.init_from!r}: {err}") from err
    if source.config.model_type == CaldStudentConfig.model_type:
        raise ConfigError(
            f"student.init_from {cfg.student.init_from!r} is a converted cald_scale student: init_from takes a model of the "
            f"teacher's family, to be converted; a trained student trains on by resuming its run (the same output.run_dir)"
        )
    differ = geometry_mismatch(source.config, teacher.config)
    if differ:
        raise WeightsMismatchError(f"student.init_from {cfg.student.init_from!r} does not match the teacher {teacher.name!r} ({'; '.join(differ)})")
    if teacher_tokenizer is not None:
        # The student reads the teacher's token ids through init_from's embedding rows: another
        # vocabulary of the same size passes the geometry check and scrambles them. (Tokens one of
        # them lacks, an instruct model's added chat tokens, are no conflict.)
        ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        moved = sum(1 for token, i in theirs.items() if token in ours and ours[token] != i)
        if moved:
            raise ConfigError(
                f"student.init_from {cfg.student.init_from!r} has another tokenizer than the teacher {teacher.name!r}: {moved} of "
                f"the tokens both have carry other ids, so its embedding rows would be read with the teacher's ids"
            )
    return source
