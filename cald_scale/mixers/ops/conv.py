"""Depthwise causal 1-D convolution (the short conv in front of Mamba's SSM), pure PyTorch.

Shapes: b = batch, d = channels, l = sequence length, w = kernel width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cald_scale.mixers.ops._threads import one_thread, scan_threads

__all__ = ["causal_conv1d", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return activation is not None


class _CausalConv1dChannelsLast(torch.autograd.Function):
    """Causal depthwise conv (+ optional SiLU) on (b, l, d) data as w shifted multiply-adds.

    Sums in float32 at least (taps, bias, running sum and SiLU), as causal-conv1d's kernels do,
    and returns that: a bf16 sum rounded after every tap, and in another order than the
    one-token step, so cached decoding drifted from the full forward.

    NOTE: on CPU this beats F.conv1d's depthwise kernel several times over (mostly in backward)
    and keeps the channels-last layout that the projections around it produce.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        width = weight.shape[1]
        x_pad = x.new_empty(x.shape[0], x.shape[1] + width - 1, x.shape[2])  # (b, l + w - 1, d)
        x_pad[:, : width - 1].zero_()
        x_pad[:, width - 1 :].copy_(x)
        y = _shifted_sum(x_pad, _taps(weight), bias)
        # NOTE: the pre-activation is rebuilt in backward (w multiply-adds) instead of being saved.
        ctx.save_for_backward(x_pad, weight, bias)
        ctx.silu = silu
        return F.silu(y, inplace=True) if silu else y

    @staticmethod
    def backward(ctx, grad_out):
        with one_thread():
            return _CausalConv1dChannelsLast._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x_pad, weight, bias = ctx.saved_tensors
        seqlen, width = grad_out.shape[1], weight.shape[1]
        taps = _taps(weight)
        grad_out = grad_out.to(taps.dtype)
        if ctx.silu:
            grad = torch.ops.aten.silu_backward(grad_out, _shifted_sum(x_pad, taps, bias))
        else:
            grad = grad_out.contiguous()
        grad_bias = grad.sum((0, 1)).to(bias.dtype) if bias is not None else None
        # y[t] = sum_k w[k] x[t - (w - 1) + k]  =>  dx[s] = sum_k w[k] dy[s + (w - 1) - k].
        grad_x = grad * taps[width - 1]
        for k in range(width - 1):
            shift = width - 1 - k
            if shift < seqlen:
                grad_x[:, : seqlen - shift].addcmul_(grad[:, shift:], taps[k])
        # NOTE: one scratch buffer for the products; fresh (b, l, d) temporaries cost far more here.
        scratch = torch.empty_like(grad)
        grad_weight = torch.stack(
            [torch.mul(x_pad[:, k : k + seqlen], grad, out=scratch).sum((0, 1)) for k in range(width)], dim=-1
        )
        return grad_x.to(x_pad.dtype), grad_weight.to(weight.dtype), grad_bias, None


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(d, w) filters -> (w, d), each tap contiguous, in float32 at least (what the sums run in).

    NOTE: a strided (d,) column as the broadcast factor of addcmul_ runs ~2x slower on CPU.
    """
    return weight.t().to(_sum_dtype(weight.dtype)).contiguous()


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64


def _shifted_sum(x_pad: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[:, t] = bias + sum_k taps[k] * x_pad[:, t + k] over (b, l + w - 1, d) input, taps (w, d),
    summed in the taps' dtype. ``causal_conv1d_update`` adds in this same order."""
    width = taps.shape[0]
    seqlen = x_pad.shape[1] - width + 1
    last = x_pad[:, width - 1 :]
    y = torch.addcmul(bias.to(taps.dtype), last, taps[width - 1]) if bias is not None else last * taps[width - 1]
    for k in range(width - 1):
        y.addcmul_(x_pad[:, k : k + seqlen], taps[k])
    return y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution: y[:, c, t] = bias[c] + sum_k weight[c, k] * x[:, c, t - w + 1 + k].

    Args:
        x: (b, d, l) input; positions before 0 count as zeros. Channels-last memory (a
            transposed view of a (b, l, d) tensor) takes the fast path, and so does the output.
        weight: (d, w) one filter per channel.
        bias: (d,) or None.
        activation: "silu" (alias "swish") or None.

    Returns:
        (b, d, l), the dtype of ``x``.
    """
    silu = _check_activation(activation)
    dim, width = weight.shape
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} channels, weight has {dim}")
    xw = x.to(weight.dtype)
    if xw.stride(1) == 1:  # channels-last memory
        with scan_threads(xw, weight, bias):
            y = _CausalConv1dChannelsLast.apply(xw.transpose(1, 2), weight, bias, silu).transpose(1, 2)
    else:  # in float32 at least too, whatever the memory layout
        dtype = _sum_dtype(weight.dtype)
        bias_ = bias.to(dtype) if bias is not None else None
        y = F.conv1d(F.pad(xw.to(dtype), (width - 1, 0)), weight.to(dtype).unsqueeze(1), bias_, groups=dim)
        y = F.silu(y) if silu else y
    return y.to(x.dtype)


def causal_conv1d_update(
    x_t: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`causal_conv1d`.

    Args:
        x_t: (b, d) the new input column.
        conv_state: (b, d, w) the last ``w`` inputs, oldest first; shifted in place if
            ``inplace`` (as causal-conv1d's update does), else not modified.
        weight, bias, activation: as in :func:`causal_conv1d`.

    Returns:
        y_t: (b, d) the output at the new position.
        new_conv_state: (b, d, w) the state shifted left by one with ``x_t`` at the end
        (``conv_state`` itself if ``inplace``).
    """
    silu = _check_activation(activation)
    if x_t.shape != conv_state.shape[:2] or weight.shape != (conv_state.shape[1], conv_state.shape[2]):
        # NOTE: checked before the state is shifted: a bad call must leave a cache's state as it was.
        raise ValueError(
            f"causal_conv1d_update: x_t {tuple(x_t.shape)} must be (b, d) and weight {tuple(weight.shape)} (d, w) "
            f"for a conv_state of (b, d, w) = {tuple(conv_state.shape)}"
        )
    if inplace and conv_state.is_contiguous():
        # Shifted as one contiguous copy of the flattened state (each row's last slot then holds
        # the next row's first input), then the new inputs written over the last column: about
        # 1.4x faster on CPU than gathering the strided (b, d, w - 1) window.
        flat = conv_state.view(-1)
        flat[:-1].copy_(flat[1:].clone())
        conv_state[:, :, -1].copy_(x_t)
        new_state = conv_state
    else:
        new_state = torch.cat([conv_state[:, :, 1:], x_t.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
        new_state = conv_state.copy_(new_state) if inplace else new_state
    # The full conv's sum, in its order and dtype: a prefill and its steps then agree bit for bit.
    x_pad = new_state.to(weight.dtype).transpose(1, 2)  # (b, w, d): the window as a sequence of one output
    # NOTE: the taps as strided columns of the weight: one output per channel, so a contiguous
    # copy of them would cost more than it saves.
    y = _shifted_sum(x_pad, weight.t().to(_sum_dtype(weight.dtype)), bias)[:, 0]
    return (F.silu(y, inplace=True) if silu else y).to(x_t.dtype), new_state
