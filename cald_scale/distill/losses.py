"""The CALD objective: a_ce * task CE + a_layer * mean layer MSE(LN(s), LN(t)) + a_kl * T^2 KL(t || s).

Memory is part of the contract here. ``layer_loss`` keeps exactly one tensor per
distilled layer until backward (its gradient, in the student's dtype), whatever the
teacher's dtype; ``lm_head_losses`` never materialises logits for more than
``head_chunk_tokens`` tokens at a time (a 150k vocabulary makes whole logits the largest
activation of a step).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_LOGITS_PER_CHUNK = 1 << 24

# A frozen LM head as pieces of rows: each call walks them once, yielding (row ids, rows), each
# piece's ids ascending (the pieces themselves in any order).
RowPieces = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]

__all__ = [
    "LossConfig",
    "layer_loss",
    "layer_loss_reference",
    "lm_cross_entropy",
    "lm_head_losses",
    "linear_head_losses",
    "next_token_nll",
    "vocab_streamed_cross_entropy",
    "logit_kl",
    "distilled_layers",
]


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """Weights of the loss parts (paper LM defaults: a_ce 1, a_layer 15, a_kl 0)."""

    a_ce: float = 1.0
    """Weight of the task loss (next-token cross-entropy for LMs)."""
    a_layer: float = 15.0
    """Weight of the mean layerwise hidden-state MSE."""
    a_kl: float = 0.0
    """Weight of the logit KL to the teacher."""
    kl_temperature: float = 1.0
    """Softmax temperature T of the KL term (scaled by T^2)."""
    skip_first: int = 0
    """Number of leading blocks left out of the layer loss (the embedding output is never in it)."""
    skip_last: bool = True
    """Leave the last block out of the layer loss (paper default): end to end, the task loss
    trains it. A teacher-forced phase, which has no task loss, keeps every block in."""
    head_chunk_tokens: int | None = None
    """CE and KL are computed over this many tokens at a time: one chunk's logits live at
    once and are recomputed in backward. null: as many tokens as keep a chunk's logits
    under 16M values (64 MB in fp32), e.g. 341 tokens for a 49k vocabulary, 110 for 152k."""

    def chunk_tokens(self, vocab_size: int) -> int:
        """Tokens per CE/KL chunk for a given vocabulary."""
        return self.head_chunk_tokens or max(1, _LOGITS_PER_CHUNK // vocab_size)

    def __post_init__(self):
        for name in ("a_ce", "a_layer", "a_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_temperature <= 0:
            raise ValueError(f"loss.kl_temperature must be > 0, got {self.kl_temperature}")
        if self.skip_first < 0:
            raise ValueError("loss.skip_first must be >= 0")
        if self.head_chunk_tokens is not None and self.head_chunk_tokens < 1:
            raise ValueError(f"loss.head_chunk_tokens must be >= 1 or null (automatic), got {self.head_chunk_tokens}")
        if self.a_ce == self.a_layer == self.a_kl == 0:
            raise ValueError("all loss weights are zero: nothing to train")


def distilled_layers(num_layers: int, cfg: LossConfig) -> list[int]:
    """0-based block indices whose outputs enter the layer loss."""
    last = num_layers - 1 if cfg.skip_last else num_layers
    layers = list(range(cfg.skip_first, last))
    if cfg.a_layer > 0 and not layers:
        raise ValueError(f"the layer loss covers no block of a {num_layers}-layer model (skip_first={cfg.skip_first})")
    return layers


_LN_EPS = 1e-5


class _LayerMSE(torch.autograd.Function):
    """MSE(LN(s), LN(t)) whose backward needs one saved tensor: d loss / d s, in s's dtype.

    Autograd's own graph would keep LN(t) in fp32 (and LN(s)'s statistics) per layer until
    backward; the gradient is computed here in fp32 while the teacher state is at hand,
    and only it is kept.
    """

    @staticmethod
    def forward(ctx, student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor | None, tokens: float | None) -> torch.Tensor:
        dim = (student_h.shape[-1],)
        compute = torch.promote_types(student_h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        # NOTE: native_layer_norm returns LN(s)'s 1/std too, which backward needs; a separate
        # var() for it cost 1.6 ms per layer (512 x 576, one CPU thread).
        ln_s, _, rstd = torch.native_layer_norm(student_h.to(compute), dim, None, None, _LN_EPS)
        diff = F.layer_norm(teacher_h.to(compute), dim, eps=_LN_EPS).neg_().add_(ln_s)  # ln_s - ln_t
        count = ln_s.numel()
        pads = None
        if mask is not None:  # padded batch: the mean over real tokens only
            # NOTE: filled, not multiplied: a pad's state may be non-finite (a row attending to
            # nothing), and 0 * nan would carry it into the loss and every gradient.
            pads = ~mask.bool().unsqueeze(-1)
            diff.masked_fill_(pads, 0.0)
            count = (tokens if tokens is not None else max(int(mask.bool().sum()), 1)) * dim[0]
        # NOTE: not F.mse_loss: on CPU its scalar result is a view of a full-size buffer,
        # which would keep one hidden state alive per layer for as long as the loss lives.
        loss = diff.square().sum() / count
        if ctx.needs_input_grad[0]:
            # d loss / d ln_s = 2 (ln_s - ln_t) / N; through the parameter-free layer norm:
            # d ln_s / d s applied to g = rstd * (g - mean(g) - ln_s * mean(g * ln_s)).
            g = diff.mul_(2.0 / count)
            proj = (g * ln_s).mean(-1, keepdim=True)
            grad = g.sub_(g.mean(-1, keepdim=True)).sub_(ln_s.mul_(proj)).mul_(rstd)
            if pads is not None:
                grad.masked_fill_(pads, 0.0)
            ctx.scale = None
            if student_h.dtype == torch.float16:
                # Divided by N before the loss scale multiplies it, an fp16 gradient underflows
                # (61% zeros at 4 x 2048 x 2048): keep it relative to its largest entry.
                ctx.scale = grad.abs().amax().clamp(min=torch.finfo(compute).tiny)
                grad.div_(ctx.scale)
            ctx.save_for_backward(grad.to(student_h.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.scale is not None:  # fp16: scale in fp32 (the loss scale would overflow fp16 too)
            return (grad.float() * (grad_out.float() * ctx.scale)).to(grad.dtype), None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None


def layer_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor | None = None, *, tokens: float | None = None) -> torch.Tensor:
    """MSE between parameter-free layer-normed hidden states (computed in fp32); with a (b, l)
    0/1 ``mask`` (a padded batch) the mean runs over real tokens only. ``tokens`` (with a
    mask): divide by that many tokens instead of this batch's own, e.g. the global batch's mean
    per micro-batch, so every real token of a step weighs the same however its micro-batch was padded."""
    return _LayerMSE.apply(student_h, teacher_h, mask, tokens)


def layer_loss_reference(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor | None = None, *, tokens: float | None = None) -> torch.Tensor:
    """The same loss through autograd (the test oracle; keeps fp32 LN(t) and LN(s) until backward)."""
    dim = (student_h.shape[-1],)
    ln_s, ln_t = F.layer_norm(student_h.float(), dim, eps=_LN_EPS), F.layer_norm(teacher_h.float(), dim, eps=_LN_EPS)
    if mask is None:
        return F.mse_loss(ln_s, ln_t)
    keep = mask.bool()
    if tokens is not None:
        return F.mse_loss(ln_s[keep], ln_t[keep], reduction="sum") / (tokens * dim[0])
    return F.mse_loss(ln_s[keep], ln_t[keep])


def lm_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token CE over a packed batch (labels are the inputs shifted by one)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over tokens."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_head_losses(
    student_h: torch.Tensor,
    input_ids: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    want_ce: bool,
    teacher_h: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Next-token CE and logit KL from final hidden states, over chunks of tokens.

    ``*_head`` map hidden states (n, hidden) to logits (n, vocab) (final norm + LM head).
    Each chunk's logits are recomputed in backward instead of kept, so at most one
    chunk's logits are alive. CE is the mean over the b * (l - 1) predicted tokens, KL the
    mean over all b * l positions (as ``lm_cross_entropy`` and ``logit_kl``).
    """
    want_kl = teacher_h is not None
    s = student_h.flatten(0, 1)
    t = teacher_h.flatten(0, 1) if want_kl else None
    labels = _next_token_labels(input_ids)
    size = chunk_tokens or s.shape[0]

    def chunk_losses(s_c, t_c, labels_c):
        logits = student_head(s_c).float()
        ce = F.cross_entropy(logits, labels_c, reduction="sum") if want_ce else logits.new_zeros(())
        kl = logits.new_zeros(())
        if want_kl:
            t_logp = _teacher_log_probs(teacher_head, t_c, temperature)
            kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1), t_logp, log_target=True, reduction="sum")
        return ce, kl

    ce_sum = kl_sum = 0.0
    for start in range(0, s.shape[0], size):
        piece = slice(start, start + size)
        args = (s[piece], t[piece] if want_kl else None, labels[piece])
        if size < s.shape[0] and torch.is_grad_enabled():
            # NOTE: no determinism check: under ZeRO-3 a frozen head's weight is released again
            # right after its recomputed forward (and gathered again for its backward), so the
            # check would compare against an already-released parameter.
            ce_c, kl_c = checkpoint(chunk_losses, *args, use_reentrant=False, determinism_check="none")
        else:
            ce_c, kl_c = chunk_losses(*args)
        ce_sum = ce_sum + ce_c
        kl_sum = kl_sum + kl_c
    return _means(ce_sum if want_ce else None, kl_sum if want_kl else None, input_ids, temperature)


