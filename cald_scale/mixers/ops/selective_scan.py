"""Mamba (v1) selective scan: sequential reference, a fast CPU autograd Function, one-token step.

Legend: b = batch, d = channels (d_inner), l = sequence length, n = state size.
Inputs follow mamba_ssm's ``selective_scan_fn``: u, delta, z are (b, d, l); A is (d, n);
B and C are (b, n, l); D and delta_bias are (d,).

The recurrence, per channel (A negative, delta > 0 after the optional softplus):
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        (n,)
    y_t = h_t . C_t + D * u_t,      out_t = y_t * silu(z_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cald_scale.mixers.ops._threads import one_thread

__all__ = ["selective_scan_ref", "selective_scan_cpu", "selective_state_update"]


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.promote_types(u.dtype, torch.float32)


def _discretize_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan, one step at a time with plain autograd (the test oracle).

    Returns out (b, d, l) in the dtype of u, and the last state (b, d, n) in the compute dtype
    (fp32, or fp64 for fp64 inputs) if asked.
    """
    out_dtype, f32 = u.dtype, _compute_dtype(u)
    u, delta, A, B, C = u.to(f32), delta.to(f32), A.to(f32), B.to(f32), C.to(f32)
    delta = _discretize_delta(delta, None if delta_bias is None else delta_bias.to(f32), delta_softplus)
    batch, dim, seqlen = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if seqlen else u.new_zeros(u.shape)
    if D is not None:
        y = y + D.to(f32)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f32))
    out = y.to(out_dtype)
    return (out, h) if return_last_state else out


# Time steps per block of the CPU scan: a block's (steps, b, n, d) buffers should stay in cache.
_BLOCK = 16


def _scan_layout(u, delta, B, C, delta_bias, delta_softplus):
    """Discretized inputs in the scan layout, all contiguous, in the compute dtype:
    delta_l, u_l, du_l = delta * u: (l, b, d); B_l, C_l: (l, b, n)."""
    f32 = _compute_dtype(u)
    delta = _discretize_delta(delta.to(f32), None if delta_bias is None else delta_bias.to(f32), delta_softplus)
    delta_l = delta.permute(2, 0, 1).contiguous()
    u_l = u.to(f32).permute(2, 0, 1).contiguous()
    B_l = B.to(f32).permute(2, 0, 1).contiguous()
    C_l = C.to(f32).permute(2, 0, 1).contiguous()
    return delta_l, u_l, delta_l * u_l, B_l, C_l


def _block_states(h, decay, h_start, delta_l, du_l, A_t, B_l):
    """Fill ``decay`` with exp(delta A) and ``h`` with the states of one block, given the state
    before it. Buffers are (m, b, n, d); the scan is one addcmul per step."""
    torch.mul(delta_l.unsqueeze(2), A_t, out=decay)
    decay.exp_()
    torch.mul(B_l.unsqueeze(-1), du_l.unsqueeze(2), out=h)
    h[0].addcmul_(decay[0], h_start)
    steps, decays = h.unbind(0), decay.unbind(0)
    for t in range(1, len(steps)):
        steps[t].addcmul_(decays[t], steps[t - 1])


def _contract_n(vec_n, mat, out):
    """out[..., d] = sum_n vec_n[..., n] mat[..., n, d] (a row vector times a matrix per batch)."""
    n, d = mat.shape[-2:]
    torch.bmm(vec_n.reshape(-1, 1, n), mat.reshape(-1, n, d), out=out.view(-1, 1, d))


def _contract_d(mat, vec_d, out, tmp):
    """out[..., n] = sum_d mat[..., n, d] vec_d[..., d], using ``tmp`` (like mat) as scratch.

    NOTE: a multiply and a sum beat bmm's matrix-vector product here (16 long rows per batch)."""
    torch.sum(torch.mul(mat, vec_d.unsqueeze(-2), out=tmp), dim=-1, out=out)


