"""Live-tensor accounting: bytes held by tensors a piece of code created, and when.

On CPU there is no allocator statistic per purpose, so we count it ourselves: a
``TorchDispatchMode`` sees every tensor an op returns inside ``scope()``; each storage
is counted once and uncounted when its last tracked tensor is garbage-collected.
``sample()`` records what is alive right now (e.g. at a stage boundary).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorLedger"]


class _Mode(TorchDispatchMode):
    def __init__(self, ledger: "LiveTensorLedger"):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.ledger._track(value)
        return out


class LiveTensorLedger:
    """Counts live bytes of tensors created inside ``scope()``."""

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        """Highest live count at any op (includes transients inside a layer)."""
        self.samples: list[int] = []
        self._storages: dict[int, list] = {}  # storage ptr -> [nbytes, refcount]
        self._tensors: dict[int, weakref.ref] = {}

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with _Mode(self):
            yield

    def _track(self, tensor: torch.Tensor) -> None:
        ref = self._tensors.get(id(tensor))
        if ref is not None and ref() is tensor:
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        tid = id(tensor)
        self._tensors[tid] = weakref.ref(tensor, lambda _r, tid=tid, key=key: self._release(tid, key))

    def _release(self, tid: int, key: int) -> None:
        self._tensors.pop(tid, None)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[key]

    def sample(self) -> int:
        import gc

        gc.collect()
        self.samples.append(self.live_bytes)
        return self.live_bytes

    @property
    def peak_held_bytes(self) -> int:
        """Highest count seen at a sample point (what a schedule keeps between stages)."""
        return max(self.samples, default=0)
