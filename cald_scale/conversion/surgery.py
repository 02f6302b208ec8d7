"""Teacher -> student surgery: one generic mechanism for every registered family.

The student is built from the teacher's own config with attention replaced by mixers;
every other tensor (embeddings, MLPs, norms, head) is copied exactly, and the copy is
checked: the only keys allowed to differ are the attention's (gone) and the mixers' (new).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from ..configuration import to_dict
from .init import init_mixers_from_attention
from .modeling import CaldStudentConfig, CaldStudentForCausalLM, ConversionConfig
from .registry import get_adapter

__all__ = ["convert_teacher"]

logger = logging.getLogger("cald_scale.conversion")


def convert_teacher(
    teacher: PreTrainedModel,
    conversion: ConversionConfig,
    teacher_name_or_path: str | None = None,
) -> CaldStudentForCausalLM:
    """Build the linear-time student of ``teacher`` (which is left untouched)."""
    adapter = get_adapter(teacher.config.model_type)
    teacher_config = teacher.config.to_dict()
    teacher_config.pop("quantization_config", None)
    resolved = conversion.resolved(teacher.config)
    config = CaldStudentConfig(
        teacher_config=teacher_config,
        conversion=to_dict(resolved),
        teacher_name_or_path=teacher_name_or_path,
    )
    dtype = next(teacher.parameters()).dtype
    student = CaldStudentForCausalLM(config).to(dtype)

    # Copy every non-attention tensor; the backbone has the teacher's exact key layout.
    teacher_state = teacher.state_dict()
    result = student.backbone.load_state_dict(teacher_state, strict=False)
    attention_names = _attention_prefixes(teacher, adapter)
    mixer_names = _attention_prefixes(student.backbone, adapter)
    bad_unexpected = [k for k in result.unexpected_keys if not k.startswith(attention_names)]
    bad_missing = [k for k in result.missing_keys if not k.startswith(mixer_names)]
    if bad_unexpected or bad_missing:
        raise RuntimeError(
            f"teacher/student mismatch while copying weights: teacher tensors with no student slot "
            f"{bad_unexpected[:8]}, student tensors with no teacher source {bad_missing[:8]}"
        )
    if resolved.attention_init:
        init_mixers_from_attention(student, teacher, adapter)
    logger.info(
        "converted %s (%d layers) -> %s student; %d teacher tensors copied, attention_init=%s",
        teacher.config.model_type,
        len(adapter.layers(teacher)),
        resolved.mixer,
        len(teacher_state) - len(result.unexpected_keys),
        resolved.attention_init,
    )
    return student


def _attention_prefixes(model, adapter) -> tuple[str, ...]:
    """State-dict key prefixes of the attention slots (``model.layers.3.self_attn.``)."""
    slots = {id(adapter.attention(layer)) for layer in adapter.layers(model)}
    return tuple(f"{name}." for name, module in model.named_modules() if id(module) in slots)


@torch.no_grad()
def copied_tensors_match(teacher: PreTrainedModel, student: CaldStudentForCausalLM) -> bool:
    """True when every tensor the student shares with the teacher is bitwise equal."""
    student_state = student.backbone.state_dict()
    shared = [k for k in teacher.state_dict() if k in student_state]
    return bool(shared) and all(torch.equal(teacher.state_dict()[k], student_state[k]) for k in shared)
