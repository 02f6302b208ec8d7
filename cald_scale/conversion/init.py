"""Attention-informed mixer initialisation ("The Mamba in the Llama", Wang et al. 2024).

Linear attention reads y_t = sum_s (q_t . k_s) v_s; an SSM reads y_t = sum_s C_t (decay) B_s x_s.
So C <- Q, B <- K, x <- V and out_proj <- O; grouped KV heads are repeated to all heads.
Linformer keeps softmax attention, so it takes Q/K/V (and O) as they are. A family that keeps
O outside the attention slot (BERT) gives no O: the mixer's out_proj then starts as the identity.
The teacher's q/k/v/o biases (qwen2, gpt_neox, BERT) go where their weights go when the mixer has
biases (``proj_bias``); without them they are dropped, and said so once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..mixers import BiMamba2Mixer, LinformerSelfAttention, Mamba2Mixer, MambaMixer
from .registry import AttentionWeights

__all__ = ["init_mixer_from_attention"]

logger = logging.getLogger(__name__)
_warned_dropped_bias = False


def _copy_biases(mixer: nn.Module, attn: AttentionWeights, rows: list[tuple[slice, torch.Tensor | None]]) -> None:
    """The teacher's biases into the mixer's in_proj rows and out_proj (zeros where it has none);
    without biases in the mixer, a note that they are dropped (once per process)."""
    if mixer.in_proj.bias is None:
        if any(b is not None for b in (attn.q_bias, attn.k_bias, attn.v_bias, attn.o_bias)):
            _say_biases_dropped(mixer)
        return
    mixer.in_proj.bias.zero_()
    for where, bias in rows:
        if bias is not None:
            mixer.in_proj.bias[where].copy_(bias)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(attn.o_bias if attn.o_bias is not None else torch.zeros_like(mixer.out_proj.bias))


def _say_biases_dropped(mixer: nn.Module) -> None:
    """The teacher's attention biases have no place in ``mixer`` (no proj_bias): said once per process."""
    global _warned_dropped_bias
    if not _warned_dropped_bias:
        _warned_dropped_bias = True
        logger.warning(
            "the teacher's attention has biases, which this %s mixer (no proj_bias) cannot take: the "
            "attention-informed init drops them (set the mixer's proj_bias: true to carry them over)",
            type(mixer).__name__,
        )


def _repeat_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(kv_heads*head_dim, in) -> (heads*head_dim, in), each KV head repeated for its query group."""
    head_dim = weight.shape[0] // kv_heads
    return weight.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, -1)


def _repeat_bias(bias: torch.Tensor | None, kv_heads: int, heads: int) -> torch.Tensor | None:
    """_repeat_heads for a bias (kv_heads*head_dim,); None stays None."""
    return None if bias is None else _repeat_heads(bias, kv_heads, heads).squeeze(-1)


def _output_weight(attn: AttentionWeights, out_features: int, in_features: int) -> torch.Tensor:
    """The teacher's O, or the identity when the family keeps O outside the slot."""
    if attn.o is not None:
        return attn.o
    if out_features != in_features:
        raise ValueError(
            f"the teacher keeps its output projection outside the attention slot, so out_proj starts as "
            f"the identity, which needs a square out_proj; got ({out_features}, {in_features})"
        )
    return torch.eye(out_features)


@torch.no_grad()
def _init_mamba2(mixer: nn.Module, attn: AttentionWeights, heads: int, kv_heads: int) -> None:
    cfg = mixer.config
    width = mixer.num_heads * cfg.head_dim
    state_width = cfg.n_groups * cfg.d_state
    if not (mixer.num_heads == heads and cfg.n_groups == heads and state_width == attn.q.shape[0] == width):
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
    mixer.out_proj.weight.copy_(_output_weight(attn, *mixer.out_proj.weight.shape))
    _copy_biases(mixer, attn, [
        (x_rows, _repeat_bias(attn.v_bias, kv_heads, heads)), (b_rows, _repeat_bias(attn.k_bias, kv_heads, heads)), (c_rows, attn.q_bias),
    ])