@torch.no_grad()
def next_token_nll(
    hidden: torch.Tensor, input_ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], *, chunk_tokens: int,
) -> torch.Tensor:
    """(b, l) float32 NLL of each next token (0 at the last position) for evaluation: ``head``
    maps hidden states (n, hidden) to logits, a chunk of ``chunk_tokens`` tokens at a time."""
    flat, labels = hidden.flatten(0, 1), _next_token_labels(input_ids)
    nll = torch.empty(labels.shape, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        nll[piece] = F.cross_entropy(head(flat[piece]).float(), labels[piece], reduction="none")  # 0 where -100
    return nll.view(input_ids.shape)


def _next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """(b * l,) labels: position p predicts token p + 1; the last position of each sequence predicts nothing (-100)."""
    return F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()


@torch.no_grad()
def _teacher_log_probs(teacher_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's tempered log-probabilities for a chunk of tokens (the KL's target: no gradient)."""
    return F.log_softmax(teacher_head(hidden).float() / temperature, dim=-1)


def _means(ce_sum, kl_sum, input_ids: torch.Tensor, temperature: float):
    """Summed CE over the b * (l - 1) predicted tokens and summed KL over all b * l positions -> means (KL times T^2)."""
    batch, seqlen = input_ids.shape
    ce = ce_sum / (batch * (seqlen - 1)) if ce_sum is not None else None
    kl = kl_sum / (batch * seqlen) * temperature**2 if kl_sum is not None else None
    return ce, kl


class _ChunkedLinearHeadLosses(torch.autograd.Function):
    """Summed next-token CE and KL of the logits ``x @ weight.T``, a chunk of tokens at a time,
    with one weight gradient for all chunks.

    NOTE: the checkpointed chunks of ``lm_head_losses`` each give a whole (vocab, hidden) weight
    gradient, which autograd then adds to the running sum, so two whole matrices are alive at
    once in backward. At Qwen2.5-0.5B (tied 151,936 x 896 head, everything trained, 1 rank) that
    put the backward's peak 1.16 GB above the forward's end (stop 31's probe). Here backward
    recomputes each chunk's logits and adds its weight gradient into one buffer in place.
    It runs as the head module's forward (``linear_head_losses``), so under ZeRO-3 DeepSpeed's
    module hooks gather the weight for it and again for its backward, as for any module.
    """

    @staticmethod
    def forward(ctx, x, weight, labels, teacher_logp, temperature: float, size: int, want_ce: bool):
        ce_sum = x.new_zeros((), dtype=torch.float32)
        kl_sum = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], size):
            piece = slice(start, start + size)
            logits = F.linear(x[piece], weight).float()
            if want_ce:
                ce_sum += F.cross_entropy(logits, labels[piece], reduction="sum")
            if teacher_logp is not None:
                s_logp = F.log_softmax(logits / temperature, dim=-1)
                kl_sum += F.kl_div(s_logp, teacher_logp(piece), log_target=True, reduction="sum")
        ctx.save_for_backward(x, labels)
        # NOTE: the weight itself, not saved: a ZeRO-3 parameter's data is swapped on release.
        ctx.weight, ctx.teacher_logp = weight, teacher_logp
        ctx.temperature, ctx.size, ctx.want_ce = temperature, size, want_ce
        return ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        x, labels = ctx.saved_tensors
        weight, teacher_logp, temperature = ctx.weight, ctx.teacher_logp, ctx.temperature
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(x) if want_x else None
        # NOTE: summed in float32: in bf16 every chunk's addition rounded the running sum (relative
        # error 0.017-0.033 at 8k tokens, against 0.0024 for one bf16 matmul); each chunk's product
        # stays in the weight's dtype (tensor cores), so only the sum is wider.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        for start in range(0, x.shape[0], ctx.size):
            piece = slice(start, start + ctx.size)
            logits = F.linear(x[piece], weight).float()
            grad = torch.zeros_like(logits)
            if ctx.want_ce:  # d CE / d logits = softmax - one-hot(label), on predicting positions
                valid = labels[piece] != -100
                probs = torch.softmax(logits, dim=-1).mul_(valid.unsqueeze(-1))
                rows = valid.nonzero(as_tuple=True)[0]
                probs[rows, labels[piece][rows]] -= 1.0
                grad.add_(probs.mul_(grad_ce))  # NOTE: a tensor factor, not alpha=: no device sync
            if teacher_logp is not None:  # d KL / d logits = (softmax(logits / T) - p_teacher) / T
                diff = torch.softmax(logits / temperature, dim=-1).sub_(teacher_logp(piece).exp())
                grad.add_(diff.mul_(grad_kl / temperature))
            grad = grad.to(x.dtype)
            if want_x:
                grad_x[piece] = grad @ weight.to(x.dtype)
            if want_w:
                a, b = grad.t().to(weight.dtype), x[piece].to(weight.dtype)
                if weight.dtype == acc:
                    grad_w.addmm_(a, b)
                else:
                    grad_w.add_(a @ b)  # the product in bf16, the sum in float32
        return grad_x, (grad_w.to(weight.dtype) if want_w else None), None, None, None, None, None


def linear_head_losses(
    x: torch.Tensor,
    input_ids: torch.Tensor,
    head: torch.nn.Linear,
    *,
    want_ce: bool,
    teacher_h: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``lm_head_losses`` for a bias-free linear ``head`` applied to ``x`` (the final norm's
    output, (b, l, hidden)): the same CE and KL, with one weight gradient in backward instead
    of one per chunk."""
    labels = _next_token_labels(input_ids)
    teacher_logp = None
    if teacher_h is not None:
        t = teacher_h.flatten(0, 1)

        def teacher_logp(piece: slice) -> torch.Tensor:
            return _teacher_log_probs(teacher_head, t[piece], temperature)

    size = chunk_tokens or labels.shape[0]

    def losses(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _ChunkedLinearHeadLosses.apply(flat, head.weight, labels, teacher_logp, temperature, size, want_ce)

    ce_sum, kl_sum = _call_as_forward(head, losses, x.flatten(0, 1))
    return _means(ce_sum if want_ce else None, kl_sum if teacher_h is not None else None, input_ids, temperature)


def _call_as_forward(module: torch.nn.Module, forward: Callable, *args):
    """``module(*args)`` with ``forward`` in place of its forward for this one call.

    NOTE: so the module's hooks wrap it. Under ZeRO-3 they gather the module's parameters
    before the call and release them after, and attach the same to its backward; a weight
    gathered by hand instead (``GatheredParameters``) collided with DeepSpeed's prefetch of
    it ("already in registry").
    """
    module.forward = forward
    try:
        return module(*args)
    finally:
        del module.forward


def _positions_in(labels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tokens whose label is one of ``ids``, that label's index in ``ids``); ``ids`` ascend.

    NOTE: by binary search, not ``(labels[:, None] == ids).nonzero()``: that compares every
    token with every row of the piece (512 x 14.5k: 7 ms a piece on one CPU thread, 0.2 ms this
    way). No sort first: a piece's ids ascend (``RowPieces``), and sorting 49k ids took 1.7 ms a
    step on one CPU thread."""
    at = torch.searchsorted(ids, labels).clamp_(max=len(ids) - 1)
    token = (ids[at] == labels).nonzero(as_tuple=True)[0]
    return token, at[token]


class _VocabStreamedCE(torch.autograd.Function):
    """Summed next-token CE against a frozen head seen one piece of rows at a time, in one walk.

    The head is frozen, so the only gradient is the hidden states', and it is linear in
    the incoming scalar gradient: d CE / d h = softmax(h W^T) W - W[label] per token. One
    walk over the pieces computes it beside the loss with an online softmax (a running
    max m and sum s per token; sum_v exp(l_v - m) W_v is rescaled whenever m grows), so
    neither the whole head nor whole logits are ever held, and backward only scales the
    saved gradient (in the hidden states' dtype, as ``_LayerMSE`` keeps its own). NOTE:
    walking the pieces again in backward (the previous design) recomputed every logit: one
    more head-sized matmul, and under ZeRO-3 a second all-gather of the head, per step. For
    512 tokens at a 49k vocabulary on one CPU thread, forward + backward took 1.4-1.5 s
    that way and take 0.87 s now, as much as plain CE over whole logits.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, pieces: RowPieces) -> torch.Tensor:
        # NOTE: the matmuls run in the hidden states' dtype, as the head module's own does (bf16 on
        # tensor cores); the online softmax in float32. In float32 an H200 ran them on its CUDA
        # cores: 0.17 s of a 0.68 s distillation step at Llama-3.2-1B, 4 x 2048 tokens.
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        m = hidden.new_full((n,), float("-inf"), dtype=acc)  # running max logit
        s = hidden.new_zeros(n, dtype=acc)  # running sum of exp(logit - m)
        target = hidden.new_zeros(n, dtype=acc)
        want_grad = ctx.needs_input_grad[0]  # False under no_grad (evaluation)
        weighted = torch.zeros_like(hidden, dtype=acc) if want_grad else None  # running sum of exp(logit - m) * row
        label_rows = torch.zeros_like(hidden, dtype=acc) if want_grad else None  # the head row of each token's label
        for ids, rows in pieces():
            rows = rows.to(hidden.dtype)
            logits = (hidden @ rows.T).to(acc)
            token, col = _positions_in(labels, ids)
            target[token] = logits[token, col]
            m_new = torch.maximum(m, logits.amax(-1))
            rescale = (m - m_new).exp_()
            p = logits.sub_(m_new[:, None]).exp_()
            s.mul_(rescale).add_(p.sum(-1))
            if want_grad:
                label_rows[token] = rows[col].to(acc)
                weighted.mul_(rescale[:, None])
                if rows.dtype == acc:
                    weighted.addmm_(p, rows)
                else:
                    weighted.add_(p.to(rows.dtype) @ rows)
            m = m_new
        valid = labels != -100
        if want_grad:  # d (sum of CE) / d h; only valid tokens count
            grad = weighted.div_(s[:, None]).sub_(label_rows).mul_(valid[:, None].to(acc))
            del label_rows
            ctx.save_for_backward(grad.to(hidden.dtype))
        return torch.where(valid, m + s.log() - target, 0.0).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None


def vocab_streamed_cross_entropy(hidden: torch.Tensor, input_ids: torch.Tensor, pieces: RowPieces) -> torch.Tensor:
    """Next-token CE (mean over the b * (l - 1) predicted tokens) of normed final hidden
    states (b, l, hidden) against a frozen LM head given as row pieces (``pieces()`` yields
    ``(row ids, rows)`` covering the vocabulary once; it is walked once, in forward, so
    under ZeRO-3 that walk is collective)."""
    batch, seqlen = input_ids.shape
    return _VocabStreamedCE.apply(hidden.flatten(0, 1), _next_token_labels(input_ids), pieces) / (batch * (seqlen - 1))
