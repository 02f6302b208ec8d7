"""Mamba2 (SSD) token mixer with the parameter names and shapes of transformers' BambaMixer.

Legend: b = batch, l = sequence length, h = heads, p = head dim, g = groups, n = state size.
"""

from __future__ import annotations

import math
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
from cald_scale.mixers.config import Mamba2Config
from cald_scale.mixers.ops import _cuda
from cald_scale.mixers.ops._threads import one_thread, scan_threads
from cald_scale.mixers.ops.conv import causal_conv1d, causal_conv1d_update
from cald_scale.mixers.ops.ssd import ssd_chunked, ssd_ref, ssd_step

__all__ = ["GatedRMSNorm", "Mamba2Mixer", "Mamba2State"]


@dataclass
class Mamba2State:
    """Decoding state of one Mamba2Mixer."""

    conv_state: torch.Tensor
    """(b, conv_dim, d_conv): the last d_conv inputs of the convolution, oldest first."""
    ssm_state: torch.Tensor
    """(b, h, p, n): the SSM state."""


def _ops(kernel: str) -> MixerOps:
    if kernel == "cuda":
        return MixerOps(_cuda.causal_conv1d, _cuda.causal_conv1d_update, _cuda.ssd_chunked, _cuda.ssd_step)
    return MixerOps(causal_conv1d, causal_conv1d_update, ssd_ref if kernel == "ref" else ssd_chunked, ssd_step)


def _gated_rms_norm(y, z, weight, group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """weight * rmsnorm_groups(y * silu(z)) in fp32, and the inverse RMS per group."""
    v = y.float() * F.silu(z.float())
    grouped = v.unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.mul_(rstd).flatten(-2).to(y.dtype), rstd


class _GatedRMSNormFn(torch.autograd.Function):
    """:func:`_gated_rms_norm`, saving only y, z and the inverse RMS for backward."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size: int, eps: float):
        out, rstd = _gated_rms_norm(y, z, weight, group_size, eps)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with one_thread():
            return _GatedRMSNormFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        y, z, weight, rstd = ctx.saved_tensors
        zf, yf = z.float(), y.float()
        sig = torch.sigmoid(zf)
        gate = zf * sig
        normed = (yf * gate).unflatten(-1, (-1, ctx.group_size)).mul_(rstd)  # (..., groups, size)
        grad_out = grad_out.float()
        grad_weight = (grad_out * normed.flatten(-2).to(y.dtype)).flatten(0, -2).sum(0)
        grad_normed = (grad_out * weight.float()).unflatten(-1, (-1, ctx.group_size))
        # d(v * rstd)/dv with rstd = mean(v^2)^-1/2 per group: rstd * (dn - n * mean(dn * n)).
        proj = (grad_normed * normed).mean(-1, keepdim=True)
        grad_v = grad_normed.sub_(normed.mul_(proj)).mul_(rstd).flatten(-2)
        grad_y = grad_v * gate
        # d silu(z)/dz = sig * (1 + z * (1 - sig)).
        grad_z = grad_v.mul_(yf).mul_(sig).mul_(1 + zf * (1 - sig))
        return grad_y.to(y.dtype), grad_z.to(z.dtype), grad_weight.to(weight.dtype), None, None


class GatedRMSNorm(nn.Module):
    """RMS norm of y * silu(z) over groups of ``group_size`` channels (BambaRMSNormGated)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or self.weight.requires_grad)
        with scan_threads(y, z, self.weight):
            if not recording:
                # NOTE: nothing to save for backward (inference, a decode step): the same math
                # without the autograd Function's bookkeeping, a tenth of a decode step's norm.
                return _gated_rms_norm(y, z, self.weight, self.group_size, self.eps)[0]
            return _GatedRMSNormFn.apply(y, z, self.weight, self.group_size, self.eps)


