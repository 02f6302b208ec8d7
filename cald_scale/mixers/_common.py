"""Pieces shared by the Mamba mixers: kernel resolution per device, dt initialisation, masks."""

from __future__ import annotations

import math

import torch

from cald_scale.mixers.ops.dispatch import Kernel, resolve_kernel

__all__ = ["KernelResolver", "init_dt_bias_", "padding_mask"]


class KernelResolver:
    """Resolves a requested kernel once per device type and remembers the answer."""

    def __init__(self, requested: Kernel) -> None:
        self.requested = requested
        self._resolved: dict[str, str] = {}

    def __call__(self, device: torch.device) -> str:
        if device.type not in self._resolved:
            self._resolved[device.type] = resolve_kernel(self.requested, device)
        return self._resolved[device.type]


@torch.no_grad()
def init_dt_bias_(bias: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Set ``bias`` so that softplus(bias) is log-uniform in [dt_min, dt_max], floored (mamba_ssm's init)."""
    dt = torch.exp(
        torch.rand(bias.shape, dtype=torch.float32, device=bias.device) * (math.log(dt_max) - math.log(dt_min))
        + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    # Inverse of softplus: dt + log(1 - exp(-dt)).
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def padding_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A (b, l) 0/1 mask as a (b, l, 1) multiplier in the dtype of ``like``, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape != like.shape[:2]:
        raise ValueError(
            f"attention_mask must be (batch, seqlen) = {tuple(like.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(like.dtype).unsqueeze(-1)
