"""A teacher attention block's Q/K/V/O as rows, read only where a mixer keeps them.

The attention-informed init (``init.py``) fills each mixer weight row by row from rows of the
teacher's projections. Under ZeRO-3 a rank keeps a range of each mixer weight, so it needs a
range of rows: ``StoredAttention`` reads just those from the checkpoint, where reading the
projections whole made every rank read every converted layer's attention (about a sixth of a
Llama-3-70B checkpoint per rank, converted whole; an eighth with the default 25% hybrid).

Which checkpoint rows make each row of q/k/v/o is the family reader's business (a fused
``query_key_value`` in grouped order, a ``qkv_proj`` split by sizes). It is learnt by running
that same reader on stand-ins: each 2-D tensor becomes a ``(rows, 1)`` column of integers, each
naming its tensor and row, and what comes out as q is read off as the rows q is made of. The
reader runs twice, the second time on the numbers' complements (negative): a selection of rows
gives the complement of the first run, arithmetic on the values (scaling, abs, a fill, a clamp)
would not. A reader that transposes (GPT-2's ``Conv1D`` weights, stored (in, out)) or computes
is found out so, and its projections are read whole, as before. One that reorders or slices
columns is not (a stand-in has one column): readers select rows only (``FamilyAdapter``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch
from torch import nn

from .registry import AttentionWeights
from .weights import StoredTensor, TensorTree, WeightReader

__all__ = ["AttentionRows", "WholeAttention", "StoredAttention", "read_attention_rows"]

FIELDS = ("q", "k", "v", "o")


class AttentionRows(Protocol):
    """One attention block's projections (fields ``q``, ``k``, ``v``, ``o``), row by row."""

    def shape(self, field: str) -> tuple[int, int] | None:
        """The (out, in) shape of a projection; None for an ``o`` outside the slot (BERT)."""

    def bias(self, field: str) -> torch.Tensor | None: ...

    def rows(self, field: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted, distinct) of a projection, as a (len(index), in) tensor."""


@dataclasses.dataclass(frozen=True)
class WholeAttention:
    """Projections already read whole (``AttentionWeights``)."""

    weights: AttentionWeights

    def shape(self, field: str) -> tuple[int, int] | None:
        weight = getattr(self.weights, field)
        return None if weight is None else tuple(weight.shape)

    def bias(self, field: str) -> torch.Tensor | None:
        return getattr(self.weights, f"{field}_bias")

    def rows(self, field: str, index: torch.Tensor) -> torch.Tensor:
        return getattr(self.weights, field)[index]


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where each row of one projection lies in the checkpoint: tensor ``keys[tensor[i]]``, row ``row[i]``."""

    keys: tuple[str, ...]
    tensor: torch.Tensor
    row: torch.Tensor
    columns: int