class Mamba2Mixer(SequenceMixer):
    """Mamba2 mixer: (b, l, hidden) -> (b, l, hidden), linear in l.

    The parameters are those of transformers' BambaMixer (in_proj, conv1d, dt_bias, A_log, D,
    norm.weight, out_proj), so a trained mixer exports to BambaForCausalLM as it is.
    """

    state_class = Mamba2State

    def __init__(self, config: Mamba2Config, hidden_size: int, layer_idx: int = 0, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ("silu", "swish"):
            raise ValueError(f"activation must be 'silu' (the only one the conv kernels offer), got {activation!r}")
        self.config = config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.activation = activation
        self.num_heads = config.resolved_num_heads(hidden_size)
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.d_state = config.d_state
        self.intermediate_size = config.inner_size(hidden_size)
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.d_state
        self._kernel = KernelResolver(config.kernel, "mamba2")

        self.in_proj = nn.Linear(
            hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.proj_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.d_conv,
            groups=self.conv_dim,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=config.proj_bias)
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True
        # NOTE: children initialise themselves in their own constructors; only this module's
        # own parameters are set here (so building under deepspeed.zero.Init, which takes each
        # child's parameters over as soon as it is built, works too).
        self._reset_own_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's Mamba2 init: dt log-uniform in [dt_min, dt_max], -A uniform in A_init_range, D = 1."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        self.norm.weight.fill_(1.0)
        self._reset_own_parameters()

    @torch.no_grad()
    def _reset_own_parameters(self) -> None:
        cfg = self.config
        init_dt_bias_(self.dt_bias, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*cfg.A_init_range).log())
        self.D.fill_(1.0)

    def kernel(self, device: torch.device) -> str:
        """The resolved scan implementation on ``device``."""
        return self._kernel(device)

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        low, high = self.config.time_step_limit
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if low <= 0 and math.isinf(high):
            return dt  # softplus is positive: the default limit (0, inf) never binds
        return dt.clamp(min=low, max=None if math.isinf(high) else high)

    def _split_xBC(self, xBC: torch.Tensor):
        gn = self.n_groups * self.d_state
        x, B, C = xBC.split([self.intermediate_size, gn, gn], dim=-1)
        return x, B.unflatten(-1, (self.n_groups, self.d_state)), C.unflatten(-1, (self.n_groups, self.d_state))

    def _mix(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, return_state: bool):
        batch, seqlen, _ = hidden_states.shape
        ops = _ops(self.kernel(hidden_states.device))
        mask = padding_mask(attention_mask, hidden_states)
        if mask is not None:
            hidden_states = hidden_states * mask

        # 1. Input projection, split into gate z, conv input xBC and time step dt.
        z, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        # 2. Causal depthwise convolution + activation over x, B, C; padded positions zeroed before
        # it (in_proj's bias, if any, must not reach the first real tokens' window) and after it.
        if mask is not None:
            xBC = xBC * mask
        xBC_in = xBC.transpose(1, 2)  # (b, conv_dim, l)
        xBC = ops.conv(xBC_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation).transpose(1, 2)
        if mask is not None:
            xBC = xBC * mask
        x, B, C = self._split_xBC(xBC)

        # 3. SSD scan with dt = clamp(softplus(dt + dt_bias)) and A = -exp(A_log).
        A = -torch.exp(self.A_log.float())
        result = ops.scan(
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            self._time_step(dt),
            A,
            B,
            C,
            self.D,
            chunk_size=self.config.chunk_size,
            return_final_state=return_state,
        )
        y, final_state = result if return_state else (result, None)

        # 4. Gated RMS norm and output projection.
        # NOTE: z is copied out of the in_proj output, else saving it for backward keeps all of it.
        out = self.out_proj(self.norm(y.flatten(-2).to(hidden_states.dtype), z.contiguous()))
        if not return_state:
            return out
        return out, Mamba2State(last_conv_inputs(xBC_in, self.config.d_conv), final_state)

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2State:
        """A zero decoding state (the state before the first token): the conv state in ``dtype``
        (the weights' by default), the SSM state in float32 at least, as prefill leaves it (a bf16
        state drifts: 3.5e-2 relative error after 1024 Mamba2 steps, 4e-7 in float32)."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        return Mamba2State(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.config.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.num_heads, self.head_dim, self.d_state, device=device, dtype=ssm_dtype),
        )

    def step(
        self, hidden_states: torch.Tensor, state: Mamba2State, *, inplace: bool = False, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Mamba2State]:
        """One decoding step: (b, 1, hidden) or (b, hidden) -> same shape, and the new state
        (``state`` itself, its tensors updated in place, if ``inplace``: what a cache wants).
        ``keep`` (b,): 0 where the token is padding, masked as :meth:`forward` masks it.

        Running it token by token gives what :meth:`forward` gives for the whole sequence.
        """
        squeeze = hidden_states.dim() == 3
        if squeeze and hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token, got sequence length {hidden_states.shape[1]}")
        h_t = hidden_states[:, 0] if squeeze else hidden_states
        ops = _ops(self.kernel(h_t.device))
        keep = None if keep is None else keep.to(h_t.dtype).unsqueeze(-1)
        if keep is not None:
            h_t = h_t * keep

        z, xBC, dt = self.in_proj(h_t).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if keep is not None:
            xBC = xBC * keep
        xBC, conv_state = ops.conv_update(
            xBC, state.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation, inplace=inplace
        )
        if keep is not None:
            xBC = xBC * keep
        x, B, C = self._split_xBC(xBC)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ops.step(
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            self._time_step(dt),
            A,
            B,
            C,
            self.D,
            state.ssm_state,
            inplace=inplace,
        )
        out = self.out_proj(self.norm(y.flatten(-2).to(h_t.dtype), z))
        return (out.unsqueeze(1) if squeeze else out), (state if inplace else Mamba2State(conv_state, ssm_state))
