"""Checkpoint files load as data, never as code.

``torch.load`` unpickles, and a pickle can run any code: resuming a run folder that someone
else could write (a colleague's run, a copied project, shared storage) would run whatever
they put in it. DeepSpeed loads its checkpoint files with ``weights_only=False``, so a
resume runs inside ``weights_only_loads()``: torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes
every load there (DeepSpeed's included) take tensors, containers and numbers only, plus the
few records of ours and DeepSpeed's named in ``_records`` (its ZeRO stage, loss-scaler and
fragment-address objects; numpy's RNG state in files saved before the RNG file held tensors).

``CALD_TRUST_CHECKPOINTS=1`` (or true/yes/on) loads with pickle, for a folder you trust that
holds records the list lacks (say, saved by another DeepSpeed release).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Iterator

__all__ = ["TRUST_ENV", "weights_only_loads", "load_data", "trusted", "refusal", "allow_records"]

TRUST_ENV = "CALD_TRUST_CHECKPOINTS"
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_UNFORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses every load with both set


def trusted() -> bool:
    """Whether checkpoint files may be unpickled (``CALD_TRUST_CHECKPOINTS``)."""
    from ..fileio import env_flag  # NOTE: here, not above: the converter's child loads this file alone, by path

    return env_flag(TRUST_ENV)


def _records() -> list:
    """The non-tensor objects our and DeepSpeed's checkpoint files hold (classes that only carry data)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # RNG files saved before they held tensors: numpy's MT19937 key, a uint32 array, under the name
    # numpy 1 (numpy.core) or numpy 2 (numpy._core) pickled its rebuilder by.
    reconstruct = getattr(getattr(np, "_core", None) or np.core, "multiarray")._reconstruct
    numpy_records = [(reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")]
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, *numpy_records, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def allow_records() -> None:
    """Allow ``_records`` in every weights-only load of this process (a converter child process)."""
    import torch

    torch.serialization.add_safe_globals(_records())


_depth = 0  # weights_only_loads() entered and not left (it nests: a resume loads, converts, repairs)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside takes data only (this process's and the child processes'
    started inside, which inherit the setting; a child allows ``_records`` itself)."""
    global _depth
    if _depth:  # NOTE: an inner torch safe_globals() would remove the records on leaving, under the outer one
        yield
        return
    import torch

    # Trusted: pickle, unless the user forces weights-only loads themselves (then the records still pass).
    env = {} if trusted() else {_FORCE_ENV: "1", _UNFORCE_ENV: None}
    before = {name: os.environ.get(name) for name in env}
    _set_env(env)
    _depth += 1
    # NOTE: only the records not allowed already: leaving safe_globals() removes what it added,
    # which would take away a record the caller had allowed for the rest of its process.
    allowed = set(torch.serialization.get_safe_globals())
    try:
        with torch.serialization.safe_globals([record for record in _records() if record not in allowed]):
            yield
    finally:
        _depth -= 1
        _set_env(before)


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def load_data(path, **kwargs):
    """``torch.load`` of one of our checkpoint files, as data (with pickle when trusted)."""
    import torch

    with weights_only_loads():
        return torch.load(path, weights_only=not trusted(), **kwargs)


def refusal(err: BaseException | str) -> str | None:
    """A one-line reason when ``err`` is a weights-only load refusing code in a file (else None)."""
    text = str(err)
    if not (isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text):
        return None
    unsupported = next((line.strip() for line in text.splitlines() if "Unsupported global" in line or "GLOBAL" in line), "")
    return (
        f"the checkpoint holds pickled objects that are not plain data ({unsupported or 'weights-only load failed'}); loading it "
        f"would run code from the file. A checkpoint you trust: set {TRUST_ENV}=1"
    )