class StoredAttention:
    """Projections not read yet: ``rows`` reads the rows asked for, each run of adjacent
    checkpoint rows as one range read. Biases are read whole (a row's worth each)."""

    def __init__(self, reader: WeightReader, origins: dict[str, _Origin | None], biases: dict[str, torch.Tensor | None]):
        self._reader = reader
        self._origins = origins
        self._biases = biases

    def shape(self, field: str) -> tuple[int, int] | None:
        origin = self._origins[field]
        return None if origin is None else (len(origin.row), origin.columns)

    def bias(self, field: str) -> torch.Tensor | None:
        return self._biases[field]

    def rows(self, field: str, index: torch.Tensor) -> torch.Tensor:
        origin = self._origins[field]
        tensors, rows = origin.tensor[index], origin.row[index]
        out = None
        for tensor in tensors.unique().tolist():
            where = (tensors == tensor).nonzero().squeeze(1)
            wanted = rows[where].unique()
            block = self._read_rows(origin.keys[tensor], wanted, origin.columns)
            if out is None:
                out = torch.empty(len(index), origin.columns, dtype=block.dtype)
            out[where] = block[torch.searchsorted(wanted, rows[where])]
        return out if out is not None else torch.empty(0, origin.columns)

    def _read_rows(self, key: str, rows: torch.Tensor, columns: int) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of checkpoint tensor ``key``, a run of adjacent rows per read."""
        stored = StoredTensor(self._reader, key)
        cuts = [0, *((rows[1:] != rows[:-1] + 1).nonzero().squeeze(1) + 1).tolist(), len(rows)]
        runs = [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(cuts, cuts[1:])]
        return torch.cat([stored.read_flat(first * columns, stop * columns).view(-1, columns) for first, stop in runs])


class _RowNames:
    """A reader whose 2-D tensors are stand-ins: a (rows, 1) int64 column whose entry ``r`` is
    ``t << 32 | r`` for the ``t``-th tensor asked for (``negated``: its bitwise complement, a
    negative number); other tensors (biases) are read as they are."""

    def __init__(self, reader: WeightReader, *, negated: bool = False):
        self._reader = reader
        self._negated = negated
        self.keys_asked: list[str] = []

    def keys(self) -> list[str]:
        return self._reader.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(key)

    def get(self, key: str) -> torch.Tensor:
        shape = tuple(self._reader.shape(key))
        if len(shape) != 2:
            return self._reader.get(key)
        self.keys_asked.append(key)
        names = torch.arange(shape[0], dtype=torch.int64) | ((len(self.keys_asked) - 1) << 32)
        return (~names if self._negated else names).unsqueeze(1)


def _origin(names: _RowNames, traced: torch.Tensor | None, negated: torch.Tensor | None) -> _Origin | None:
    """The rows a traced projection is made of; raises ValueError where it is not a selection of
    rows. ``negated``: the same projection traced on the negated stand-ins, which must be the
    complement of this one: a selection of rows keeps it so, arithmetic on the numbers (adding,
    scaling, abs, clamping), which could still give valid-looking rows, does not."""
    if traced is None and negated is None:
        return None
    for t in (traced, negated):
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 2 and t.shape[1] == 1 and len(t) > 0):
            raise ValueError("the family's reader does more than select rows")
    if traced.shape != negated.shape or not torch.equal(~negated, traced):
        raise ValueError("the family's reader computes on its weights")
    tensor, row = traced[:, 0] >> 32, traced[:, 0] & 0xFFFFFFFF
    keys = tuple(names.keys_asked)
    if int(tensor.min()) < 0 or int(tensor.max()) >= len(keys):
        raise ValueError("the family's reader does more than select rows")
    if bool((row >= torch.tensor([names.shape(k)[0] for k in keys])[tensor]).any()):
        raise ValueError("the family's reader does more than select rows")
    if len({names.shape(keys[t])[1] for t in tensor.unique().tolist()}) != 1:
        raise ValueError("the family's reader joins tensors of different widths")
    return _Origin(keys=keys, tensor=tensor, row=row, columns=names.shape(keys[int(tensor[0])])[1])


def read_attention_rows(
    read_attention: Callable[[nn.Module, object], AttentionWeights], reader: WeightReader, prefix: str, config, *, by_rows: bool
) -> AttentionRows:
    """One attention block's projections under ``prefix``: not read yet, row by row where the
    family's reader only selects rows and ``by_rows``; read whole otherwise."""
    if by_rows:
        names, negated = _RowNames(reader), _RowNames(reader, negated=True)
        try:
            traced = read_attention(TensorTree(names, prefix), config)
            complement = read_attention(TensorTree(negated, prefix), config)
            if names.keys_asked != negated.keys_asked:
                raise ValueError("the family's reader asks for other tensors each time")
            origins = {field: _origin(names, getattr(traced, field), getattr(complement, field)) for field in FIELDS}
        except (ValueError, RuntimeError, TypeError, IndexError, AttributeError, KeyError):
            # NOTE: read whole below, which raises what is truly wrong (a projection missing).
            pass
        else:
            if all(origins[f] is not None for f in ("q", "k", "v")):
                return StoredAttention(reader, origins, {f: getattr(traced, f"{f}_bias") for f in FIELDS})
    return WholeAttention(read_attention(TensorTree(reader, prefix), config))
