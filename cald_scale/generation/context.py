"""How long a context a model can take: a student of mixers alone has no positions and no
limit; anything with attention, or with its teacher's table of absolute positions (GPT-2),
is refused beyond the positions it was trained on."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["check_context", "max_context"]


def max_context(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """The longest context ``model`` (or its config) takes: None when no layer is attention
    (mixers only) and no position table is kept, else its ``max_position_embeddings``."""
    config = getattr(model, "config", model)
    layer_types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
    if layer_types is not None and all(kind == "linear_attention" for kind in layer_types) and not _position_table(config):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None and hasattr(config, "teacher_hf_config"):
        limit = config.teacher_hf_config().max_position_embeddings
    return limit


def _position_table(config: PretrainedConfig) -> bool:
    """A model that adds a fixed table of absolute positions to its embeddings: a teacher of
    such a family (GPT-2), or a converted student, which keeps its teacher's table."""
    from ..conversion.registry import get_adapter

    family = config.teacher_hf_config() if hasattr(config, "teacher_hf_config") else config
    try:
        return get_adapter(family).position_table_fixed
    except ValueError:  # a family that does not convert (a Bamba export): its attention limits it
        return False


def check_context(model: PreTrainedModel | PretrainedConfig, tokens: int, name: str = "the model", *, remedy: str = "") -> None:
    """Refuse (ValueError) a context of ``tokens`` positions that ``model`` was not trained for;
    ``remedy`` ends the message (what the caller's user can change)."""
    limit = max_context(model)
    if limit is not None and tokens > limit:
        config = getattr(model, "config", model)
        why = "its position table has that many rows" if _position_table(config) else "its attention was trained on at most that many positions"
        raise ValueError(
            f"a context of {tokens} tokens exceeds {name}'s max_position_embeddings ({limit}): {why}; a converted "
            "student with mixers only and rotary positions has no such limit" + (f"; {remedy}" if remedy else "")
        )
