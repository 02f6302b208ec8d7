"""Pretrained weights read lazily, one tensor at a time, and written into any module.

A checkpoint is never loaded whole: ``WeightReader.get`` reads one tensor (safetensors with
plain file reads; ``.bin`` files are opened with ``mmap=True``), and ``load_weights`` hands
each tensor, not yet read (``StoredTensor``), to an ``assign`` function that writes it into
the matching parameter. With a plain module ``assign`` reads it whole and copies; under ZeRO-3
it reads only this rank's partition, a range of the flattened tensor (see
``engines/partitioned.py``). Peak memory is therefore one tensor, not one model, and under
ZeRO-3 about one tensor's partition (read straight into place from safetensors of the model's
dtype; one more partition-sized buffer otherwise): each of N ranks reads 1/N of the checkpoint
(a MoE's fused experts: the experts its range covers, each written in place).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

__all__ = [
    "Assign",
    "StoredTensor",
    "whole",
    "WeightReader",
    "SafetensorsReader",
    "TorchBinReader",
    "StateDictReader",
    "open_weights",
    "check_complete",
    "weights_fingerprint",
    "load_weights",
    "copy_assign",
    "WeightsMismatchError",
    "TensorTree",
    "RenamedReader",
    "refuse_unreadable_converters",
]

class WeightsMismatchError(RuntimeError):
    """A checkpoint and a model disagree about which tensors exist or their shapes."""


class WeightReader(Protocol):
    """Read-only, lazy access to the tensors of a checkpoint by name. A reader may also have
    ``get_flat(key, start, stop)``: elements ``[start, stop)`` of the row-major flattened
    tensor, reading no more of it than that (``StoredTensor.read_flat`` falls back to ``get``),
    and ``read_flat_into(key, start, out) -> bool``: such a range read into ``out`` itself."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One checkpoint tensor, not read yet: ``assign`` reads what it keeps of it."""

    reader: WeightReader
    key: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.reader.shape(self.key))

    def read(self) -> torch.Tensor:
        return self.reader.get(self.key)

    def read_flat(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor."""
        if (get_flat := getattr(self.reader, "get_flat", None)) is not None:
            return get_flat(self.key, start, stop)
        return self.read().reshape(-1)[start:stop]

    def read_flat_into(self, out: torch.Tensor, start: int) -> None:
        """Elements ``[start, start + out.numel())`` of the flattened tensor, written into ``out``
        (1-D): straight from the file where the reader can (same dtype, on the host), so no second
        copy of the range is ever held."""
        read_into = getattr(self.reader, "read_flat_into", None)
        if read_into is not None and out.device.type == "cpu" and out.is_contiguous() and read_into(self.key, start, out):
            return
        out.copy_(self.read_flat(start, start + out.numel()))


def whole(value: "torch.Tensor | StoredTensor") -> torch.Tensor:
    """``value`` itself, or the checkpoint tensor it stands for, read whole."""
    return value.read() if isinstance(value, StoredTensor) else value


Assign = Callable[[torch.Tensor, "torch.Tensor | StoredTensor"], None]
"""``assign(param_or_buffer, value)``: write a full-size value (a tensor, or a checkpoint
tensor to read) into a (possibly partitioned) tensor."""


class StateDictReader:
    """A reader over tensors already in memory (a plain module's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Of a memory-mapped file, only the pages of the range are read."""
        return self._tensors[key].reshape(-1)[start:stop]

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def byte_samples(self, key: str, size: int) -> Iterator[bytes]:
        """``size`` bytes at the start, middle and end of tensor ``key`` (``weights_fingerprint``);
        of a memory-mapped file, only their pages are read."""
        flat = self._tensors[key].reshape(-1)
        step = max(size // max(flat.element_size(), 1), 1)
        for start in sorted({0, max(flat.numel() // 2 - step // 2, 0), max(flat.numel() - step, 0)}):
            yield flat[start : start + step].contiguous().view(torch.uint8).numpy().tobytes()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsReader:
    """One or several ``*.safetensors`` files, read one tensor at a time with plain file reads.

    NOTE: not ``safetensors.safe_open``: it memory-maps each file, and every page a read
    touches stays mapped and counted in the process's resident memory until the file is
    closed, so reading a whole checkpoint through it looks (to RSS and to a cgroup limit)
    like holding the whole checkpoint. The format is a JSON header then raw bytes; here each
    tensor is read into its own buffer and nothing stays mapped.
    """

    def __init__(self, files: Iterable[Path]):
        self._entries: dict[str, tuple[str, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._sizes: dict[str, int] = {}  # each file's size in bytes (check_sizes)
        for path in sorted(Path(f) for f in files):
            with open(path, "rb") as handle:
                size = self._sizes[str(path)] = os.fstat(handle.fileno()).st_size
                first = handle.read(8)
                header_len = int.from_bytes(first, "little")
                # NOTE: checked before the read: a git-lfs pointer's first 8 bytes ("version ") say 2.3e18.
                if header_len > size - 8:
                    lfs = (first + handle.read(24)).startswith(b"version https://git-lfs")
                    raise WeightsMismatchError(
                        f"{path} is truncated or not a safetensors file{' (a git-lfs pointer: fetch the file with `git lfs pull`)' if lfs else ''}: "
                        f"its header needs {header_len} bytes, the file holds {max(size - 8, 0)} after the first 8"
                    )
                raw = handle.read(header_len)
                try:
                    header = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise WeightsMismatchError(f"{path} is not a safetensors file (unreadable header: {err})") from err
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _SAFETENSORS_DTYPES:
                    raise WeightsMismatchError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                self._entries[key] = (str(path), 8 + header_len + begin, end - begin, _SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]))
        if not self._entries:
            raise FileNotFoundError(f"no tensors in {[str(f) for f in files]}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def check_sizes(self) -> None:
        """Refuse, by name, a tensor whose bytes lie past the end of its file (a copy cut short),
        from the headers and file sizes alone: nothing is read."""
        for key, (path, offset, nbytes, _, _) in self._entries.items():
            if offset + nbytes > self._sizes[path]:
                raise WeightsMismatchError(f"{path} is truncated: tensor {key} needs {nbytes} bytes at offset {offset}, the file holds {self._sizes[path]}")

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][4]

    def get(self, key: str) -> torch.Tensor:
        path, offset, nbytes, dtype, shape = self._entries[key]
        return self._read(key, 0, nbytes).view(dtype).reshape(shape)

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        _, _, nbytes, dtype, shape = self._entries[key]
        size = dtype.itemsize
        start, stop = max(0, min(start, nbytes // size)), max(0, min(stop, nbytes // size))
        return self._read(key, start * size, max(stop - start, 0) * size).view(dtype)

    def read_flat_into(self, key: str, start: int, out: torch.Tensor) -> bool:
        """``get_flat`` written into ``out`` (1-D, contiguous, on the host) by the file read itself;
        False, and nothing read, where ``out`` has another dtype than the file's tensor."""
        _, _, nbytes, dtype, _ = self._entries[key]
        size = dtype.itemsize
        if out.dtype != dtype or start < 0 or (start + out.numel()) * size > nbytes:
            return False
        self._read(key, start * size, out.numel() * size, into=out.view(torch.uint8))
        return True

    def _read(self, key: str, begin: int, length: int, *, into: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes ``[begin, begin + length)`` of tensor ``key``'s data (into ``into``'s bytes, if given)."""
        path, offset, nbytes, _, _ = self._entries[key]
        buffer = torch.empty(length, dtype=torch.uint8) if into is None else into
        with open(path, "rb") as handle:
            handle.seek(offset + begin)
            if handle.readinto(memoryview(buffer.numpy())) != length:
                raise WeightsMismatchError(f"{path} is truncated: tensor {key} needs {nbytes} bytes at offset {offset}")
        return buffer

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][3]

    def byte_samples(self, key: str, size: int) -> Iterator[bytes]:
        """``size`` bytes at the start, middle and end of tensor ``key`` (``weights_fingerprint``)."""
        path, offset, nbytes, _, _ = self._entries[key]
        with open(path, "rb") as handle:
            for start in sorted({0, max(nbytes // 2 - size // 2, 0), max(nbytes - size, 0)}):
                handle.seek(offset + start)
                yield handle.read(min(size, nbytes))


class TorchBinReader(StateDictReader):
    """``pytorch_model*.bin`` files, memory-mapped so that only the tensors read are paged in."""

    def __init__(self, files: Iterable[Path]):
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(Path(f) for f in files):
            tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        super().__init__(tensors)


class RenamedReader:
    """A reader whose keys are a model's own names: transformers' checkpoint conversions applied.

    transformers 5 renames some checkpoint keys at load time (GPT-NeoX's ``embed_out`` is
    ``lm_head``; a checkpoint saved from the base model lacks the ``model.`` prefix), and fuses
    others (``WeightConverter``: a MoE's experts, one tensor each in the checkpoint, stacked into
    one ``experts.gate_up_proj``). The same conversions apply here, lazily: a fused tensor is
    read when asked for, from its sources alone (one layer's experts, never the whole model),
    stacked experts written one at a time into it and any other conversion by transformers' own
    operations, so it equals what ``from_pretrained`` builds.
    """

    def __init__(self, reader: WeightReader, model: nn.Module):
        self._reader = reader
        # model key -> its checkpoint key, or (converter, [(source pattern, checkpoint key), ...]) for a fused one
        self._to_checkpoint: dict[str, str | tuple[object, list[tuple[str, str]]]] = {}
        renamings, converters = _transforms_for(model)
        # NOTE: a value for every key: transformers adds or strips the prefix only where .get() is not None.
        model_keys = dict.fromkeys(model.state_dict(keep_vars=True), True)
        prefix = getattr(model, "base_model_prefix", None) or None
        keys = reader.keys()
        if renamings or converters or prefix:
            from transformers.core_model_loading import dot_natural_key, rename_source_key

            refuse_unreadable_converters(converters)
            by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
            # NOTE: in transformers' order (layer and expert numbers as numbers): a fused tensor stacks its sources so.
            for key in sorted(keys, key=dot_natural_key):
                new, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
                if pattern is None:
                    self._to_checkpoint[new] = key
                else:
                    self._to_checkpoint.setdefault(new, (by_pattern[pattern], []))[1].append((pattern, key))
        else:
            self._to_checkpoint = {key: key for key in keys}
        if prefix:
            self._same_prefix_for_all(prefix, model_keys)

    def _same_prefix_for_all(self, prefix: str, model_keys: dict) -> None:
        """transformers adds (or strips) the base-model prefix key by key, where the model has the
        result; a checkpoint of the base model lacks it on every key, the student's mixer slots
        included (which hold attention in the checkpoint): add it there too, and likewise strip."""
        pre = prefix + "."
        plain = [(new, old) for new, old in self._to_checkpoint.items() if isinstance(old, str)]
        added = any(new == pre + old for new, old in plain)
        stripped = any(old == pre + new for new, old in plain)
        if added == stripped:
            return

        def moved(key: str) -> str:
            if key in model_keys:  # the model's own name (the head beside the base model): as it is
                return key
            return pre + key if added and not key.startswith(pre) else key.removeprefix(pre) if stripped else key

        self._to_checkpoint = {moved(new): old for new, old in self._to_checkpoint.items()}

    def keys(self) -> list[str]:
        return list(self._to_checkpoint)

    def shape(self, key: str) -> tuple[int, ...]:
        source = self._to_checkpoint[key]
        if isinstance(source, str):
            return self._reader.shape(source)
        # A fused tensor's shape: its operations run on meta tensors of its sources' shapes (nothing read).
        return tuple(self._fuse(key, lambda k: torch.empty(self._reader.shape(k), device="meta")).shape)

    def get(self, key: str) -> torch.Tensor:
        source = self._to_checkpoint[key]
        return self._reader.get(source) if isinstance(source, str) else self._fuse(key, self._reader.get)

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """A range of the flattened tensor: of a stacked MoE tensor, only the experts it covers
        are read (each rank of a ZeRO-3 build reads its own few of a layer's experts)."""
        source = self._to_checkpoint[key]
        if isinstance(source, str):
            return StoredTensor(self._reader, source).read_flat(start, stop)
        plan = self._stack_plan(*source)
        if plan is None or start >= stop:
            return self.get(key).reshape(-1)[start:stop]
        per_row = math.prod(plan.shape[1:])
        rows = range(start // per_row, -(-stop // per_row))
        first = rows.start * per_row
        return self._stacked_rows(plan, rows, self._reader.get).reshape(-1)[start - first : stop - first]

    def read_flat_into(self, key: str, start: int, out: torch.Tensor) -> bool:
        source = self._to_checkpoint[key]
        read_into = getattr(self._reader, "read_flat_into", None)
        return isinstance(source, str) and read_into is not None and read_into(source, start, out)

    def _fuse(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The model tensor ``key`` built from its checkpoint tensors by its converter's operations."""
        converter, sources = self._to_checkpoint[key]
        if (plan := self._stack_plan(converter, sources)) is not None:
            return self._stacked_rows(plan, range(plan.shape[0]), read)
        converter = copy.deepcopy(converter)  # as transformers: one instance per target tensor
        for pattern, checkpoint_key in sources:
            converter.add_tensor(key, checkpoint_key, pattern, functools.partial(read, checkpoint_key))
        out = converter.convert(key)
        if key not in out:
            raise WeightsMismatchError(f"fusing {[k for _, k in sources][:4]} into {key} gave {sorted(out)} instead")
        return out[key]

    def _stack_plan(self, converter, sources: list[tuple[str, str]]) -> "_StackPlan | None":
        """How a MoE's experts are stacked (``MergeModulelist(0)``) and each pattern's stack then
        joined (``Concatenate(d)``: gate and up), from the sources' shapes (nothing read). None:
        another conversion (transformers' operations run)."""
        ops = converter.operations
        if [type(op).__name__ for op in ops] not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) or ops[0].dim != 0:
            return None
        groups = [g for p in converter.source_patterns if (g := [k for sp, k in sources if sp == p])]
        if len(groups) > 1 and len(ops) == 1:
            return None
        stacks = [(len(g), *self._reader.shape(g[0])) for g in groups]  # each pattern's stack: (experts, *expert shape)
        join = ops[1].dim % len(stacks[0]) if len(ops) > 1 else 0  # a negative dim counts from the stack's last
        if any(tuple(self._reader.shape(k)) != stack[1:] for g, stack in zip(groups, stacks) for k in g) or any(
            len(stack) != len(stacks[0]) or any(a != b for d, (a, b) in enumerate(zip(stack, stacks[0])) if d != join) for stack in stacks
        ):
            return None  # shapes that do not join: transformers' operations say why
        shape = list(stacks[0])
        shape[join] = sum(stack[join] for stack in stacks)
        return _StackPlan(groups=groups, sizes=[stack[join] for stack in stacks], join=join, shape=tuple(shape))

    @staticmethod
    def _stacked_rows(plan: "_StackPlan", rows: range, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Rows ``rows`` (along dim 0) of the stacked tensor, one expert at a time written into
        the tensor they make: peak memory is that tensor and one expert, where stacking then
        joining holds the experts, the stacks and the join at once."""
        out, offset = None, 0
        for group, size in zip(plan.groups, plan.sizes):
            for expert, checkpoint_key in enumerate(group):
                row = offset + expert if plan.join == 0 else expert  # joined along dim 0, a pattern's experts follow the last's
                if row not in rows:
                    continue
                tensor = read(checkpoint_key)
                if out is None:
                    out = torch.empty((len(rows), *plan.shape[1:]), dtype=tensor.dtype, device=tensor.device)
                slot = out[row - rows.start]
                (slot if plan.join == 0 else slot.narrow(plan.join - 1, offset, size)).copy_(tensor)  # this pattern's part
                del tensor
            offset += size
        return out


@dataclasses.dataclass(frozen=True)
class _StackPlan:
    groups: list[list[str]]
    """Each source pattern's checkpoint keys, one per expert, in order."""
    sizes: list[int]
    """Each pattern's extent along ``join`` in the fused tensor."""
    join: int
    shape: tuple[int, ...]
    """The fused tensor's shape: (experts, ...) stacked, the patterns joined along ``join``."""


# The operations a fused tensor is built by here: stacking one tensor per expert, joining
# them, transposing (ernie's experts). Others need the whole model (Split sizes q/k/v by it) or
# make several tensors of one.
_READABLE_OPS = frozenset({"MergeModulelist", "Concatenate", "Transpose"})


def refuse_unreadable_converters(converters: list) -> None:
    """Refuse (by name) fusing converters tensor-by-tensor reading cannot apply: one whose
    operations are not stacking, joining or transposing, or that makes several tensors."""
    for converter in converters:
        ops = [type(op).__name__ for op in converter.operations]
        if len(converter.target_patterns) > 1 or not set(ops) <= _READABLE_OPS:
            raise WeightsMismatchError(
                f"its checkpoints keep tensors that transformers converts at load ({converter.source_patterns[:2]} -> "
                f"{converter.target_patterns[:3]} by {', '.join(ops)}), which conversion cannot rebuild tensor by tensor "
                f"(it stacks, joins and transposes: {', '.join(sorted(_READABLE_OPS))}, one tensor from several)"
            )


def _transforms_for(model: nn.Module) -> tuple[list, list]:
    """transformers' (renamings, fusing converters) for ``model``; none for plain modules."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # an older transformers without weight conversions
        return [], []
    if not isinstance(model, PreTrainedModel):
        return [], []
    transforms = get_model_conversion_mapping(model)
    return [t for t in transforms if not isinstance(t, WeightConverter)], [t for t in transforms if isinstance(t, WeightConverter)]


def open_weights(folder: str | Path) -> WeightReader:
    """The weights of a HF model folder: safetensors (single or sharded) first, then .bin."""
    reader, files = _weight_files(Path(folder))
    return reader(files)


def check_complete(folder: str | Path) -> None:
    """Refuse a model folder whose safetensors files are cut short or have no readable header, by
    name, before a load reads them (``from_pretrained`` fails there with the safetensors
    library's own error, after whatever came before it: a whole teacher scored first)."""
    reader, files = _weight_files(Path(folder))
    if reader is SafetensorsReader:  # (a .bin checkpoint is left to torch: reading it means loading it)
        SafetensorsReader(files).check_sizes()


def _weight_files(folder: Path) -> tuple[type, list[Path]]:
    """The reader and the files of a HF model folder's weights (``open_weights``)."""
    for index_name, reader in (("model.safetensors.index.json", SafetensorsReader), ("pytorch_model.bin.index.json", TorchBinReader)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing[:4]}")
            return reader, [folder / s for s in shards]
    # NOTE: as transformers, model.safetensors alone when there is no index: Mistral's repos also
    # hold consolidated.safetensors, the same weights under Mistral's own names.
    if (folder / "model.safetensors").is_file():
        return SafetensorsReader, [folder / "model.safetensors"]
    if files := sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated")):
        return SafetensorsReader, files
    if files := sorted(folder.glob("pytorch_model*.bin")):
        return TorchBinReader, files
    raise FileNotFoundError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


_SLICE_BYTES = 4096


def weights_fingerprint(folder: str | Path) -> list[list]:
    """[file name, size, digest] of each weight file of a HF model folder: what a resumed run
    compares with its first session's teacher. The digest covers every tensor's name, dtype and
    shape and three 4 KiB slices of its bytes (its start, middle and end), so weights saved anew
    over the same geometry (a teacher fine-tuned further, even one layer of it, another seed)
    change it, at a cost of milliseconds however large the model; a copy elsewhere or another
    spelling of the path does not."""
    reader_class, files = _weight_files(Path(folder))
    fingerprint = []
    for path in files:
        digest, reader = hashlib.sha256(), reader_class([path])
        for key in sorted(reader.keys()):
            digest.update(f"{key}:{reader.dtype(key)}:{reader.shape(key)}".encode())
            for sample in reader.byte_samples(key, _SLICE_BYTES):
                digest.update(sample)
        fingerprint.append([path.name, path.stat().st_size, digest.hexdigest()[:16]])
    return fingerprint


@torch.no_grad()
def copy_assign(target: torch.Tensor, value: "torch.Tensor | StoredTensor") -> None:
    """``assign`` for plain (unpartitioned) modules."""
    target.copy_(whole(value))


def _matches(patterns: Iterable[str] | None, key: str) -> bool:
    return any(re.search(p, key) for p in patterns or ())


_STALE_BUFFERS = [r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$", r"\.attn\.masked_bias$"]


def load_weights(
    model: nn.Module,
    reader: WeightReader,
    assign: Assign = copy_assign,
    *,
    shape_of: Callable[[torch.Tensor], tuple[int, ...]] = lambda t: tuple(t.shape),
    skip_missing: tuple[str, ...] = (),
    skip_unexpected: tuple[str, ...] = (),
    check_only: bool = False,
) -> list[str]:
    """Write every tensor of ``model``'s state dict that ``reader`` holds, one at a time.

    A model tensor the checkpoint lacks, or a checkpoint tensor the model has no slot for,
    is an error (raised before anything is written), except for keys that start with one
    of ``skip_missing`` / ``skip_unexpected`` or match the model's own HF ignore patterns
    (``_keys_to_ignore_on_load_*``). A tensor shared under several names (tied embeddings)
    is written once, from whichever of its names the checkpoint holds. ``shape_of`` gives a
    tensor's full shape (a ZeRO-3 partition reports it as ``ds_shape``). Checkpoint keys are
    renamed as transformers renames them (``RenamedReader``). Returns the model keys written
    (``check_only``: the keys that would be written; only names and shapes are read).
    """
    reader = RenamedReader(reader, model)
    names_of: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    all_names = {n for names in names_of.values() for n in names}
    ignore_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    # NOTE: as transformers drops them too: checkpoints saved before 4.31 (Pythia, Llama-2 era)
    # carry every layer's rotary inv_freq and BERT-style position_ids, and GPT-2's its attention's
    # masked_bias (openai-community/gpt2), buffers rebuilt at init or no longer used.
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []) + _STALE_BUFFERS

    available = set(reader.keys())
    plan: list[tuple[str, torch.Tensor]] = []
    missing, wrong_shape = [], []
    for tid, names in names_of.items():
        source = next((n for n in names if n in available), None)
        if source is None:
            if not any(n.startswith(skip_missing) or _matches(ignore_missing, n) for n in names):
                missing.append(names[0])
            continue
        full_shape = tuple(shape_of(tensors[tid]))
        if tuple(reader.shape(source)) != full_shape:
            wrong_shape.append(f"{source}: checkpoint {tuple(reader.shape(source))} vs model {full_shape}")
        plan.append((source, tensors[tid]))
    unexpected = [k for k in available if k not in all_names and not k.startswith(skip_unexpected) and not _matches(ignore_unexpected, k)]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:8]} ({len(missing)} in all), "
            f"unexpected {sorted(unexpected)[:8]} ({len(unexpected)} in all), wrong shapes {wrong_shape[:4]}"
        )
    if not check_only:
        for source, target in plan:
            assign(target, StoredTensor(reader, source))
    return [source for source, _ in plan]


class TensorTree:
    """Attribute access to a checkpoint's tensors under a key prefix, shaped like the module that owns them.

    ``TensorTree(reader, "model.layers.3.self_attn.").q_proj.weight`` reads one tensor,
    so a family adapter's ``read_attention`` works on a checkpoint as on a module; a name
    with no tensor under it is ``None`` (an absent bias).
    """

    def __init__(self, reader: WeightReader, prefix: str):
        self._reader = reader
        self._prefix = prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        keys = self._reader.keys()
        if key in keys:
            return self._reader.get(key)
        if any(k.startswith(key + ".") for k in keys):
            return TensorTree(self._reader, key + ".")
        return None
