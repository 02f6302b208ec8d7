"""The names DeepSpeed gives a checkpoint tag's state files, read in one place.

DeepSpeed 0.19 writes, inside ``<save_dir>/<tag>/``:

- ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``: a ZeRO optimizer shard, one
  per data-parallel rank (``DeepSpeedEngine._get_zero_ckpt_name``);
- ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt``: ZeRO-3's model states, one per rank;
- ``mp_rank_{mp:02d}_model_states.pt``: the model states of ZeRO stages 0-2, written by
  data-parallel rank 0 (``_get_ckpt_name``);
- ``layer_{idx:02d}-model_states.pt``: a pipeline layer's weights (``PipelineModule.ckpt_layer_path``).

Readers here: how many ranks saved a tag (``reshard``), which rank wrote each file of a tag
(``checkpoint``'s manifest) and which pipeline stage did (``pipeline``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

__all__ = ["StateFile", "parse_state_file"]

_RANK_STATES = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_(?P<kind>model|optim)_states\.pt$")
_LAYER_STATES = re.compile(r"^layer_(?P<layer>\d+)-model_states\.pt$")


@dataclasses.dataclass(frozen=True)
class StateFile:
    """What a state file's name says about who wrote it."""

    kind: Literal["model", "optim", "layer"]
    data_rank: int | None
    """The ``zero_pp_rank`` in the name: the writer's data-parallel rank; None where the name has none."""
    model_rank: int
    """The model-parallel rank (``mp_rank``), or the layer index of a pipeline layer's file."""


def parse_state_file(name: str) -> StateFile | None:
    """The parts of a DeepSpeed state file's name (a bare file name), or None for any other file."""
    if match := _LAYER_STATES.match(name):
        return StateFile("layer", None, int(match["layer"]))
    if match := _RANK_STATES.match(name):
        return StateFile(match["kind"], int(match["dp"]) if match["dp"] is not None else None, int(match["mp"]))
    return None
