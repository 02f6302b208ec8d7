# megatron-core's indexed dataset (.bin/.idx): its builder writes our caches; reading, the
# hot path of every rank, goes through a small read-only view of the same format.
from __future__ import annotations

import os
import struct
import warnings

import numpy as np

__all__ = ["IndexedFile", "IndexedFileError", "megatron_indexed"]


def megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported on first use (megatron.core is slow
    to import, and its import warns about optional Transformer Engine / Apex kernels and
    its own deprecations, none of which concern data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# The .idx layout that megatron-core's _IndexWriter writes (version 1): header, version <Q,
# dtype code <B, sequence count <Q, document count <Q, then int32 sequence lengths, int64
# sequence byte pointers into the .bin, int64 document indices (first sequence of each
# document, then the end), and int8 sequence modes for multimodal datasets only.
_HEADER = b"MMIDIDX\x00\x00"
_COUNTS = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class IndexedFileError(ValueError):
    """A .bin/.idx pair that is not, or no longer, a readable megatron indexed dataset."""


class IndexedFile:
    """A megatron indexed dataset, memory-mapped read-only: what the training ranks read.

    NOTE: importing megatron.core costs ~1.4 s per process (it builds its fused kernels
    with torch.compile on import), paid by every rank of every launch only to map two
    files. This view reads the same bytes as megatron's ``IndexedDataset(prefix, mmap=True)``
    (tests/unit/test_data.py checks it against megatron on our caches and on a builder's
    multi-sequence documents); building still goes through megatron's IndexedDatasetBuilder.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path = prefix + ".idx"
        offset = len(_HEADER) + _COUNTS.size
        with open(idx_path, "rb") as stream:
            head = stream.read(offset)
        if len(head) < offset or head[: len(_HEADER)] != _HEADER:
            raise IndexedFileError(f"{idx_path} is not a megatron indexed dataset index (no MMIDIDX header)")
        version, code, sequences, documents = _COUNTS.unpack(head[len(_HEADER) :])
        if version != 1 or code not in _DTYPES:
            raise IndexedFileError(f"{idx_path}: unsupported megatron index (version {version}, dtype code {code})")
        self.dtype = np.dtype(_DTYPES[code])
        needed, size = offset + sequences * (4 + 8) + documents * 8, os.path.getsize(idx_path)
        if size < needed:
            raise IndexedFileError(f"{idx_path} is cut short: {size} bytes, its header promises {needed}")
        index = np.memmap(idx_path, mode="r", order="C")
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=documents, offset=offset)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if sequences else 0
        size = os.path.getsize(prefix + ".bin")
        if size < end:
            raise IndexedFileError(f"{prefix}.bin is cut short: {size} bytes, its index points to {end}")
        self._bin = np.memmap(prefix + ".bin", mode="r", order="C")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, sequence: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of one sequence (a read-only view of the map)."""
        if length is None:
            length = int(self.sequence_lengths[sequence]) - offset
        start = int(self.sequence_pointers[sequence]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)
