"""The errors that mean "fix the input", not a bug: the entry points (launch/train.py, the
cald-scale command) report them in one line, without a traceback."""

from __future__ import annotations

__all__ = ["user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    # NOTE: imported here, not at module level: each lives beside the code that raises it.
    from .config_loader import ConfigError
    from .conversion.weights import WeightsMismatchError
    from .data.megatron import IndexedFileError
    from .distill.progress import NonFiniteLossError
    from .engines.checkpoint import CheckpointLoadError, CheckpointSaveError
    from .engines.deepspeed_version import UntestedDeepSpeedError
    from .export.bamba import BambaExportError

    return (ConfigError, FileNotFoundError, WeightsMismatchError, CheckpointLoadError, CheckpointSaveError, NonFiniteLossError, BambaExportError, IndexedFileError, UntestedDeepSpeedError)
