"""Live-tensor accounting: the bytes held by tensors derived from a source, wherever they are held.

On CPU there is no allocator statistic per purpose, so we count it ourselves. While
``watch()`` is active a ``TorchDispatchMode`` sees every tensor an operator returns:

- inside ``source_scope()`` (the teacher) every output is counted;
- inside ``sink_scope()`` (the student) nothing new is counted: student activations are
  not teacher memory, even when a student block reads a teacher tensor (that tensor
  itself stays counted for as long as anything, autograd included, holds it);
- anywhere else (losses, casts, stacking) an output is counted when one of its inputs
  is: LayerNorm copies, fp32 casts and gradients computed from the teacher all count.

Liveness is that of the storage (a C++ weak reference), not of the Python tensor
object, so a tensor that autograd saved for backward stays counted after every Python
reference to it is gone. Operators run by the backward pass are not counted.
``track_everything=True`` counts every operator output (all activations) instead.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorLedger"]

_SOURCE, _SINK, _OTHER = "source", "sink", "other"


class _Mode(TorchDispatchMode):
    def __init__(self, ledger: "LiveTensorLedger"):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ledger._on_op(args, kwargs, out)
        return out


class LiveTensorLedger:
    """Counts live bytes of tensors derived from a source (the teacher), or of all tensors."""

    def __init__(self, *, track_everything: bool = False) -> None:
        self.track_everything = track_everything
        self.peak_bytes = 0
        """Highest live count at any operator (includes transients inside a layer)."""
        self.samples: list[tuple[str, int]] = []
        """(label, live bytes) at each sample point (e.g. stage boundaries)."""
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._role = _OTHER

    # --- scopes --------------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self) -> Iterator["LiveTensorLedger"]:
        """Count while this block runs."""
        with _Mode(self):
            yield self

    @contextlib.contextmanager
    def _scope(self, role: str) -> Iterator[None]:
        previous, self._role = self._role, role
        try:
            yield
        finally:
            self._role = previous

    def source_scope(self) -> contextlib.AbstractContextManager:
        """Every tensor created in here counts (pass as ``LayerwiseModel(teacher, scope=...)``)."""
        return self._scope(_SOURCE)

    def sink_scope(self) -> contextlib.AbstractContextManager:
        """Nothing created in here counts (pass as ``LayerwiseModel(student, scope=...)``)."""
        return self._scope(_SINK)

    # --- counting ------------------------------------------------------------------------
    @staticmethod
    def _key(tensor: torch.Tensor) -> int | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        return storage.data_ptr() or None

    def _is_live(self, key: int) -> bool:
        entry = self._storages.get(key)
        if entry is None:
            return False
        if entry[0].expired():
            del self._storages[key]
            return False
        return True

    def _on_op(self, args, kwargs, out) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # inside backward
        if self._role == _SINK and not self.track_everything:
            return
        input_keys = {k for k in map(self._key, tree_flatten((args, kwargs or {}))[0]) if k is not None}
        if self._role == _OTHER and not self.track_everything and not any(self._is_live(k) for k in input_keys):
            return
        for value in tree_flatten(out)[0]:
            key = self._key(value)
            # NOTE: a view of (or in-place write to) an input holds no new memory: a weight's
            # transpose is not teacher memory; a view of a teacher tensor is already counted.
            if key is None or key in input_keys or self._is_live(key):
                continue
            storage = value.untyped_storage()
            self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    @property
    def live_bytes(self) -> int:
        for key in [k for k, (ref, _) in self._storages.items() if ref.expired()]:
            del self._storages[key]
        return sum(nbytes for _, nbytes in self._storages.values())

    def sample(self, label: str = "") -> int:
        gc.collect()
        live = self.live_bytes
        self.samples.append((label, live))
        return live

    def on_boundary(self) -> Callable[[str, int], None]:
        """A ``cald_forward(on_boundary=...)`` callback that samples at every stage boundary."""
        return lambda event, stage: self.sample(f"{event}:{stage}")

    @property
    def peak_held_bytes(self) -> int:
        """Highest count seen at a sample point (what a schedule keeps between stages)."""
        return max((live for _, live in self.samples), default=0)
