"""Export the trained student as a plain HF folder (``from_pretrained`` after ``import cald_scale``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..engines.distributed import barrier

__all__ = ["export_student"]


def export_student(engine, tokenizer, target: Path, *, is_main: bool) -> Path:
    """Gather the ZeRO-3 partitions layer by layer onto rank 0 and save atomically."""
    target = Path(target)
    if engine.zero_optimization_partition_weights():
        # NOTE: must run on every rank; returns the full state dict on rank 0 only.
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            engine.module.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return target
