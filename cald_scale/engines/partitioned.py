"""ZeRO-3 partitioned construction: build modules under ``deepspeed.zero.Init`` and write
weights straight into each rank's partition, with no communication and no full copy.

``assign`` reuses DeepSpeed's own partitioning (``param.partition(has_been_updated=True)``
copies this rank's slice of ``param.data`` into its partition and frees the rest), so the
layout is DeepSpeed's by construction. Every rank reads the same full tensor from the
(memory-mapped) checkpoint and keeps its own slice: the peak is one tensor, not one model.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..conversion.placement import PLAIN, Placement

__all__ = ["zero3_placement", "placement_for", "is_partitioned", "assign_partitioned", "gather_partitioned", "full_shape"]


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


@torch.no_grad()
def assign_partitioned(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full ``value`` into ``target``, keeping only this rank's partition when it is a ZeRO-3 parameter."""
    if not is_partitioned(target):
        target.copy_(value)
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if tuple(value.shape) != tuple(target.ds_shape):
        raise ValueError(f"cannot assign a {tuple(value.shape)} tensor to a parameter of shape {tuple(target.ds_shape)}")
    if target.ds_status == ZeroParamStatus.INFLIGHT:
        raise RuntimeError(f"parameter {target.ds_id} is being gathered; cannot assign it now")
    dtype, device = target.ds_tensor.dtype, target.ds_tensor.device
    if target.ds_status == ZeroParamStatus.AVAILABLE:
        target.data.copy_(value)  # gathered (or persistent): its full data is live
    else:
        target.data = value.to(device=device, dtype=dtype).reshape(target.ds_shape)
        target.ds_status = ZeroParamStatus.AVAILABLE
    if not getattr(target, "ds_persist", False):
        # NOTE: has_been_updated makes DeepSpeed copy this rank's slice of .data into its partition.
        target.partition(has_been_updated=True)


def gather_partitioned(params: Sequence[torch.Tensor]):
    """Full values of ZeRO-3 parameters for reading (released on exit; nothing is written back)."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=None)


def zero3_placement(ds_config: dict) -> Placement:
    """Partitioned placement for a resolved ZeRO-3 ds_config (its dtype and offload settings apply)."""
    import deepspeed

    # NOTE: zero.Init patches tensor construction; torch._dynamo must be imported before it,
    # or a lazy import inside (transformers' masking utils) fails on the patched constructor.
    import torch._dynamo  # noqa: F401

    # Buffer sizes still "auto" (sized from the built model later) mean nothing to zero.Init.
    ds_config = {**ds_config, "zero_optimization": {k: v for k, v in ds_config["zero_optimization"].items() if v != "auto"}}

    def construct():
        # NOTE: no dtype argument: deepspeed 0.19 ignores it on CPU (bf16 wins); the config's
        # bf16/fp16 flags decide, fp32 when both are off.
        return deepspeed.zero.Init(config_dict_or_path=ds_config)

    return Placement(name="zero3", construct=construct, assign=assign_partitioned, gather=gather_partitioned, shape_of=full_shape)


def placement_for(ds_config: dict | None) -> Placement:
    """ZeRO-3 placement when the config asks for stage 3 and a process group exists, else plain."""
    import torch.distributed as dist

    stage = (ds_config or {}).get("zero_optimization", {}).get("stage")
    if stage == 3 and dist.is_available() and dist.is_initialized():
        return zero3_placement(ds_config)
    return PLAIN
