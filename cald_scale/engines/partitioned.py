"""ZeRO-3 partitioned construction: build modules under ``deepspeed.zero.Init`` and write
weights straight into each rank's partition, with no communication and no full copy.

``assign`` reuses DeepSpeed's own partitioning (``param.partition(has_been_updated=True)``
makes the partition, copies this rank's slice of ``param.data`` into it and frees the rest),
so the layout is DeepSpeed's by construction; construction itself makes no partition, so
nothing is resident before it is written. A checkpoint tensor is read only where this rank's
slice lies: ``param.data`` is a full-size tensor of which only that range is written (the
rest is allocated, never touched, so never resident), and each of N ranks reads 1/N of the
checkpoint from disk.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch

from ..conversion.placement import PLAIN, Placement
from ..conversion.weights import StoredTensor, whole
from ..distill.losses import RowPieces

__all__ = [
    "zero3_placement",
    "placement_for",
    "is_partitioned",
    "assign_partitioned",
    "gather_partitioned",
    "full_shape",
    "own_range",
    "frozen_row_pieces",
    "whole_row_pieces",
]


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


@torch.no_grad()
def assign_partitioned(target: torch.Tensor, value: torch.Tensor | StoredTensor) -> None:
    """Write the full ``value`` into ``target``, keeping only this rank's partition when it is a
    ZeRO-3 parameter (of a checkpoint tensor, only that partition is read where it can be)."""
    if not is_partitioned(target):
        target.copy_(whole(value))
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if tuple(value.shape) != tuple(target.ds_shape):
        raise ValueError(f"cannot assign a {tuple(value.shape)} tensor to a parameter of shape {tuple(target.ds_shape)}")
    if target.ds_status == ZeroParamStatus.INFLIGHT:
        raise RuntimeError(f"parameter {target.ds_id} is being gathered; cannot assign it now")
    # Unwritten since construction, a parameter has no partition yet (_init_without_broadcast):
    # DeepSpeed's partition() below allocates it where it would have.
    partition = target.ds_tensor
    dtype, device = (target.dtype, target.cald_partition_device) if partition is None else (partition.dtype, partition.device)
    if target.ds_status == ZeroParamStatus.AVAILABLE:
        target.data.copy_(whole(value))  # gathered (or persistent): its full data is live
    else:
        if isinstance(value, StoredTensor):
            value = _read_own_partition(target, value, dtype, device)
        target.data = value.to(device=device, dtype=dtype).reshape(target.ds_shape)
        target.ds_status = ZeroParamStatus.AVAILABLE
    target.cald_written = True  # built without initialisation: unwritten_partitioned names the rest
    # NOTE: has_been_updated makes DeepSpeed copy this rank's slice of .data into its partition.
    if not getattr(target, "ds_persist", False):
        target.partition(has_been_updated=True)
    else:
        # A persistent parameter (small, kept gathered by an engine) must have its partition
        # updated too: DeepSpeed re-gathers it from the partition after the first traced pass,
        # which otherwise brought back the old values (a waypoint loaded before the teacher's
        # first forward was silently undone at its second).
        target.ds_persist = False
        target.partition(has_been_updated=True)
        target.ds_persist = True
        target.all_gather()


def own_range(target: torch.Tensor) -> tuple[int, int] | None:
    """The range ``[start, stop)`` of ``target``'s flattened full value that this rank keeps, or
    None where it keeps (or DeepSpeed copies from) more than its partition: an unpartitioned or
    gathered tensor, a persistent (small) parameter, and ZeRO++'s secondary partition (hpZ: its
    process group is set on every parameter, while the secondary tensor itself is dropped after
    each optimizer step and rebuilt from ``.data`` at the next partition; ``load_ds_config``
    refuses hpZ anyway).

    It is the range DeepSpeed's ``partition`` copies from: the ``ceil(numel / ranks)`` elements at
    ``that x rank`` in the parameter's group (the last partition ends in padding)."""
    if not is_partitioned(target) or getattr(target, "ds_persist", False) or getattr(target, "ds_zero_param_process_group", None) is not None:
        return None
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if target.ds_status == ZeroParamStatus.AVAILABLE:
        return None
    group = target.ds_process_group
    numel = target.ds_numel
    size = -(-numel // dist.get_world_size(group=group))
    start = size * dist.get_rank(group=group)
    return min(start, numel), min(start + size, numel)


def _read_own_partition(target: torch.Tensor, stored: StoredTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A full-size tensor for ``target.data`` in which only this rank's range (``own_range``)
    holds ``stored``'s values, read alone. The rest is left unwritten, and stays unresident on
    the host (a large allocation is mapped lazily). Where the rank keeps more, all is read."""
    kept = own_range(target)
    if kept is None:
        return stored.read()
    start, stop = kept
    full = torch.empty(target.ds_numel, dtype=dtype, device=device)
    if start < stop:
        stored.read_flat_into(full[start:stop], start)
    return full


def gather_partitioned(params: Sequence[torch.Tensor]):
    """Full values of ZeRO-3 parameters for reading (released on exit; nothing is written back)."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=None)


def zero3_placement(ds_config: dict) -> Placement:
    """Partitioned placement for a resolved ZeRO-3 ds_config (its dtype and offload settings apply)."""
    # NOTE: zero.Init patches tensor construction; torch._dynamo must be imported before it,
    # or a lazy import inside (transformers' masking utils) fails on the patched constructor.
    import torch._dynamo  # noqa: F401

    # Buffer sizes still "auto" (sized from the built model later) mean nothing to zero.Init.
    ds_config = {**ds_config, "zero_optimization": {k: v for k, v in ds_config["zero_optimization"].items() if v != "auto"}}

    def construct(config):
        _import_family_module(config)
        # NOTE: no dtype argument: deepspeed 0.19 ignores it on CPU (bf16 wins); the config's
        # bf16/fp16 flags decide, fp32 when both are off.
        return _init_without_broadcast()(config_dict_or_path=ds_config)

    return Placement(
        name="zero3", construct=construct, assign=assign_partitioned, gather=gather_partitioned, shape_of=full_shape,
        kept=own_range, unwritten=unwritten_partitioned,
    )


@functools.cache
def _init_without_broadcast() -> type:
    """``deepspeed.zero.Init`` without its broadcast of each new parameter from rank 0.

    zero.Init makes every rank's new parameters rank 0's by broadcasting each whole tensor as it
    is built: the model's size over the network, and on every other rank each whole tensor
    written once (an embedding of 151936 x 896 in fp32: 544 MB resident for a moment on rank 1,
    none on rank 0). Here every parameter is written afterwards, from the checkpoint or a seeded
    mixer init that every rank computes alike, and ``unwritten_partitioned`` refuses a model
    with one that was not, so what was built is never read."""
    import deepspeed
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, free_param

    class InitWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            if param.ds_persist:
                # NOTE: DeepSpeed 0.19 decides persistence in the engine, after every parameter is
                # written (nothing is persistent here); were a small one marked now, its partition
                # is made as DeepSpeed makes it, on the local device.
                param.partition()
                return
            # NOTE: no partition yet either: DeepSpeed's copies this rank's slice of the tensor
            # just built, so every partition would be resident from construction on, and so would
            # those of parameters dropped before they are written (a tied model's untied head, the
            # student's copies of what it then shares with the teacher). assign_partitioned's
            # partition() allocates it, where DeepSpeed would have, and fills it. Until then the
            # parameter cannot be gathered (DeepSpeed fails on the missing partition): a model
            # built here is refused by check_written before anything gathers it.
            param.cald_partition_device = torch.device("cpu" if self.remote_device in (OffloadDeviceEnum.cpu, OffloadDeviceEnum.nvme) else self.remote_device)
            free_param(param)
            param.ds_status = ZeroParamStatus.NOT_AVAILABLE

    return InitWithoutBroadcast


def unwritten_partitioned(model: torch.nn.Module) -> list[str]:
    """The ZeRO-3 parameters of ``model`` that ``assign_partitioned`` never wrote."""
    return [name for name, param in model.named_parameters() if is_partitioned(param) and not getattr(param, "cald_written", False)]


def _import_family_module(config) -> None:
    """Import the transformers modeling module(s) of ``config``'s family, if not yet imported.

    NOTE: a module class first defined inside ``deepspeed.zero.Init`` has its ``__init__``
    reset to the undecorated one when the context exits, which drops what a class decorator
    added (transformers >= 5.25's kernel hooks: ``LlamaAttention`` then lacks the
    ``_kernel_funcs`` its forward reads). transformers imports a family's modeling file
    lazily, on first use, so the classes are resolved here, before zero.Init is entered:
    through the auto mappings, which also cover families built from another's classes
    (exaone -> llama).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    hf_config = config.teacher_hf_config() if hasattr(config, "teacher_hf_config") else config  # our students wrap one
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        try:
            mapping[type(hf_config)]  # NOTE: the lookup imports the class's module
        except KeyError:
            pass  # not in this mapping (an encoder has no causal LM; a custom model is in neither)


def placement_for(ds_config: dict | None) -> Placement:
    """ZeRO-3 placement when the config asks for stage 3 and a process group exists, else plain."""
    import torch.distributed as dist

    stage = (ds_config or {}).get("zero_optimization", {}).get("stage")
    if stage == 3 and dist.is_available() and dist.is_initialized():
        return zero3_placement(ds_config)
    return PLAIN



def whole_row_pieces(weight: torch.Tensor, *, piece_bytes: int = 32 << 20) -> RowPieces:
    """Rows of a whole matrix (an LM head) read a slice at a time, as ``frozen_row_pieces``
    reads a partitioned one: the head losses then never hold ``vocab x hidden`` logits' worth."""
    rows = max(1, piece_bytes // (weight.shape[1] * weight.element_size()))

    def pieces() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, weight.shape[0], rows):
            ids = torch.arange(start, min(start + rows, weight.shape[0]), device=weight.device)
            yield ids, weight[start : start + len(ids)]

    return pieces


def frozen_row_pieces(weight: torch.Tensor, *, piece_bytes: int = 32 << 20) -> RowPieces | None:
    """Rows of a frozen ZeRO-3 matrix (an LM head), gathered a piece at a time.

    Returns a callable yielding ``(row ids, rows)`` pieces that together cover every row
    once (each piece's ids ascending: every rank's rows in order, ranks in order), or None
    where this does not apply (a trainable, unpartitioned or quantised weight, or partitions
    that split rows). Gathering the whole head instead would hold
    ``vocab x hidden`` on every rank at the loss (1 GB at Llama-3.2-1B's 128k vocab in
    fp32), which does not shrink with more ranks.

    NOTE: piece j is the same slice of every rank's partition, so one all-gather brings
    ``ranks x rows`` rows and every rank calls the same collectives in the same order.
    """
    if weight.requires_grad or not is_partitioned(weight) or len(weight.ds_shape) != 2:
        return None
    if getattr(weight.ds_tensor, "ds_quant_scale", None) is not None:
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    rows, cols = weight.ds_shape
    local = weight.ds_tensor.ds_numel
    if local % cols:
        return None
    import deepspeed.comm as dist

    group = weight.ds_process_group
    world = dist.get_world_size(group=group)
    local_rows = local // cols
    step = max(1, piece_bytes // (world * cols * weight.ds_tensor.element_size()))

    def pieces() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if weight.ds_status == ZeroParamStatus.AVAILABLE:  # already whole here (gathered elsewhere)
            yield from whole_row_pieces(weight.data, piece_bytes=piece_bytes)()
            return
        from deepspeed.accelerator import get_accelerator

        flat = weight.ds_tensor
        device = torch.device(get_accelerator().current_device_name())  # the partition may be offloaded
        for start in range(0, local_rows, step):
            count = min(step, local_rows - start)
            mine = flat.narrow(0, start * cols, count * cols).to(device)
            if world == 1:
                # NOTE: one rank's partition is the whole matrix: gathering would only copy it
                # (gloo: 25-60 ms per 32 MB piece on 2 CPU cores). The rows are only read.
                out = mine
            else:
                out = torch.empty(world * count * cols, dtype=flat.dtype, device=device)
                dist.all_gather_into_tensor(out, mine, group=group)
            ids = (torch.arange(world, device=device)[:, None] * local_rows + start + torch.arange(count, device=device)).flatten()
            block = out.view(world * count, cols)
            # The last rank's partition may end in padding; its last row id says so without a
            # look at the device (a host sync per piece).
            if (world - 1) * local_rows + start + count > rows:
                real = ids < rows
                ids, block = ids[real], block[real]
            yield ids, block

    return pieces
