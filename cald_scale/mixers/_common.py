"""Pieces shared by the Mamba mixers: kernel resolution per device, dt initialisation, masks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cald_scale.mixers.ops.dispatch import Kernel, resolve_kernel

__all__ = ["KernelResolver", "MixerOps", "SequenceMixer", "init_dt_bias_", "last_conv_inputs", "padding_mask"]


class MixerOps(NamedTuple):
    """The ops one resolved kernel gives a mixer: conv, conv step, scan, scan step."""

    conv: Callable
    conv_update: Callable
    scan: Callable
    step: Callable


class SequenceMixer(nn.Module):
    """The contract every mixer keeps: ``forward`` mixes a whole (b, l, hidden) sequence under
    an optional (b, l) padding mask; subclasses implement ``_mix``.

    Causal mixers (``causal = True``: Mamba, Mamba2) can also decode: ``prefill`` (forward
    plus the decoding state after the last token) and a one-token ``step``; they implement
    ``allocate_state`` and ``step`` and name their state dataclass (fields ``conv_state`` and
    ``ssm_state``) as ``state_class``. Bidirectional mixers (``causal = False``: Linformer,
    BiMamba2, for encoders) let every token see the whole sequence, so they have no decoding
    state; the causal LM path must refuse them.
    """

    causal: bool = True
    """Whether token t's output depends on tokens <= t only (what generation needs)."""
    state_class: type

    def _mix(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, return_state: bool):
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mix a whole sequence.

        Args:
            hidden_states: (b, l, hidden).
            attention_mask: optional (b, l) of 1 (token) / 0 (padding); padded positions feed
                nothing into any real token's output.

        Returns:
            (b, l, out_width): out_width is hidden for the Mamba mixers.
        """
        return self._mix(hidden_states, attention_mask, return_state=False)

    def prefill(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """:meth:`forward`, also returning the decoding state after the last token (causal mixers)."""
        self._require_causal("prefill")
        return self._mix(hidden_states, attention_mask, return_state=True)

    def step(self, hidden_states: torch.Tensor, state, *, inplace: bool = False, keep: torch.Tensor | None = None):
        """One decoding step from ``state`` (causal mixers implement it); ``inplace`` updates
        the state's tensors where they are and returns ``state``. ``keep`` (b,): 0 for a row
        whose token is padding, which the step then treats as :meth:`prefill` treats a pad."""
        self._require_causal("step")
        raise NotImplementedError

    def _require_causal(self, what: str) -> None:
        if not self.causal:
            raise TypeError(
                f"{type(self).__name__} is bidirectional (causal = False): it has no decoding state, "
                f"so no {what}; use it in encoders only"
            )


def last_conv_inputs(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` convolution inputs of x (b, d, l), left-padded with zeros: a conv state."""
    seqlen = x.shape[-1]
    return (F.pad(x, (width - seqlen, 0)) if seqlen < width else x[..., -width:]).contiguous()


class KernelResolver:
    """Resolves a requested kernel once per device type and remembers the answer."""

    def __init__(self, requested: Kernel, kind: str | None = None) -> None:
        self.requested = requested
        self.kind = kind
        self._resolved: dict[str, str] = {}

    def __call__(self, device: torch.device) -> str:
        if device.type not in self._resolved:
            self._resolved[device.type] = resolve_kernel(self.requested, device, self.kind)
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
