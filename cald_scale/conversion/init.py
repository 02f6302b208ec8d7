"""Attention-informed mixer initialisation ("The Mamba in the Llama", Wang et al. 2024).

Linear attention reads y_t = sum_s (q_t . k_s) v_s; an SSM reads y_t = sum_s C_t (decay) B_s x_s.
So C <- Q, B <- K, x <- V and out_proj <- O; grouped KV heads are repeated to all heads.
Linformer keeps softmax attention, so it takes Q/K/V (and O) as they are. A family that keeps
O outside the attention slot (BERT) gives no O: the mixer's out_proj then starts as the identity.
The teacher's q/k/v/o biases (qwen2, gpt_neox, BERT) go where their weights go when the mixer has
biases (``proj_bias``); without them they are dropped, and said so once.

Each init writes the mixer's biases and returns its weights' rows as ``RowCopy``s, done by
``_write_rows`` on the rows this process keeps (all of them, or a ZeRO-3 rank's range, whose
teacher rows alone are read: ``attention_rows.py``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..mixers import BiMamba2Mixer, LinformerSelfAttention, Mamba2Mixer, MambaMixer
from .attention_rows import FIELDS, AttentionRows, WholeAttention
from .registry import AttentionWeights

__all__ = ["init_mixer_from_attention"]

logger = logging.getLogger(__name__)
_warned_dropped_bias = False


@dataclasses.dataclass(frozen=True)
class RowCopy:
    """Rows ``start ..`` of mixer weight ``target`` <- rows ``index`` of the teacher's ``field``
    (``q``, ``k``, ``v``, ``o``; None: the identity), each repeated ``tiles`` times along its
    columns and divided by ``tiles``."""

    target: str
    start: int
    field: str | None
    index: torch.Tensor
    tiles: int = 1


def _copy_biases(mixer: nn.Module, attn: AttentionRows, rows: list[tuple[slice, torch.Tensor | None]]) -> None:
    """The teacher's biases into the mixer's in_proj rows and out_proj (zeros where it has none);
    without biases in the mixer, a note that they are dropped (once per process)."""
    if mixer.in_proj.bias is None:
        if any(attn.bias(f) is not None for f in FIELDS):
            _say_biases_dropped(mixer)
        return
    mixer.in_proj.bias.zero_()
    for where, bias in rows:
        if bias is not None:
            mixer.in_proj.bias[where].copy_(bias)
    if mixer.out_proj.bias is not None:
        o_bias = attn.bias("o")
        mixer.out_proj.bias.copy_(o_bias if o_bias is not None else torch.zeros_like(mixer.out_proj.bias))


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


def _head_rows(rows: int, kv_heads: int, heads: int) -> torch.Tensor:
    """For each of the ``heads x head_dim`` rows, its row of a (kv_heads x head_dim) projection:
    each KV head repeated for its query group."""
    head_dim = rows // kv_heads
    out = torch.arange(heads * head_dim)
    return out // (head_dim * (heads // kv_heads)) * head_dim + out % head_dim


def _repeat_bias(bias: torch.Tensor | None, kv_heads: int, heads: int) -> torch.Tensor | None:
    """A (kv_heads x head_dim,) bias with each KV head repeated for its query group; None stays None."""
    return None if bias is None else bias[_head_rows(len(bias), kv_heads, heads)]


def _output_copy(attn: AttentionRows, target: str, out_features: int, in_features: int, tiles: int = 1) -> RowCopy:
    """The teacher's O into ``target``, or the identity when the family keeps O outside the slot."""
    if attn.shape("o") is not None:
        return RowCopy(target, 0, "o", torch.arange(out_features), tiles)
    if out_features != in_features:
        raise ValueError(
            f"the teacher keeps its output projection outside the attention slot, so out_proj starts as "
            f"the identity, which needs a square out_proj; got ({out_features}, {in_features})"
        )
    return RowCopy(target, 0, None, torch.arange(out_features), tiles)


