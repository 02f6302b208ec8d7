"""The bidirectional mixers of the encoder track (Linformer, BiMamba2): padding exactness in
both scan directions, sharing modes, errors, configs and attention-informed init."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from cald_scale.config_loader import from_dict
from cald_scale.conversion.init import init_mixer_from_attention
from cald_scale.conversion.registry import AttentionWeights
from cald_scale.mixers import (
    MIXER_KINDS,
    BiMamba2Config,
    BiMamba2Mixer,
    LengthProjection,
    LinformerConfig,
    LinformerSelfAttention,
    Mamba2Config,
    build_mixer,
)
from cald_scale.mixers.bimamba2 import reverse_real_tokens

HIDDEN = 32
HEADS, HEAD_DIM, K, MAX_POS = 4, 8, 6, 16
LENGTHS = (5, 9, 12)  # true lengths of the batch's sequences; 12 > K so E/F really compress
SHARING = ("none", "kv", "layer")


def linformer_config(**overrides) -> LinformerConfig:
    return LinformerConfig(**(dict(num_heads=HEADS, head_dim=HEAD_DIM, k=K, max_positions=MAX_POS) | overrides))


def bimamba2_config(merge="add", **overrides) -> BiMamba2Config:
    # dt raised so that the state carries information across tokens (as in test_mixers).
    base = dict(d_state=8, head_dim=8, n_groups=2, chunk_size=4, dt_min=0.05, dt_max=0.5, kernel="chunked")
    return BiMamba2Config(mamba2=Mamba2Config(**(base | overrides)), merge=merge)


def make(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "bimamba2":
        return build_mixer("bimamba2", bimamba2_config(**overrides), HIDDEN)
    return build_mixer("linformer", linformer_config(**overrides), HIDDEN)


MIXERS = [
    pytest.param("linformer", dict(sharing="none"), id="linformer-none"),
    pytest.param("linformer", dict(sharing="kv"), id="linformer-kv"),
    pytest.param("linformer", dict(sharing="layer"), id="linformer-layer"),
    pytest.param("linformer", dict(output_proj=True), id="linformer-o_proj"),
    pytest.param("bimamba2", dict(), id="bimamba2-add"),
    pytest.param("bimamba2", dict(merge="mean"), id="bimamba2-mean"),
    pytest.param("bimamba2", dict(proj_bias=True), id="bimamba2-proj_bias"),
]


def sequences(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, HIDDEN, generator=g) for n in LENGTHS]


def batch(seqs: list[torch.Tensor], side: str, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest with large garbage on ``side``; returns hidden (b, l, hidden) and mask (b, l)."""
    g = torch.Generator().manual_seed(seed)
    seqlen = max(x.shape[1] for x in seqs)
    hidden = torch.randn(len(seqs), seqlen, HIDDEN, generator=g) * 10
    mask = torch.zeros(len(seqs), seqlen)
    for i, x in enumerate(seqs):
        real = slice(0, x.shape[1]) if side == "right" else slice(seqlen - x.shape[1], seqlen)
        hidden[i, real], mask[i, real] = x[0], 1
    return hidden, mask


def real_rows(out: torch.Tensor, mask: torch.Tensor, i: int) -> torch.Tensor:
    return out[i][mask[i].bool()]