@torch.no_grad()
def _init_bimamba2(mixer: nn.Module, attn: AttentionWeights, heads: int, kv_heads: int) -> None:
    # Both scan directions read the same attention: each starts as the Mamba2 init.
    _init_mamba2(mixer.fwd, attn, heads, kv_heads)
    _init_mamba2(mixer.bwd, attn, heads, kv_heads)


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
    o = _output_weight(attn, mixer.out_proj.weight.shape[0], v.shape[0])
    mixer.out_proj.weight.copy_(o.repeat(1, tiles) / tiles)
    v_bias = _repeat_bias(attn.v_bias, kv_heads, heads)
    _copy_biases(mixer, attn, [(slice(0, d_inner), None if v_bias is None else v_bias.repeat(tiles))])


@torch.no_grad()
def _init_linformer(mixer: nn.Module, attn: AttentionWeights, heads: int, kv_heads: int) -> None:
    # Same softmax attention, so Q/K/V (and O) carry over exactly; E and F stay random.
    width = mixer.num_heads * mixer.head_dim
    if not (mixer.num_heads == heads and attn.q.shape[0] == width):
        raise ValueError(
            f"attention_init for linformer needs the teacher's heads ({heads}) and width ({attn.q.shape[0]}); "
            f"the mixer has {mixer.num_heads} heads of {mixer.head_dim}"
        )

    projections = [
        (mixer.q_proj, attn.q, attn.q_bias),
        (mixer.k_proj, _repeat_heads(attn.k, kv_heads, heads), _repeat_bias(attn.k_bias, kv_heads, heads)),
        (mixer.v_proj, _repeat_heads(attn.v, kv_heads, heads), _repeat_bias(attn.v_bias, kv_heads, heads)),
    ]
    if mixer.o_proj is not None:
        projections.append((mixer.o_proj, _output_weight(attn, *mixer.o_proj.weight.shape), attn.o_bias))
    for linear, weight, bias in projections:
        linear.weight.copy_(weight)
        if linear.bias is not None:
            # A teacher without this bias acts as one of zeros.
            linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))
        elif bias is not None:
            _say_biases_dropped(mixer)


_INITS = {
    Mamba2Mixer: _init_mamba2,
    MambaMixer: _init_mamba,
    BiMamba2Mixer: _init_bimamba2,
    LinformerSelfAttention: _init_linformer,
}


def attention_shape_errors(attn: AttentionWeights, teacher_config) -> list[str]:
    """"name got != wanted" for each projection whose shape is not what the config's heads give
    (an absent output projection is the family's: BERT keeps it outside the slot)."""
    from .modeling import teacher_geometry

    hidden, heads, kv_heads, head_dim = teacher_geometry(teacher_config)
    wanted = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden), "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim)}
    got = {name: None if (t := getattr(attn, name)) is None else tuple(t.shape) for name in wanted}
    return [f"{name} {got[name]} != {shape}" for name, shape in wanted.items() if got[name] != shape and not (name == "o" and got[name] is None)]


def check_attention_weights(attn: AttentionWeights, teacher_config, where: str) -> None:
    """The projections read from a teacher checkpoint have its config's shapes (a checkpoint of
    another model is named here, not as a size mismatch deep in the init)."""
    from .modeling import teacher_geometry

    if wrong := attention_shape_errors(attn, teacher_config):
        hidden, heads, kv_heads, head_dim = teacher_geometry(teacher_config)
        raise ValueError(
            f"the teacher's weights do not fit its config at {where} ({heads} heads, {kv_heads} key/value heads, head_dim "
            f"{head_dim}, hidden {hidden}): {', '.join(wrong)}; the checkpoint and the config are of different models"
        )


def init_mixer_from_attention(mixer: nn.Module, attn: AttentionWeights, teacher_config) -> None:
    """Overwrite a fresh (plain, unpartitioned) mixer's projections from one teacher attention block."""
    from .modeling import teacher_geometry

    _, heads, kv_heads, _ = teacher_geometry(teacher_config)
    init = next((fn for cls, fn in _INITS.items() if isinstance(mixer, cls)), None)
    if init is None:
        raise TypeError(f"no attention-informed init for {type(mixer).__name__}; known: {[c.__name__ for c in _INITS]}")
    init(mixer, attn, heads, kv_heads)