def _init_mamba2(mixer: nn.Module, attn: AttentionRows, heads: int, kv_heads: int, prefix: str = "") -> list[RowCopy]:
    cfg = mixer.config
    width = mixer.num_heads * cfg.head_dim
    state_width = cfg.n_groups * cfg.d_state
    if not (mixer.num_heads == heads and cfg.n_groups == heads and state_width == attn.shape("q")[0] == width):
        raise ValueError(
            "attention_init for mamba2 needs the teacher-matched geometry "
            "(student.conversion.match_teacher_geometry=true)"
        )
    # in_proj rows: [z | x | B | C | dt]
    x_rows = slice(width, 2 * width)
    b_rows = slice(2 * width, 2 * width + state_width)
    c_rows = slice(2 * width + state_width, 2 * width + 2 * state_width)
    _copy_biases(mixer, attn, [
        (x_rows, _repeat_bias(attn.bias("v"), kv_heads, heads)), (b_rows, _repeat_bias(attn.bias("k"), kv_heads, heads)), (c_rows, attn.bias("q")),
    ])
    in_proj = f"{prefix}in_proj.weight"
    return [
        RowCopy(in_proj, x_rows.start, "v", _head_rows(attn.shape("v")[0], kv_heads, heads)),
        RowCopy(in_proj, b_rows.start, "k", _head_rows(attn.shape("k")[0], kv_heads, heads)),
        RowCopy(in_proj, c_rows.start, "q", torch.arange(state_width)),
        _output_copy(attn, f"{prefix}out_proj.weight", *mixer.out_proj.weight.shape),
    ]


def _init_bimamba2(mixer: nn.Module, attn: AttentionRows, heads: int, kv_heads: int) -> list[RowCopy]:
    # Both scan directions read the same attention: each starts as the Mamba2 init.
    return _init_mamba2(mixer.fwd, attn, heads, kv_heads, "fwd.") + _init_mamba2(mixer.bwd, attn, heads, kv_heads, "bwd.")


def _init_mamba(mixer: nn.Module, attn: AttentionRows, heads: int, kv_heads: int) -> list[RowCopy]:
    # Mamba's per-channel SSM has no Q/K slots; map V onto the x branch and O onto out_proj,
    # tiling across the (usually 2x) wider inner dimension and scaling so outputs keep their size.
    d_inner = mixer.out_proj.weight.shape[1]
    v_rows = _head_rows(attn.shape("v")[0], kv_heads, heads)
    if d_inner % len(v_rows) != 0:
        raise ValueError(f"attention_init for mamba needs d_inner ({d_inner}) to be a multiple of {len(v_rows)}")
    tiles = d_inner // len(v_rows)
    v_bias = _repeat_bias(attn.bias("v"), kv_heads, heads)
    _copy_biases(mixer, attn, [(slice(0, d_inner), None if v_bias is None else v_bias.repeat(tiles))])
    return [
        RowCopy("in_proj.weight", 0, "v", v_rows.repeat(tiles)),
        _output_copy(attn, "out_proj.weight", mixer.out_proj.weight.shape[0], len(v_rows), tiles),
    ]


def _init_linformer(mixer: nn.Module, attn: AttentionRows, heads: int, kv_heads: int) -> list[RowCopy]:
    # Same softmax attention, so Q/K/V (and O) carry over exactly; E and F stay random.
    width = mixer.num_heads * mixer.head_dim
    if not (mixer.num_heads == heads and attn.shape("q")[0] == width):
        raise ValueError(
            f"attention_init for linformer needs the teacher's heads ({heads}) and width ({attn.shape('q')[0]}); "
            f"the mixer has {mixer.num_heads} heads of {mixer.head_dim}"
        )
    copies = [
        RowCopy("q_proj.weight", 0, "q", torch.arange(width)),
        RowCopy("k_proj.weight", 0, "k", _head_rows(attn.shape("k")[0], kv_heads, heads)),
        RowCopy("v_proj.weight", 0, "v", _head_rows(attn.shape("v")[0], kv_heads, heads)),
    ]
    biases = [(mixer.q_proj, attn.bias("q")), (mixer.k_proj, _repeat_bias(attn.bias("k"), kv_heads, heads)), (mixer.v_proj, _repeat_bias(attn.bias("v"), kv_heads, heads))]
    if mixer.o_proj is not None:
        copies.append(_output_copy(attn, "o_proj.weight", *mixer.o_proj.weight.shape))
        biases.append((mixer.o_proj, attn.bias("o")))
    for linear, bias in biases:
        if linear.bias is not None:
            # A teacher without this bias acts as one of zeros.
            linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))
        elif bias is not None:
            _say_biases_dropped(mixer)
    return copies