class _SelectiveScanCPU(torch.autograd.Function):
    """Blocked sequential scan with a hand-written backward.

    Layout inside: (l, b, n, d), so that every contraction over n or d is a row-vector-matrix
    or matrix-vector product with contiguous rows. The sequence is cut into blocks of
    ``_BLOCK`` steps whose decays and states live in reused, cache-sized buffers; the scan is
    one addcmul per step. Saved for backward: the inputs, the state entering each block
    ((l / _BLOCK, b, n, d)) and the pre-gate output, never the per-step (l, b, n, d) tensors,
    which backward rebuilds block by block. Nothing is divided by a decay, so any decay
    strength is stable in fp32. Forward and backward run on one intra-op thread (see
    ``_threads.one_thread``).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        with one_thread():
            return _SelectiveScanCPU._forward(
                ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
            )

    @staticmethod
    def backward(ctx, grad_out, grad_last=None):
        with one_thread():
            return _SelectiveScanCPU._backward(ctx, grad_out, grad_last)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        f32 = _compute_dtype(u)
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        A_t = A.to(f32).t().contiguous()
        delta_l, u_l, du_l, B_l, C_l = _scan_layout(u, delta, B, C, delta_bias, delta_softplus)
        nblocks = -(-seqlen // _BLOCK)
        starts = u_l.new_zeros(nblocks + 1, batch, dstate, dim)
        decay = u_l.new_empty(min(_BLOCK, seqlen), batch, dstate, dim)
        h = torch.empty_like(decay)
        y_l = u_l.new_empty(seqlen, batch, dim)
        for k in range(nblocks):
            s, e = k * _BLOCK, min((k + 1) * _BLOCK, seqlen)
            m = e - s
            _block_states(h[:m], decay[:m], starts[k], delta_l[s:e], du_l[s:e], A_t, B_l[s:e])
            _contract_n(C_l[s:e], h[:m], out=y_l[s:e])
            starts[k + 1].copy_(h[m - 1])
        del decay, h
        if D is not None:
            y_l.addcmul_(u_l, D.to(f32))
        y = y_l.permute(1, 2, 0)  # (b, d, l), a view
        out = y * F.silu(z.to(f32)) if z is not None else y
        # NOTE: z in the scan layout is a compact copy; z itself is often a view into a bigger
        # projection output, which saving it would keep alive until backward.
        z_l = z.permute(2, 0, 1).contiguous() if z is not None else None
        ctx.save_for_backward(u, delta, A, B, C, D, z_l, delta_bias, starts, y_l if z is not None else None)
        ctx.delta_softplus = delta_softplus
        out = out.to(u.dtype)
        if return_last_state:
            return out, starts[nblocks].transpose(1, 2).contiguous()
        return out

    @staticmethod
    def _backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z_l, delta_bias, starts, y_l = ctx.saved_tensors
        f32 = _compute_dtype(u)
        seqlen = u.shape[-1]
        A_t = A.to(f32).t().contiguous()
        delta_l, u_l, du_l, B_l, C_l = _scan_layout(u, delta, B, C, delta_bias, ctx.delta_softplus)
        gy_l = grad_out.to(f32).permute(2, 0, 1)

        # 1. Through the gate out = y * silu(z), elementwise in the (l, b, d) layout.
        grad_z = None
        if z_l is not None:
            z_dtype = z_l.dtype
            z_l = z_l.to(f32)
            sig = torch.sigmoid(z_l)
            grad_z = (gy_l * y_l * sig * (1 + z_l * (1 - sig))).permute(1, 2, 0)
            gy_l = gy_l * z_l * sig
        gy_l = gy_l.contiguous()

        # 2. Skip term y += D u.
        grad_D = (gy_l * u_l).sum((0, 1)) if D is not None else None
        grad_u_l = gy_l * D.to(f32) if D is not None else torch.zeros_like(u_l)

        # 3. Blocks in reverse: rebuild decays and states, reverse scan of g_t = dL/dh_t:
        #    g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}; then the gradients of the block.
        grad_C_l = torch.empty_like(C_l)
        grad_B_l = torch.empty_like(B_l)
        grad_du = torch.empty_like(u_l)
        grad_delta_l = torch.empty_like(u_l)
        grad_A_t = torch.zeros_like(A_t)
        decay = u_l.new_empty((min(_BLOCK, seqlen),) + starts.shape[1:])
        h, g, tmp = torch.empty_like(decay), torch.empty_like(decay), torch.empty_like(decay)
        carry_decay = carry_g = None  # exp(delta A) and g at the first step of the block after
        nblocks = starts.shape[0] - 1
        for k in range(nblocks - 1, -1, -1):
            s, e = k * _BLOCK, min((k + 1) * _BLOCK, seqlen)
            m = e - s
            dk, hk, gk, tk = decay[:m], h[:m], g[:m], tmp[:m]
            _block_states(hk, dk, starts[k], delta_l[s:e], du_l[s:e], A_t, B_l[s:e])
            _contract_d(hk, gy_l[s:e], out=grad_C_l[s:e], tmp=tk)
            torch.mul(C_l[s:e].unsqueeze(-1), gy_l[s:e].unsqueeze(2), out=gk)
            if carry_g is not None:
                gk[m - 1].addcmul_(carry_decay, carry_g)
            elif grad_last is not None:
                gk[m - 1] += grad_last.to(f32).transpose(1, 2)
            steps, decays = gk.unbind(0), dk.unbind(0)
            for t in range(m - 2, -1, -1):
                steps[t].addcmul_(decays[t + 1], steps[t + 1])
            carry_decay, carry_g = dk[0].clone(), gk[0].clone()

            # Input term delta u B: dL/d(delta u) = B . g, dL/dB = sum_d g delta u.
            _contract_n(B_l[s:e], gk, out=grad_du[s:e])
            _contract_d(gk, du_l[s:e], out=grad_B_l[s:e], tmp=tk)

            # Decay term: q = g_t h_{t-1} exp(delta_t A), built in place over the decays;
            # dL/ddelta += sum_n q A, dL/dA += sum_{l, b} q delta.
            dk[0].mul_(starts[k])
            dk[1:].mul_(hk[:-1])
            dk.mul_(gk)
            torch.mul(dk, A_t, out=tk)
            torch.sum(tk, dim=2, out=grad_delta_l[s:e])
            dk.mul_(delta_l[s:e].unsqueeze(2))
            grad_A_t += dk.sum((0, 1))

        # 4. Chain delta u to delta and u, then delta = softplus(delta_raw + delta_bias) to its inputs.
        grad_u_l.addcmul_(grad_du, delta_l)
        grad_delta_l.addcmul_(grad_du, u_l)
        grad_delta = grad_delta_l.permute(1, 2, 0)
        if ctx.delta_softplus:
            pre = delta.to(f32)
            if delta_bias is not None:
                pre = pre + delta_bias.to(f32)[:, None]
            grad_delta = grad_delta * torch.sigmoid(pre)
        grad_delta_bias = grad_delta.sum((0, 2)) if delta_bias is not None else None

        def _cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (
            _cast(grad_u_l.permute(1, 2, 0), u),
            _cast(grad_delta, delta),
            _cast(grad_A_t.t(), A),
            _cast(grad_B_l.permute(1, 2, 0), B),
            _cast(grad_C_l.permute(1, 2, 0), C),
            _cast(grad_D, D),
            None if grad_z is None else grad_z.to(z_dtype),
            _cast(grad_delta_bias, delta_bias),
            None,
            None,
        )


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan tuned for CPU (works on any device); same signature and results as
    :func:`selective_scan_ref`, with a hand-written backward."""
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(
    state: torch.Tensor,
    x_t: torch.Tensor,
    dt_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None = None,
    z_t: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective scan.

    Args:
        state: (b, d, n); updated in place if ``inplace`` (as mamba_ssm's kernel does), else
            not modified. x_t, dt_t, z_t: (b, d). A: (d, n). B_t, C_t: (b, n).
        D, dt_bias: (d,) or None. dt_softplus: apply softplus to dt_t + dt_bias.

    Returns:
        y_t: (b, d) in the dtype of x_t, and the new state (b, d, n) in the dtype of ``state``
        (``state`` itself if ``inplace``).
    """
    f32 = _compute_dtype(x_t)
    x, dt = x_t.to(f32), dt_t.to(f32)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f32)
    if dt_softplus:
        dt = F.softplus(dt)
    new_state = torch.exp(dt.unsqueeze(-1) * A.to(f32)) * state.to(f32)
    new_state = new_state + (dt * x).unsqueeze(-1) * B_t.to(f32).unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", new_state, C_t.to(f32))
    if D is not None:
        y = y + D.to(f32) * x
    if z_t is not None:
        y = y * F.silu(z_t.to(f32))
    return y.to(x_t.dtype), state.copy_(new_state) if inplace else new_state.to(state.dtype)
