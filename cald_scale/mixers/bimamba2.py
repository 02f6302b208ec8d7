"""Bidirectional Mamba2 (for encoders): one Mamba2 scans the sequence forwards, a second scans
it backwards, and their outputs are merged, so every token sees the whole sequence.

Legend: b = batch, l = sequence length (padded), n = a sequence's true length (real tokens).

The backward scan runs over the padding-aware reversal: each sample's real tokens are
reversed in place and its pads stay where they are, so pads sit on the same side of the
real tokens in both directions and, masked by Mamba2Mixer, feed nothing into either scan.

A padded sequence's outputs equal those of the sequence run alone, with or without a bias in
in_proj (``proj_bias``): Mamba2Mixer zeroes the pads' projections before the convolution.
"""

from __future__ import annotations

import torch

from cald_scale.mixers._common import SequenceMixer, padding_mask
from cald_scale.mixers.config import BiMamba2Config
from cald_scale.mixers.mamba2 import Mamba2Mixer

__all__ = ["BiMamba2Mixer", "reverse_real_tokens"]


def _reversal_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, l) gather index that maps each sample's j-th real token to its (n-1-j)-th and keeps pads.

    It is its own inverse, so the same index reverses the backward scan's output back.
    """
    real = attention_mask.bool()
    seqlen = real.shape[1]
    positions = torch.arange(seqlen, device=real.device).expand_as(real)
    # Positions of the real tokens in order, first n entries of each row (stable sort: pads last).
    real_positions = torch.sort((~real).to(torch.uint8), dim=-1, stable=True).indices  # (b, l)
    rank = real.cumsum(-1) - 1  # index of each real token among its sequence's real tokens
    mirrored = (real.sum(-1, keepdim=True) - 1 - rank).clamp(min=0, max=seqlen - 1)
    return torch.where(real, real_positions.gather(1, mirrored), positions)


def _reverse(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return x.flip(1)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def reverse_real_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """x (b, l, ...) with each sample's real tokens in reverse order and its pads in place."""
    return _reverse(x, _reversal_index(attention_mask) if attention_mask is not None else None)


class BiMamba2Mixer(SequenceMixer):
    """Bidirectional Mamba2: (b, l, hidden) -> (b, l, hidden), linear in l.

    Parameters: ``fwd.*`` and ``bwd.*``, each a :class:`Mamba2Mixer` (Bamba-named).
    Output: merge(fwd(x), reverse(bwd(reverse(x)))), zero at pads.
    """

    causal = False

    def __init__(self, config: BiMamba2Config, hidden_size: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.fwd = Mamba2Mixer(config.mamba2, hidden_size, layer_idx=layer_idx)
        self.bwd = Mamba2Mixer(config.mamba2, hidden_size, layer_idx=layer_idx)

    def reset_parameters(self) -> None:
        self.fwd.reset_parameters()
        self.bwd.reset_parameters()

    def kernel(self, device: torch.device) -> str:
        """The resolved scan implementation on ``device`` (both directions share it)."""
        return self.fwd.kernel(device)

    def _mix(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, return_state: bool):
        mask = padding_mask(attention_mask, hidden_states)  # (b, l, 1) or None; checks the shape
        index = _reversal_index(attention_mask) if attention_mask is not None else None

        # 1. Forward scan.
        out = self.fwd(hidden_states, attention_mask)

        # 2. Backward scan over the reversed real tokens (the mask is unchanged: pads stay put),
        #    reversed back so position t again holds token t.
        backward = self.bwd(_reverse(hidden_states, index), attention_mask)
        out = out + _reverse(backward, index)

        # 3. Merge; pads output zeros.
        if self.config.merge == "mean":
            out = out * 0.5
        return out * mask if mask is not None else out
