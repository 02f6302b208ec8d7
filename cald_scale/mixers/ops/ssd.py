"""Mamba2 state-space dual (SSD) scan: sequential reference, chunked matmul form, one-token step.

Legend: b = batch, l = sequence length, h = heads, p = head dim, g = B/C groups,
r = heads per group (h = g * r), n = state size, c = chunks, q = chunk length,
t and s = target and source positions inside a chunk.

The recurrence, per head (A is a negative scalar per head, dt > 0):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t      (p, n)
    y_t     = state_t @ C_t + D * x_t                                   (p,)
Head i reads group i // r of B and C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cald_scale.mixers.ops._threads import one_thread, outer_threads, scan_threads

__all__ = ["ssd_ref", "ssd_chunked", "ssd_step"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, fp64 kept for fp64 inputs (gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    batch, seqlen, nheads, _ = x.shape
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(
            f"dt must be {(batch, seqlen, nheads)} and A {(nheads,)}, got {tuple(dt.shape)}, {tuple(A.shape)}"
        )
    if B.shape != C.shape or B.shape[:2] != (batch, seqlen) or B.dim() != 4:
        raise ValueError(
            f"B and C must be (b, l, g, n) with b, l = {batch}, {seqlen}, got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    if nheads % B.shape[2]:
        raise ValueError(f"n_groups ({B.shape[2]}) must divide the number of heads ({nheads})")


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD scan, one time step at a time (the test oracle). Computes in fp32 (fp64 stays fp64).

    Args:
        x: (b, l, h, p). dt: (b, l, h), positive (already softplus'ed and clamped).
        A: (h,), negative. B, C: (b, l, g, n). D: (h,) or None.
        chunk_size: unused; accepted so every SSD path has the same signature.
        initial_state: (b, h, p, n) or None (zeros).
        return_final_state: also return the state after the last token.

    Returns:
        y: (b, l, h, p) in the dtype of x, and the final state (b, h, p, n) in the compute dtype if asked.
    """
    del chunk_size
    _check_shapes(x, dt, A, B, C)
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    f32 = _compute_dtype(x)
    xf, dtf, Af = x.to(f32), dt.to(f32), A.to(f32)
    # NOTE: expanding B and C to one copy per head keeps the oracle obviously correct.
    Bh = B.to(f32).repeat_interleave(heads_per_group, dim=2)
    Ch = C.to(f32).repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        state = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=f32)
    else:
        state = initial_state.to(f32)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        update = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + update
        y_t = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y_t = y_t + D.to(f32)[:, None] * xf[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(x.dtype) if seqlen else x.new_zeros(x.shape)
    return (y, state) if return_final_state else y


def _segsum_exp(cs: torch.Tensor) -> torch.Tensor:
    """exp(cs[..., t] - cs[..., s]) for s <= t, 0 above the diagonal: (..., q) -> (..., q, q).

    NOTE: the difference is masked to -inf *before* exp, so exp only ever sees sums of
    non-positive log-decays; above the diagonal the raw difference is positive and could overflow.
    """
    q = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    # NOTE: adding a 0 / -inf matrix is ~2.5x faster on CPU than a broadcast masked_fill_.
    above = torch.full((q, q), float("-inf"), dtype=cs.dtype, device=cs.device).triu_(1)
    return diff.add_(above).exp_()


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul with all intra-op threads (the rest of the SSD runs on one, see one_thread)."""
    with outer_threads():
        return torch.matmul(a, b)


def _rowcol_grad(grad_decay: torch.Tensor) -> torch.Tensor:
    """Gradient on cs of exp(cs[t] - cs[s]) given G = dL/dexp(..) * exp(..): sum_s G[t, s] - sum_t G[t, s]."""
    return grad_decay.sum(-1) - grad_decay.sum(-2)


class _Chunks:
    """Chunked layouts of the SSD inputs (see the legend at the top of the file).

    X: (b, c, g, r, q, p); dt: (b, c, g, r, q); B, C: (b, c, g, 1, q, n); cs: the cumulative
    log-decay inside each chunk, (b, c, g, r, q), non-increasing.
    """

    def __init__(self, x, dt, A, B, C, chunk_size):
        batch, seqlen, nheads, headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        self.heads_per_group = nheads // self.ngroups
        self.batch, self.seqlen, self.nheads, self.headdim = batch, seqlen, nheads, headdim
        self.q = q = max(1, min(chunk_size, seqlen))
        self.pad = pad = (-seqlen) % q
        self.nchunks = (seqlen + pad) // q
        self.f32 = f32 = _compute_dtype(x)
        self.X = self.to_chunks(x.to(f32), headdim)
        self.dt = self.to_chunks(dt.to(f32))
        self.A = A.to(f32).view(self.ngroups, self.heads_per_group, 1)
        self.B = self.groups_to_chunks(B.to(f32))
        self.C = self.groups_to_chunks(C.to(f32))
        self.cs = torch.cumsum(self.dt * self.A, dim=-1)

    def to_chunks(self, t: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """(b, l, h[, p]) -> (b, c, g, r, q[, p]), zero-padded, contiguous."""
        if self.pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, self.pad))
        shape = (self.batch, self.nchunks, self.q, self.ngroups, self.heads_per_group)
        if last is None:
            return t.reshape(shape).permute(0, 1, 3, 4, 2).contiguous()
        return t.reshape(shape + (last,)).permute(0, 1, 3, 4, 2, 5).contiguous()

    def from_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, g, r, q[, p]) -> (b, l, h[, p]), padding dropped."""
        if t.dim() == 5:
            t = t.permute(0, 1, 4, 2, 3).reshape(self.batch, -1, self.nheads)
        else:
            t = t.permute(0, 1, 4, 2, 3, 5).reshape(self.batch, -1, self.nheads, t.shape[-1])
        return t[:, : self.seqlen]

    def groups_to_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(b, l, g, n) -> (b, c, g, 1, q, n), zero-padded, contiguous."""
        if self.pad:
            t = F.pad(t, (0, 0, 0, 0, 0, self.pad))
        t = t.reshape(self.batch, self.nchunks, self.q, self.ngroups, self.dstate)
        return t.transpose(2, 3).contiguous().unsqueeze(3)

    def groups_from_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, g, 1, q, n) -> (b, l, g, n), padding dropped."""
        t = t.squeeze(3).transpose(2, 3).reshape(self.batch, -1, self.ngroups, self.dstate)
        return t[:, : self.seqlen]

    def chunk_decay(self) -> torch.Tensor:
        """exp of the summed log-decay of chunks j..i-1, (b, g, r, c+1, c+1), lower triangular."""
        totals = F.pad(self.cs[..., -1], (0, 0, 0, 0, 1, 0))  # (b, c+1, g, r); row 0 is 0
        return _segsum_exp(torch.cumsum(totals, dim=1).permute(0, 2, 3, 1))

    def state_view(self, t: torch.Tensor) -> torch.Tensor:
        """(b, h, p, n) -> (b, g, r, 1, p*n)."""
        return t.reshape(self.batch, self.ngroups, self.heads_per_group, 1, -1)


# From this many chunks on, the states entering the chunks are a sequential scan (O(c p n))
# rather than one (c+1) x (c+1) decay matmul (O(c^2 p n)): at 32k tokens and chunk 64 the
# matmul costs 4x the rest of the SSD.
_SCAN_CHUNKS_FROM = 64


def _scan_chunk_states(totals: torch.Tensor, states_in: torch.Tensor) -> torch.Tensor:
    """s_0 = in_0, s_i = exp(T_{i-1}) s_{i-1} + in_i: what ``chunk_decay() @ states_in`` gives.

    totals: (b, g, r, c), each chunk's summed log-decay. states_in: (b, g, r, c+1, p*n).
    """
    decay = torch.exp(totals).unsqueeze(-1)
    states = [states_in[:, :, :, 0]]
    for i in range(1, states_in.shape[3]):
        states.append(torch.addcmul(states_in[:, :, :, i], states[-1], decay[:, :, :, i - 1]))
    return torch.stack(states, dim=3)


def _ssd_forward(k: _Chunks, initial_state):
    """Chunked SSD forward. Returns Y (chunk layout, without D), the states entering each chunk
    (b, c, g, r, p, n), the final state (b, h, p, n) and the masked decay-weighted scores M."""
    b, c, g, r, p, n = k.batch, k.nchunks, k.ngroups, k.heads_per_group, k.headdim, k.dstate
    Xd = k.X * k.dt.unsqueeze(-1)

    # 1. Intra-chunk (diagonal blocks): y_t += sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s.
    M = _matmul(k.C, k.B.transpose(-1, -2)) * _segsum_exp(k.cs)  # (b, c, g, r, q, q)
    Y = _matmul(M, Xd)

    # 2. State each chunk adds by its end, from a zero start: sum_s exp(cs_end - cs_s) dt_s x_s B_s^T.
    to_end = torch.exp(k.cs[..., -1:] - k.cs)
    chunk_states = _matmul((Xd * to_end.unsqueeze(-1)).transpose(-1, -2), k.B)  # (b, c, g, r, p, n)

    # 3. Inter-chunk recurrence, vectorised: the state entering chunk i is
    #    sum_{j<=i} exp(T_j + ... + T_{i-1}) S_{j-1}, with S_{-1} the initial state, T the chunk totals.
    first = k.X.new_zeros(b, g, r, 1, p * n) if initial_state is None else k.state_view(initial_state.to(k.f32))
    states_in = torch.cat([first, chunk_states.permute(0, 2, 3, 1, 4, 5).reshape(b, g, r, c, p * n)], dim=3)
    if c < _SCAN_CHUNKS_FROM:
        states = _matmul(k.chunk_decay(), states_in)  # (b, g, r, c+1, p*n)
    else:
        states = _scan_chunk_states(k.cs[..., -1].permute(0, 2, 3, 1), states_in)
    final_state = states[:, :, :, -1].reshape(b, g * r, p, n)
    H = states[:, :, :, :-1].reshape(b, g, r, c, p, n).permute(0, 3, 1, 2, 4, 5).contiguous()

    # 4. Inter-chunk output (off-diagonal blocks): y_t += exp(cs_t) C_t . state entering the chunk.
    Y.addcmul_(_matmul(k.C, H.transpose(-1, -2)), torch.exp(k.cs).unsqueeze(-1))
    return Y, H, final_state, M


class _SSDChunked(torch.autograd.Function):
    """Chunked SSD with a hand-written backward.

    Saved for backward: the inputs, the states entering each chunk and the (q, q) scores of
    each chunk; everything else is rebuilt elementwise.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        k = _Chunks(x, dt, A, B, C, chunk_size)
        Y, H, final_state, M = _ssd_forward(k, initial_state)
        y = k.from_chunks(Y)
        if D is not None:
            y = y + D.to(k.f32)[:, None] * x.to(k.f32)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, H, M)
        ctx.chunk_size = chunk_size
        return y.to(x.dtype), final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_final):
        with one_thread():
            return _SSDChunked._backward(ctx, grad_y, grad_final)

    @staticmethod
    def _backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, D, initial_state, H, M = ctx.saved_tensors
        k = _Chunks(x, dt, A, B, C, ctx.chunk_size)
        b, c, g, r, p, n = k.batch, k.nchunks, k.ngroups, k.heads_per_group, k.headdim, k.dstate
        grad_y = grad_y.to(k.f32)
        dY = k.to_chunks(grad_y, p)
        Xd = k.X * k.dt.unsqueeze(-1)
        exp_cs = torch.exp(k.cs)
        to_end = torch.exp(k.cs[..., -1:] - k.cs)

        # 4. Inter-chunk output Y_off = exp(cs) (C H^T).
        dY_off = dY * exp_cs.unsqueeze(-1)
        W = _matmul(dY_off, H)  # (b, c, g, r, q, n) = dL/d(C) from this term, per head
        dC = W.sum(3, keepdim=True)
        dcs = (W * k.C).sum(-1)  # exp(cs) factor already inside dY_off
        dH = _matmul(dY_off.transpose(-1, -2), k.C)  # (b, c, g, r, p, n)

        # 3. Inter-chunk recurrence: G_j = sum_{i>=j} decay[i, j] dstates_i is the total gradient
        #    of the state entering chunk j; chunk j-1's own state and the initial state get G_j.
        dstates = dH.permute(0, 2, 3, 1, 4, 5).reshape(b, g, r, c, p * n)
        if grad_final is not None:
            dstates = torch.cat([dstates, k.state_view(grad_final.to(k.f32))], dim=3)
        else:
            dstates = F.pad(dstates, (0, 0, 0, 1))
        G = _matmul(k.chunk_decay().transpose(-1, -2), dstates)  # (b, g, r, c+1, p*n)
        grad_initial = G[:, :, :, 0].reshape(b, g * r, p, n) if initial_state is not None else None
        d_chunk_states = G[:, :, :, 1:].reshape(b, g, r, c, p, n).permute(0, 3, 1, 2, 4, 5)
        # State entering chunk j+1 = exp(T_j) H_j + S_j: dT_j = exp(T_j) <G_{j+1}, H_j>.
        H_flat = H.permute(0, 2, 3, 1, 4, 5).reshape(b, g, r, c, p * n)
        dT = (G[:, :, :, 1:] * H_flat).sum(-1) * torch.exp(k.cs[..., -1]).permute(0, 2, 3, 1)
        dcs[..., -1] += dT.permute(0, 3, 1, 2)

        # 2. Chunk states S = (Xd exp(cs_end - cs))^T B.
        Xe = Xd * to_end.unsqueeze(-1)
        dXe = _matmul(k.B, d_chunk_states.transpose(-1, -2))  # (b, c, g, r, q, p)
        dB = _matmul(Xe, d_chunk_states).sum(3, keepdim=True)
        dXd = dXe * to_end.unsqueeze(-1)
        d_to_end = (dXe * Xe).sum(-1)  # already times exp(cs_end - cs)
        dcs -= d_to_end
        dcs[..., -1] += d_to_end.sum(-1)

        # 1. Intra-chunk Y_diag = M Xd with M = (C B^T) * exp(segsum(cs)).
        dM = _matmul(dY, Xd.transpose(-1, -2))  # (b, c, g, r, q, q)
        dXd += _matmul(M.transpose(-1, -2), dY)
        dcs += _rowcol_grad(dM * M)
        dS = (dM * _segsum_exp(k.cs)).sum(3, keepdim=True)  # (b, c, g, 1, q, q)
        dC += _matmul(dS, k.B)
        dB += _matmul(dS.transpose(-1, -2), k.C)

        # 0. Discretisation: Xd = dt x, cs = cumsum(dt A).
        dX = dXd * k.dt.unsqueeze(-1)
        ddt = (dXd * k.X).sum(-1)
        da = dcs.flip(-1).cumsum(-1).flip(-1)
        ddt += da * k.A
        dA = (da * k.dt).sum((0, 1, 4)).reshape(-1)

        grad_x = k.from_chunks(dX)
        grad_D = None
        if D is not None:
            grad_x = grad_x + D.to(k.f32)[:, None] * grad_y
            grad_D = (grad_y * x.to(k.f32)).sum((0, 1, 3))

        def _cast(grad, like):
            return None if grad is None or like is None else grad.to(like.dtype)

        return (
            _cast(grad_x, x),
            _cast(k.from_chunks(ddt), dt),
            _cast(dA, A),
            _cast(k.groups_from_chunks(dB), B),
            _cast(k.groups_from_chunks(dC), C),
            _cast(grad_D, D),
            _cast(grad_initial, initial_state),
            None,
        )


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD in pure PyTorch: quadratic inside chunks, a state recurrence between them.

    Same arguments and results as :func:`ssd_ref`; differentiable (a hand-written backward
    that keeps only the inputs, the chunk-boundary states and the per-chunk scores). Any
    sequence length works (the tail is padded with dt = 0, which leaves the state unchanged).
    Stable in fp32 for any decay: only differences of cumulative log-decays over causal spans
    (all <= 0) are exponentiated.
    """
    _check_shapes(x, dt, A, B, C)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, initial_state)
    )
    segment = max(_SEGMENT_TOKENS // chunk_size, 1) * chunk_size
    with scan_threads(x, dt, A, B, C, D, initial_state):
        if needs_grad or x.shape[1] <= 2 * segment:
            y, final_state = _SSDChunked.apply(x, dt, A, B, C, D, initial_state, chunk_size)
        else:
            y, final_state = _ssd_segments(x, dt, A, B, C, D, initial_state, chunk_size, segment)
    return (y, final_state) if return_final_state else y


# Inference on long sequences runs in segments of this many tokens, each starting from the
# state the previous one ended in: the same result, with a working set that stays in cache
# (32k tokens at SmolLM2's geometry: 0.74 -> 0.26 s per layer on 2 CPU cores).
_SEGMENT_TOKENS = 2048


def _ssd_segments(x, dt, A, B, C, D, initial_state, chunk_size: int, segment: int):
    outs, state = [], initial_state
    for start in range(0, x.shape[1], segment):
        part = slice(start, start + segment)
        y, state = _SSDChunked.apply(x[:, part], dt[:, part], A, B[:, part], C[:, part], D, state, chunk_size)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def ssd_step(
    x_t: torch.Tensor,
    dt_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the SSD recurrence.

    Args:
        x_t: (b, h, p). dt_t: (b, h), positive. A: (h,). B_t, C_t: (b, g, n). D: (h,) or None.
        state: (b, h, p, n); updated in place if ``inplace`` (as mamba_ssm's
            selective_state_update does), else not modified.

    Returns:
        y_t: (b, h, p) in the dtype of x_t, and the new state (b, h, p, n) in the dtype of
        ``state`` (``state`` itself if ``inplace``).
    """
    batch, heads, head_dim = x_t.shape
    groups, d_state = B_t.shape[1:]
    # NOTE: checked before anything is written: a bad call must leave a cache's state as it was.
    if (
        state.shape != (batch, heads, head_dim, d_state)
        or dt_t.shape != (batch, heads)
        or A.shape != (heads,)
        or B_t.shape != C_t.shape
        or B_t.shape[0] != batch
        or heads % groups
    ):
        raise ValueError(
            f"ssd_step: x_t {tuple(x_t.shape)} (b, h, p) needs dt_t (b, h), A (h,), B_t and C_t (b, g, n) with g dividing "
            f"h, and state (b, h, p, n); got dt_t {tuple(dt_t.shape)}, A {tuple(A.shape)}, B_t {tuple(B_t.shape)}, "
            f"C_t {tuple(C_t.shape)}, state {tuple(state.shape)}"
        )
    f32 = _compute_dtype(x_t)
    xf, dtf = x_t.to(f32), dt_t.to(f32)
    # (b, g, n) -> (b, h, n): a view when every head has its own group (as converted students do).
    Bh, Ch = (
        t.to(f32).unsqueeze(2).expand(batch, groups, heads // groups, d_state).reshape(batch, heads, d_state)
        for t in (B_t, C_t)
    )
    decay = torch.exp(dtf * A.to(f32))[..., None, None]
    # NOTE: the state is scaled, then the outer product (dt x) B added into it (a broadcast
    # addcmul_: no outer-product temporary), in place when asked: a CPU decode step at batch 8
    # spent a third of its time on state-sized temporaries and copies.
    in_place = inplace and state.dtype == f32 and state.is_contiguous()
    new_state = state.mul_(decay) if in_place else decay * state.to(f32)
    new_state.addcmul_((dtf[..., None] * xf)[..., None], Bh[:, :, None, :])
    # y = state C as C^T state^T, one row per head: torch's batched matrix-vector product runs
    # several times slower on CPU with the vector on the right (N = 1) than on the left.
    flat = new_state.view(batch * heads, head_dim, d_state)
    y = torch.bmm(Ch.reshape(batch * heads, 1, d_state), flat.transpose(1, 2)).view(batch, heads, head_dim)
    if D is not None:
        y.addcmul_(D.to(f32)[:, None], xf)
    # (in place, new_state is state already: copying it onto itself does nothing)
    return y.to(x_t.dtype), state.copy_(new_state) if inplace else new_state.to(state.dtype)
