"""Linformer self-attention (bidirectional, for encoders): the teacher's Q/K/V plus length
projections E (keys) and F (values) that shrink the l keys and values to k, so attention
costs O(l * k) instead of O(l^2).

Legend: b = batch, l = sequence length (padded), n = a sequence's true length (real tokens),
h = heads, d = head dim, r = projected positions (k in the paper), m = max_positions.

NOTE on the scale: E and F are N(0, 1) and applied as E^T K / sqrt(n) with n the sequence's
TRUE length. A projected key is then a random mix of n keys whose size does not depend on n
(the sum of n unit-variance terms has standard deviation sqrt(n)), so the softmax
temperature and the size of the output are the same for short and long inputs. Using the
true length rather than the padded one makes a sequence's output independent of how much
padding its batch happens to carry.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from cald_scale.mixers._common import SequenceMixer, padding_mask
from cald_scale.mixers.config import LinformerConfig

__all__ = ["LengthProjection", "LinformerSelfAttention"]


class LengthProjection(nn.Module):
    """One length projection (E or F): ``weight`` (max_positions, k), normal with std 1.

    Row i weighs the token with index i among its sequence's real tokens.
    """

    def __init__(self, max_positions: int, k: int) -> None:
        super().__init__()
        # NOTE: kept as ints: under ZeRO-3 the weight is a partition whose shape says nothing.
        self.max_positions, self.k = max_positions, k
        self.weight = nn.Parameter(torch.empty(max_positions, k))
        self.reset_parameters()

    @classmethod
    def for_config(cls, config: LinformerConfig) -> LengthProjection:
        """A projection of the config's size: for ``sharing="layer"``, build one and pass the
        same object to every layer (``build_mixer(..., shared_projection=proj)``)."""
        return cls(config.max_positions, config.k)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=1.0)

    def rows(self, attention_mask: torch.Tensor | None, seqlen: int, dtype: torch.dtype) -> torch.Tensor:
        """The scaled rows that project one batch's l positions: (1, l, r) unpadded, else (b, l, r).

        Real tokens get the row of their index among their sequence's real tokens (so right
        and left padding give the rows an unpadded run gets), scaled by 1/sqrt(n); pads get zeros.
        """
        if attention_mask is None:
            self._check_length(seqlen)
            return (self.weight[:seqlen] / math.sqrt(seqlen)).to(dtype).unsqueeze(0)
        real = attention_mask.bool()  # (b, l)
        lengths = real.sum(-1)  # (b,)
        if seqlen > self.max_positions:  # only then can a true length be too long (avoids a sync)
            self._check_length(int(lengths.max()))
        # A pad before the first real token would get index -1: clamp it (its row is zeroed below).
        index = (real.cumsum(-1) - 1).clamp_(min=0)  # (b, l)
        scale = real.to(dtype) / lengths.clamp(min=1).to(dtype).sqrt().unsqueeze(-1)  # (b, l)
        return self.weight.to(dtype)[index] * scale.unsqueeze(-1)

    def _check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"sequence of {length} tokens is longer than max_positions={self.max_positions} "
                "of the Linformer length projections; raise LinformerConfig.max_positions"
            )


class LinformerSelfAttention(SequenceMixer):
    """Linformer attention: (b, l, hidden) -> (b, l, h*d), or (b, l, hidden) with ``o_proj``.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj`` (the teacher's, hidden -> h*d), optional
    ``o_proj`` (h*d -> hidden), and the length projections by ``config.sharing``:
    "none": ``E`` (keys) and ``F`` (values); "kv" and "layer": ``E`` alone, used for both.

    With "layer", pass the one shared :class:`LengthProjection` to every layer as
    ``shared_projection`` (without it the layer owns its own, as with "kv"). It is then a
    child of every layer: each layer's ``state_dict`` holds it (same tensor under every
    layer's ``E.weight`` key; ``torch.save`` / ``load_state_dict`` keep that working and
    ``parameters()`` yields it once), and ZeRO-3 gathers it with whichever layer runs. A HF
    model holding it must declare the keys tied (``_tied_weights_keys``) so that
    safetensors, which refuses shared tensors, saves it once and loading re-ties it.
    """

    causal = False

    def __init__(
        self,
        config: LinformerConfig,
        hidden_size: int,
        layer_idx: int = 0,
        shared_projection: LengthProjection | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.resolved_num_heads(hidden_size)
        self.head_dim = config.head_dim
        width = self.num_heads * self.head_dim

        self.q_proj = nn.Linear(hidden_size, width, bias=config.proj_bias)
        self.k_proj = nn.Linear(hidden_size, width, bias=config.proj_bias)
        self.v_proj = nn.Linear(hidden_size, width, bias=config.proj_bias)
        self.o_proj = nn.Linear(width, hidden_size, bias=config.proj_bias) if config.output_proj else None

        if shared_projection is not None:
            if config.sharing != "layer":
                raise ValueError(f"shared_projection is only for sharing='layer', got sharing={config.sharing!r}")
            if (shared_projection.max_positions, shared_projection.k) != (config.max_positions, config.k):
                raise ValueError(
                    f"shared_projection is ({shared_projection.max_positions}, {shared_projection.k}), "
                    f"the config asks for (max_positions, k) = ({config.max_positions}, {config.k})"
                )
        self.E = shared_projection if shared_projection is not None else LengthProjection.for_config(config)
        self.F = LengthProjection.for_config(config) if config.sharing == "none" else None

    @property
    def out_width(self) -> int:
        return self.hidden_size if self.o_proj is not None else self.num_heads * self.head_dim

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (b, l, h*d) -> (b, h, l, d)

    def _mix(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, return_state: bool):
        seqlen = hidden_states.shape[1]
        mask = padding_mask(attention_mask, hidden_states)  # (b, l, 1) or None; checks the shape

        # 1. The teacher's projections, per head.
        q = self._heads(self.q_proj(hidden_states))
        k = self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))

        # 2. Length projections: l keys / values -> r, each sequence over its own real tokens.
        E_rows = self.E.rows(attention_mask, seqlen, k.dtype)  # (b or 1, l, r)
        F_rows = self.F.rows(attention_mask, seqlen, v.dtype) if self.F is not None else E_rows
        k = torch.einsum("blr,bhld->bhrd", E_rows.expand(k.shape[0], -1, -1), k)
        v = torch.einsum("blr,bhld->bhrd", F_rows.expand(v.shape[0], -1, -1), v)

        # 3. Softmax attention of every query over the r projected positions (scale 1/sqrt(d)).
        dropout = self.config.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (b, h, l, d)
        out = out.transpose(1, 2).flatten(-2)  # (b, l, h*d)

        # 4. Optional output projection; pads output zeros (after it, so no bias shows there).
        if self.o_proj is not None:
            out = self.o_proj(out)
        return out * mask if mask is not None else out
