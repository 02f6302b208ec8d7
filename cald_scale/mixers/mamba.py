"""Mamba (v1, selective scan) token mixer with the parameter names of mamba_ssm's Mamba.

Legend: b = batch, l = sequence length, d = d_inner channels, n = state size, r = dt_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cald_scale.mixers._common import (
    KernelResolver,
    MixerOps,
    SequenceMixer,
    init_dt_bias_,
    last_conv_inputs,
    padding_mask,
)
from cald_scale.mixers.config import MambaConfig
from cald_scale.mixers.ops import _cuda
from cald_scale.mixers.ops.conv import causal_conv1d, causal_conv1d_update
from cald_scale.mixers.ops.selective_scan import (
    selective_scan_cpu,
    selective_scan_ref,
    selective_state_update,
)

__all__ = ["MambaMixer", "MambaState"]


@dataclass
class MambaState:
    """Decoding state of one MambaMixer."""

    conv_state: torch.Tensor
    """(b, d, d_conv): the last d_conv inputs of the convolution, oldest first."""
    ssm_state: torch.Tensor
    """(b, d, n): the SSM state."""


def _ops(kernel: str) -> MixerOps:
    if kernel == "cuda":
        return MixerOps(_cuda.causal_conv1d, _cuda.causal_conv1d_update, _cuda.selective_scan, _cuda.selective_state_update)
    scan = selective_scan_ref if kernel == "ref" else selective_scan_cpu
    return MixerOps(causal_conv1d, causal_conv1d_update, scan, selective_state_update)


class TimeStepProjection(nn.Linear):
    """mamba_ssm's ``dt_proj``: a Linear with its own init (uniform weight, bias such that
    softplus(bias) is log-uniform in [dt_min, dt_max])."""

    def __init__(self, dt_rank: int, d_inner: int, config: MambaConfig) -> None:
        super().__init__(dt_rank, d_inner, bias=True)
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        config = getattr(self, "config", None)
        if config is None:  # called by nn.Linear.__init__, before the config is set
            return
        std = config.dt_scale * self.in_features**-0.5
        self.weight.uniform_(-std, std)
        init_dt_bias_(self.bias, config.dt_min, config.dt_max, config.dt_init_floor)


class MambaMixer(SequenceMixer):
    """Mamba mixer: (b, l, hidden) -> (b, l, hidden), linear in l.

    Kernels: "ref" is the sequential autograd loop, "chunked" the fast pure-PyTorch scan
    (``selective_scan_cpu``; there is no chunking in Mamba v1, the name is shared with Mamba2),
    "cuda" mamba_ssm's selective_scan_fn.
    """

    state_class = MambaState

    def __init__(self, config: MambaConfig, hidden_size: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.d_inner = config.expand * hidden_size
        self.d_state = config.d_state
        self.dt_rank = config.resolved_dt_rank(hidden_size)
        self._kernel = KernelResolver(config.kernel, "mamba")

        self.in_proj = nn.Linear(hidden_size, 2 * self.d_inner, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=config.d_conv,
            groups=self.d_inner,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = TimeStepProjection(self.dt_rank, self.d_inner, config)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=config.proj_bias)
        for param in (self.A_log, self.D):
            param._no_weight_decay = True
        # NOTE: children initialise themselves in their own constructors (dt_proj included);
        # only this module's own parameters are set here (so building under deepspeed.zero.Init,
        # which takes each child's parameters over as soon as it is built, works too).
        self._reset_own_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's Mamba init: S4D-real A = -(1..n), dt log-uniform in [dt_min, dt_max], D = 1."""
        for module in (self.in_proj, self.conv1d, self.x_proj, self.dt_proj, self.out_proj):
            module.reset_parameters()
        self._reset_own_parameters()

    @torch.no_grad()
    def _reset_own_parameters(self) -> None:
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(A.log().expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def kernel(self, device: torch.device) -> str:
        """The resolved scan implementation on ``device``."""
        return self._kernel(device)

    def _ssm_params(self, x: torch.Tensor):
        """x (..., d) -> dt (..., d) before bias/softplus, B and C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _mix(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, return_state: bool):
        ops = _ops(self.kernel(hidden_states.device))
        mask = padding_mask(attention_mask, hidden_states)
        if mask is not None:
            hidden_states = hidden_states * mask

        # 1. Input projection into the SSM input x and the gate z, channels first: (b, d, l).
        x_in, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)

        # 2. Causal depthwise convolution + SiLU; padded positions zeroed before it (in_proj's
        # bias, if any, must not reach the first real tokens' window) and after it.
        if mask is not None:
            x_in = x_in * mask.transpose(1, 2)
        x = ops.conv(x_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        if mask is not None:
            x = x * mask.transpose(1, 2)

        # 3. Input-dependent dt, B, C, then the selective scan (softplus(dt + bias) inside it).
        dt, B, C = self._ssm_params(x.transpose(1, 2))
        result = ops.scan(
            x,
            dt.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=return_state,
        )
        y, last_state = result if return_state else (result, None)

        # 4. Output projection.
        out = self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))
        if not return_state:
            return out
        return out, MambaState(last_conv_inputs(x_in, self.config.d_conv), last_state)

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MambaState:
        """A zero decoding state (the state before the first token): the conv state in ``dtype``
        (the weights' by default), the SSM state in float32 at least, as prefill leaves it (a bf16
        state drifts: 3.5e-2 relative error after 1024 Mamba2 steps, 4e-7 in float32)."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        return MambaState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.config.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    def step(
        self, hidden_states: torch.Tensor, state: MambaState, *, inplace: bool = False, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """One decoding step: (b, 1, hidden) or (b, hidden) -> same shape, and the new state
        (``state`` itself, its tensors updated in place, if ``inplace``). ``keep`` (b,): 0 where
        the token is padding, masked as :meth:`forward` masks it."""
        squeeze = hidden_states.dim() == 3
        if squeeze and hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token, got sequence length {hidden_states.shape[1]}")
        h_t = hidden_states[:, 0] if squeeze else hidden_states
        ops = _ops(self.kernel(h_t.device))
        keep = None if keep is None else keep.to(h_t.dtype).unsqueeze(-1)
        if keep is not None:
            h_t = h_t * keep

        x, z = self.in_proj(h_t).chunk(2, dim=-1)
        if keep is not None:
            x = x * keep
        x, conv_state = ops.conv_update(
            x, state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", inplace=inplace
        )
        if keep is not None:
            x = x * keep
        dt, B, C = self._ssm_params(x)
        y, ssm_state = ops.step(
            state.ssm_state,
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D.float(),
            z_t=z,
            dt_bias=self.dt_proj.bias.float(),
            dt_softplus=True,
            inplace=inplace,
        )
        out = self.out_proj(y.to(h_t.dtype))
        return (out.unsqueeze(1) if squeeze else out), (state if inplace else MambaState(conv_state, ssm_state))
