"""Attention-informed mixer initialisation ("The Mamba in the Llama", Wang et al. 2024).

Linear attention reads y_t = sum_s (q_t . k_s) v_s; an SSM reads y_t = sum_s C_t (decay) B_s x_s.
So C <- Q, B <- K, x <- V and out_proj <- O; grouped KV heads are repeated to all heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..mixers import Mamba2Mixer
from .registry import AttentionWeights

__all__ = ["init_mixer_from_attention"]


def _repeat_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(kv_heads*head_dim, in) -> (heads*head_dim, in), each KV head repeated for its query group."""
    head_dim = weight.shape[0] // kv_heads
    return weight.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, -1)


@torch.no_grad()
def _init_mamba2(mixer: nn.Module, attn: AttentionWeights, heads: int, kv_heads: int) -> None:
    cfg = mixer.config
    width = cfg.num_heads * cfg.head_dim
    state_width = cfg.n_groups * cfg.d_state
    if not (cfg.num_heads == heads and cfg.n_groups == heads and state_width == attn.q.shape[0] == width):
        raise ValueError(
            "attention_init for mamba2 needs the teacher-matched geometry "
            "(student.conversion.match_teacher_geometry=true)"
        )
    w = mixer.in_proj.weight  # rows: [z | x | B | C | dt]
    x_rows = slice(width, 2 * width)
    b_rows = slice(2 * width, 2 * width + state_width)
    c_rows = slice(2 * width + state_width, 2 * width + 2 * state_width)
    w[x_rows].copy_(_repeat_heads(attn.v, kv_heads, heads))
    w[b_rows].copy_(_repeat_heads(attn.k, kv_heads, heads))
    w[c_rows].copy_(attn.q)
    mixer.out_proj.weight.copy_(attn.o)


@torch.no_grad()
def _init_mamba(mixer: nn.Module, attn: AttentionWeights, heads: int, kv_heads: int) -> None:
    # Mamba's per-channel SSM has no Q/K slots; map V onto the x branch and O onto out_proj,
    # tiling across the (usually 2x) wider inner dimension and scaling so outputs keep their size.
    d_inner = mixer.out_proj.weight.shape[1]
    v = _repeat_heads(attn.v, kv_heads, heads)
    if d_inner % v.shape[0] != 0:
        raise ValueError(f"attention_init for mamba needs d_inner ({d_inner}) to be a multiple of {v.shape[0]}")
    tiles = d_inner // v.shape[0]
    mixer.in_proj.weight[:d_inner].copy_(v.repeat(tiles, 1))
    mixer.out_proj.weight.copy_(attn.o.repeat(1, tiles) / tiles)


def init_mixer_from_attention(mixer: nn.Module, attn: AttentionWeights, teacher_config) -> None:
    """Overwrite a fresh (plain, unpartitioned) mixer's projections from one teacher attention block."""
    from .modeling import teacher_geometry

    _, heads, kv_heads, _ = teacher_geometry(teacher_config)
    init = _init_mamba2 if isinstance(mixer, Mamba2Mixer) else _init_mamba
    init(mixer, attn, heads, kv_heads)
