"""Export a ZeRO-3 engine's model as a plain HF folder: the trained student (``from_pretrained``
after ``import cald_scale``), or a trajectory teacher's checkpoint (a waypoint for later runs)."""

from __future__ import annotations

from pathlib import Path

from ..engines.distributed import barrier
from ..fileio import atomic_dir

__all__ = ["export_model"]


def export_model(engine, tokenizer, target: Path, *, is_main: bool) -> Path:
    """Gather the ZeRO-3 partitions layer by layer onto rank 0 and save atomically."""
    target = Path(target)
    if engine.zero_optimization_partition_weights():
        # NOTE: must run on every rank; returns the full state dict on rank 0 only.
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if is_main:
        with atomic_dir(target, replace=True) as tmp:
            engine.module.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    barrier()
    return target