def _write_rows(mixer: nn.Module, copies: list[RowCopy], attn: AttentionRows, kept: dict[str, tuple[int, int]]) -> None:
    """Do ``copies``, only on the rows of each weight that lie in its ``kept`` flat range (all of
    a weight not named there); each projection's rows are asked for once, for all copies."""
    weights = dict(mixer.named_parameters())
    todo = []
    for copy in copies:
        weight = weights[copy.target]
        first, stop = copy.start, copy.start + len(copy.index)
        if (kept_range := kept.get(copy.target)) is not None:
            columns = weight.shape[1]
            first, stop = max(first, kept_range[0] // columns), min(stop, -(-kept_range[1] // columns))
        if first < stop:
            todo.append((copy, weight, first, stop))
    asked: dict[str, list[torch.Tensor]] = {}
    for copy, _, first, stop in todo:
        if copy.field is not None:
            asked.setdefault(copy.field, []).append(copy.index[first - copy.start : stop - copy.start])
    read = {}
    for field, parts in asked.items():
        index = torch.cat(parts).unique()
        read[field] = (index, attn.rows(field, index))
    for copy, weight, first, stop in todo:
        index = copy.index[first - copy.start : stop - copy.start]
        if copy.field is None:  # the identity's rows
            rows = torch.zeros(len(index), weight.shape[1] // copy.tiles).scatter_(1, index[:, None], 1.0)
        else:
            have, block = read[copy.field]
            rows = block[torch.searchsorted(have, index)]
        weight[first:stop].copy_(rows if copy.tiles == 1 else rows.repeat(1, copy.tiles) / copy.tiles)


_INITS = {
    Mamba2Mixer: _init_mamba2,
    MambaMixer: _init_mamba,
    BiMamba2Mixer: _init_bimamba2,
    LinformerSelfAttention: _init_linformer,
}


def attention_shape_errors(attn: AttentionWeights | AttentionRows, teacher_config) -> list[str]:
    """"name got != wanted" for each projection whose shape is not what the config's heads give
    (an absent output projection is the family's: BERT keeps it outside the slot)."""
    from .modeling import teacher_geometry

    if isinstance(attn, AttentionWeights):
        attn = WholeAttention(attn)
    hidden, heads, kv_heads, head_dim = teacher_geometry(teacher_config)
    wanted = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden), "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim)}
    got = {name: attn.shape(name) for name in wanted}
    return [f"{name} {got[name]} != {shape}" for name, shape in wanted.items() if got[name] != shape and not (name == "o" and got[name] is None)]


def check_attention_weights(attn: AttentionWeights | AttentionRows, teacher_config, where: str) -> None:
    """The projections read from a teacher checkpoint have its config's shapes (a checkpoint of
    another model is named here, not as a size mismatch deep in the init)."""
    from .modeling import teacher_geometry

    if wrong := attention_shape_errors(attn, teacher_config):
        hidden, heads, kv_heads, head_dim = teacher_geometry(teacher_config)
        raise ValueError(
            f"the teacher's weights do not fit its config at {where} ({heads} heads, {kv_heads} key/value heads, head_dim "
            f"{head_dim}, hidden {hidden}): {', '.join(wrong)}; the checkpoint and the config are of different models"
        )


@torch.no_grad()
def init_mixer_from_attention(
    mixer: nn.Module, attn: AttentionWeights | AttentionRows, teacher_config, kept: dict[str, tuple[int, int]] | None = None
) -> None:
    """Overwrite a fresh (plain, unpartitioned) mixer's projections from one teacher attention block.

    ``kept``: for a weight named there, only the rows covering that range of its flattened
    values are written (the rest keep their fresh values): a ZeRO-3 rank keeps no more of them,
    and reads only those rows of the teacher's projections."""
    from .modeling import teacher_geometry

    if isinstance(attn, AttentionWeights):
        attn = WholeAttention(attn)
    _, heads, kv_heads, _ = teacher_geometry(teacher_config)
    init = next((fn for cls, fn in _INITS.items() if isinstance(mixer, cls)), None)
    if init is None:
        raise TypeError(f"no attention-informed init for {type(mixer).__name__}; known: {[c.__name__ for c in _INITS]}")
    _write_rows(mixer, init(mixer, attn, heads, kv_heads), attn, kept or {})