# ------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("kind,overrides", MIXERS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_each_sequence_alone(kind, overrides, side):
    mixer = make(kind, **overrides)
    seqs = sequences()
    hidden, mask = batch(seqs, side)
    with torch.no_grad():
        out = mixer(hidden, attention_mask=mask)
        for i, x in enumerate(seqs):
            torch.testing.assert_close(real_rows(out, mask, i), mixer(x)[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[~mask.bool()], torch.zeros_like(out[~mask.bool()]))  # pads output zeros


@pytest.mark.parametrize("kind,overrides", MIXERS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pads_never_leak(kind, overrides, side):
    mixer = make(kind, **overrides)
    hidden, mask = batch(sequences(), side)
    other = torch.where(mask.bool().unsqueeze(-1), hidden, torch.randn_like(hidden) * 100)
    with torch.no_grad():
        assert torch.equal(mixer(hidden, mask)[mask.bool()], mixer(other, mask)[mask.bool()])


def test_reversal_keeps_pads_in_place():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    x = torch.arange(6.0).expand(3, 6).unsqueeze(-1)
    expected = torch.tensor([[0.0, 1, 4, 3, 2, 5], [5, 4, 3, 2, 1, 0], [2, 1, 0, 3, 4, 5]])
    assert torch.equal(reverse_real_tokens(x, mask)[..., 0], expected)
    assert torch.equal(reverse_real_tokens(reverse_real_tokens(x, mask), mask), x)


@pytest.mark.parametrize("side", ["right", "left"])
def test_bimamba2_backward_direction_is_bwd_on_the_flipped_sequence(side):
    mixer = make("bimamba2")
    seqs = sequences()
    hidden, mask = batch(seqs, side)
    with torch.no_grad():
        backward = mixer(hidden, mask) - mixer.fwd(hidden, mask)  # merge="add"
        for i, x in enumerate(seqs):
            expected = mixer.bwd(x.flip(1)).flip(1)[0]
            torch.testing.assert_close(real_rows(backward, mask, i), expected, atol=1e-5, rtol=1e-5)


def test_bimamba2_is_bidirectional():
    mixer = make("bimamba2")
    x = sequences()[1]
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mixer(x)[:, 0], mixer(changed)[:, 0])  # the first token sees the last
        assert torch.allclose(mixer.fwd(x)[:, 0], mixer.fwd(changed)[:, 0])  # fwd alone is causal


# ------------------------------------------------------------------ parameters and sharing


@pytest.mark.parametrize("kind,overrides", MIXERS)
def test_gradients_reach_every_parameter(kind, overrides):
    mixer = make(kind, **overrides)
    hidden, mask = batch(sequences(), "left")
    mixer(hidden, mask).square().sum().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_linformer_parameter_layout():
    mixer = make("linformer", sharing="none")
    width = HEADS * HEAD_DIM
    expected = {f"{p}_proj.weight": (width, HIDDEN) for p in "qkv"} | {f"{p}_proj.bias": (width,) for p in "qkv"}
    expected |= {"E.weight": (MAX_POS, K), "F.weight": (MAX_POS, K)}
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == expected
    assert mixer(sequences()[0]).shape == (1, LENGTHS[0], width)
    with_o = make("linformer", output_proj=True, proj_bias=False)
    assert tuple(with_o.o_proj.weight.shape) == (HIDDEN, width) and with_o.q_proj.bias is None
    # E and F start as N(0, 1).
    E = make("linformer", max_positions=4096, k=64).E.weight
    assert abs(E.mean().item()) < 0.01 and abs(E.std().item() - 1.0) < 0.01


def test_bimamba2_parameter_names():
    names = {name.split(".")[0] for name, _ in make("bimamba2").named_parameters()}
    assert names == {"fwd", "bwd"}
    mixer = make("bimamba2")
    assert not torch.equal(mixer.fwd.in_proj.weight, mixer.bwd.in_proj.weight)  # two independent directions


def two_layers(sharing: str) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    config = linformer_config(sharing=sharing)
    shared = LengthProjection.for_config(config) if sharing == "layer" else None
    return torch.nn.ModuleList(
        build_mixer("linformer", config, HIDDEN, idx, shared_projection=shared) for idx in range(2)
    )


@pytest.mark.parametrize("sharing,num_length_params", [("none", 4), ("kv", 2), ("layer", 1)])
def test_sharing_modes_count_length_projections(sharing, num_length_params):
    layers = two_layers(sharing)
    qkv = 2 * 3 * (HEADS * HEAD_DIM * (HIDDEN + 1))
    assert sum(p.numel() for p in layers.parameters()) == qkv + num_length_params * MAX_POS * K
    if sharing == "layer":
        assert layers[0].E.weight is layers[1].E.weight
        assert len(list(layers.parameters())) == 2 * 6 + 1


def test_layer_sharing_survives_state_dict_round_trip():
    layers = two_layers("layer")
    state = layers.state_dict()
    assert state["0.E.weight"].data_ptr() == state["1.E.weight"].data_ptr()
    fresh = two_layers("layer")
    with torch.no_grad():
        fresh[0].E.weight.zero_()
    fresh.load_state_dict(state)
    assert torch.equal(fresh[1].E.weight, layers[0].E.weight)
    assert fresh[0].E.weight is fresh[1].E.weight  # still one parameter after loading


def test_shared_projection_is_checked():
    with pytest.raises(ValueError, match="sharing"):
        build_mixer("linformer", linformer_config(sharing="kv"), HIDDEN, shared_projection=LengthProjection(MAX_POS, K))
    with pytest.raises(ValueError, match="max_positions"):
        build_mixer("linformer", linformer_config(sharing="layer"), HIDDEN, shared_projection=LengthProjection(8, K))
    with pytest.raises(ValueError, match="Linformer"):
        build_mixer("bimamba2", bimamba2_config(), HIDDEN, shared_projection=LengthProjection(MAX_POS, K))


# ------------------------------------------------------------------------ errors, configs


def test_too_long_input_names_max_positions():
    mixer = make("linformer")
    with pytest.raises(ValueError, match=rf"17 tokens.*max_positions={MAX_POS}"):
        mixer(torch.randn(1, MAX_POS + 1, HIDDEN))
    # A padded batch longer than max_positions is fine while every true length fits ...
    mask = torch.zeros(2, MAX_POS + 4)
    mask[0, :MAX_POS] = 1
    mask[1, 4:] = 1
    assert mixer(torch.randn(2, MAX_POS + 4, HIDDEN), mask).shape == (2, MAX_POS + 4, HEADS * HEAD_DIM)
    # ... but not when one is too long.
    mask[0, :] = 1
    with pytest.raises(ValueError, match=rf"{MAX_POS + 4} tokens.*max_positions={MAX_POS}"):
        mixer(torch.randn(2, MAX_POS + 4, HIDDEN), mask)


@pytest.mark.parametrize(
    "make_config,field",
    [
        (lambda: linformer_config(k=0), "k"),
        (lambda: linformer_config(max_positions=0), "max_positions"),
        (lambda: linformer_config(num_heads=0), "num_heads"),
        (lambda: linformer_config(head_dim=-1), "head_dim"),
        (lambda: linformer_config(sharing="all"), "sharing"),
        (lambda: linformer_config(dropout=1.0), "dropout"),
        (lambda: BiMamba2Config(merge="concat"), "merge"),
        (lambda: BiMamba2Config(mamba2="big"), "mamba2"),
        (lambda: bimamba2_config(d_state=0), "d_state"),
    ],
)
def test_bad_configs_name_the_field(make_config, field):
    with pytest.raises(ValueError, match=field):
        make_config()


def test_linformer_geometry_must_fit():
    with pytest.raises(ValueError, match="head_dim"):
        LinformerSelfAttention(LinformerConfig(head_dim=12), hidden_size=HIDDEN)
    assert LinformerSelfAttention(LinformerConfig(head_dim=8), hidden_size=HIDDEN).num_heads == 4


@pytest.mark.parametrize("config", [linformer_config(sharing="layer", dropout=0.1), bimamba2_config("mean")])
def test_configs_round_trip(config):
    data = dataclasses.asdict(config)
    assert from_dict(type(config), data) == config
    assert type(config)(**data) == config


def test_bidirectional_mixers_refuse_decoding():
    assert not MIXER_KINDS["linformer"][1].causal and not MIXER_KINDS["bimamba2"][1].causal
    assert MIXER_KINDS["mamba2"][1].causal and MIXER_KINDS["mamba"][1].causal
    x = sequences()[0]
    for kind in ("linformer", "bimamba2"):
        mixer = make(kind)
        with pytest.raises(TypeError, match="bidirectional"):
            mixer.prefill(x)
        with pytest.raises(TypeError, match="bidirectional"):
            mixer.step(x[:, :1], None)


# ------------------------------------------------------------------ attention-informed init


def teacher_attention(with_o: bool, seed: int = 3) -> AttentionWeights:
    g = torch.Generator().manual_seed(seed)
    width = HEADS * HEAD_DIM

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return AttentionWeights(
        q=rand(width, HIDDEN), k=rand(width, HIDDEN), v=rand(width, HIDDEN),
        o=rand(HIDDEN, width) if with_o else None,
        q_bias=rand(width), k_bias=rand(width), v_bias=rand(width),
        o_bias=rand(HIDDEN) if with_o else None,
    )  # fmt: skip


TEACHER = types.SimpleNamespace(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM)


@pytest.mark.parametrize("with_o", [False, True])
def test_attention_init_copies_qkv_into_linformer(with_o):
    mixer = make("linformer", output_proj=with_o)
    attn = teacher_attention(with_o)
    init_mixer_from_attention(mixer, attn, TEACHER)
    for name in ("q", "k", "v") + (("o",) if with_o else ()):
        proj = getattr(mixer, f"{name}_proj")
        assert torch.equal(proj.weight, getattr(attn, name)), name
        assert torch.equal(proj.bias, getattr(attn, f"{name}_bias")), name


def test_attention_init_copies_o_or_identity_into_linformer_o_proj():
    mixer = make("linformer", output_proj=True)
    init_mixer_from_attention(mixer, teacher_attention(with_o=False), TEACHER)
    assert torch.equal(mixer.o_proj.weight, torch.eye(HIDDEN))
    assert torch.equal(mixer.o_proj.bias, torch.zeros(HIDDEN))


def bimamba2_teacher_matched() -> BiMamba2Mixer:
    # The geometry match_teacher_geometry gives: one group per head, d_state = head_dim.
    torch.manual_seed(0)
    return make("bimamba2", num_heads=HEADS, head_dim=HEAD_DIM, d_state=HEAD_DIM, n_groups=HEADS)


@pytest.mark.parametrize("with_o", [False, True])
def test_attention_init_of_bimamba2(with_o):
    mixer = bimamba2_teacher_matched()
    attn = teacher_attention(with_o)
    init_mixer_from_attention(mixer, attn, TEACHER)
    width = HEADS * HEAD_DIM
    for direction in (mixer.fwd, mixer.bwd):
        w = direction.in_proj.weight  # rows: [z | x | B | C | dt]
        assert torch.equal(w[width : 2 * width], attn.v)
        assert torch.equal(w[2 * width : 3 * width], attn.k)
        assert torch.equal(w[3 * width : 4 * width], attn.q)
        assert torch.equal(direction.out_proj.weight, attn.o if with_o else torch.eye(HIDDEN))
