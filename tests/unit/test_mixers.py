"""The Mamba / Mamba2 mixer modules: configs, parameter layout, kernels, masks, decoding steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cald_scale.mixers import (
    Mamba2Config,
    Mamba2Mixer,
    Mamba2State,
    MambaConfig,
    MambaMixer,
    MambaState,
    build_mixer,
)

HIDDEN = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def mamba2_config(**overrides) -> Mamba2Config:
    # dt_min/dt_max raised so that the state actually carries information across tokens.
    base = dict(d_state=8, head_dim=8, n_groups=2, chunk_size=4, dt_min=0.05, dt_max=0.5, kernel="chunked")
    return Mamba2Config(**(base | overrides))


def mamba_config(**overrides) -> MambaConfig:
    return MambaConfig(**(dict(d_state=4, dt_min=0.05, dt_max=0.5, kernel="chunked") | overrides))


def make(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = mamba2_config(**overrides) if kind == "mamba2" else mamba_config(**overrides)
    return build_mixer(kind, config, HIDDEN, layer_idx=0)


def hidden(batch=2, seqlen=11, seed=1) -> torch.Tensor:
    return torch.randn(batch, seqlen, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("cls", [Mamba2Config, MambaConfig])
def test_config_round_trips_through_asdict(cls):
    config = cls(d_state=8, kernel="ref")
    data = dataclasses.asdict(config)
    assert cls(**data) == config
    # JSON / YAML give lists back for tuples.
    listed = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    assert cls(**listed) == config


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        Mamba2Config(64)  # type: ignore[misc]


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (Mamba2Config, dict(d_state=0), "d_state"),
        (Mamba2Config, dict(num_heads=6, n_groups=4), "n_groups"),
        (Mamba2Config, dict(A_init_range=(2.0, 1.0)), "A_init_range"),
        (Mamba2Config, dict(A_init_range=(1.0, 2.0, 3.0)), "A_init_range"),
        (Mamba2Config, dict(time_step_limit=(-1.0, 1.0)), "time_step_limit"),
        (Mamba2Config, dict(dt_min=0.1, dt_max=0.01), "dt_max"),
        (Mamba2Config, dict(kernel="triton"), "kernel"),
        (MambaConfig, dict(dt_rank=0), "dt_rank"),
        (MambaConfig, dict(expand=0), "expand"),
        (MambaConfig, dict(dt_init_floor=0.0), "dt_init_floor"),
    ],
)
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_mamba2_geometry_must_fit_hidden_size():
    with pytest.raises(ValueError, match="num_heads"):
        Mamba2Mixer(Mamba2Config(head_dim=8, num_heads=3), hidden_size=32)
    assert Mamba2Mixer(Mamba2Config(head_dim=8, d_state=4), hidden_size=32).num_heads == 4


def test_build_mixer_checks_kind_and_config():
    assert isinstance(make("mamba2"), Mamba2Mixer)
    assert isinstance(make("mamba"), MambaMixer)
    with pytest.raises(ValueError, match="mamba"):
        build_mixer("retnet", MambaConfig(), HIDDEN, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Mamba2Config"):
        build_mixer("mamba2", MambaConfig(), HIDDEN, 0)


# -------------------------------------------------------------------------- initialisation


def test_mamba2_init_follows_mamba_ssm():
    config = Mamba2Config(head_dim=8, d_state=4, dt_min=0.01, dt_max=0.2, A_init_range=(2.0, 5.0))
    mixer = Mamba2Mixer(config, hidden_size=64)
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 0.01 * (1 - 1e-4)).all() and (dt <= 0.2 * (1 + 1e-4)).all()
    A = torch.exp(mixer.A_log)
    assert (A >= 2.0 - 1e-5).all() and (A <= 5.0 + 1e-5).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))


def test_mamba_init_follows_mamba_ssm():
    mixer = MambaMixer(MambaConfig(d_state=5, dt_min=0.01, dt_max=0.2), hidden_size=HIDDEN)
    assert mixer.dt_rank == math.ceil(HIDDEN / 16)
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1.0, 6.0)).expand(2 * HIDDEN, -1))
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 0.01 * (1 - 1e-4)).all() and (dt <= 0.2 * (1 + 1e-4)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    expected = {
        "in_proj.weight": (4 * HIDDEN, HIDDEN),
        "conv1d.weight": (2 * HIDDEN, 1, 4),
        "conv1d.bias": (2 * HIDDEN,),
        "x_proj.weight": (mixer.dt_rank + 10, 2 * HIDDEN),
        "dt_proj.weight": (2 * HIDDEN, mixer.dt_rank),
        "dt_proj.bias": (2 * HIDDEN,),
        "A_log": (2 * HIDDEN, 5),
        "D": (2 * HIDDEN,),
        "out_proj.weight": (HIDDEN, 2 * HIDDEN),
    }
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == expected


# ------------------------------------------------------------------ parity with BambaMixer


def bamba_mixer_for(mixer: Mamba2Mixer):
    from transformers import BambaConfig
    from transformers.models.bamba.modeling_bamba import BambaMixer

    cfg = mixer.config
    bamba_config = BambaConfig(
        hidden_size=mixer.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=2 * mixer.hidden_size,
        vocab_size=16,
        attn_layer_indices=[],
        mamba_n_heads=mixer.num_heads,
        mamba_d_head=cfg.head_dim,
        mamba_d_state=cfg.d_state,
        mamba_n_groups=cfg.n_groups,
        mamba_expand=cfg.expand,
        mamba_d_conv=cfg.d_conv,
        mamba_chunk_size=cfg.chunk_size,
        mamba_conv_bias=cfg.conv_bias,
        mamba_proj_bias=cfg.proj_bias,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=mixer.activation,
        time_step_limit=cfg.time_step_limit,
    )
    return BambaMixer(bamba_config, layer_idx=0)


@pytest.mark.parametrize(
    "overrides", [{}, dict(n_groups=1, proj_bias=True, conv_bias=False), dict(time_step_limit=(0.5, float("inf"))), dict(time_step_limit=(0.0, 0.05))],
    ids=["default", "one_group_proj_bias", "dt_floor", "dt_cap"],
)
def test_mamba2_matches_bamba_mixer(overrides):
    """Against transformers' BambaMixer (its torch path): the same parameters, the same outputs,
    a time-step limit included (BambaMixer clamps softplus(dt + dt_bias) in its chunked scan)."""
    ours = make("mamba2", **overrides)
    bamba = bamba_mixer_for(ours)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in bamba.state_dict().items()}
    bamba.load_state_dict(ours.state_dict())
    x = hidden(seqlen=13)
    mask = torch.ones(2, 13)
    mask[0, :4] = 0  # left padding
    # NOTE: with in_proj's bias, Bamba lets the bias at the pads into the first real tokens' conv
    # window; ours zeroes it (a padded sequence equals itself alone), so padded inputs differ there.
    for attention_mask in (None, mask) if not ours.config.proj_bias else (None,):
        for training in (True, False):
            bamba.train(training)
            with torch.no_grad():
                expected = bamba(x, attention_mask=attention_mask)
                actual = ours(x, attention_mask=attention_mask)
            assert rel_err(actual, expected) < 1e-5


def test_mamba_matches_transformers_mamba_mixer():
    """Mamba-1 against transformers' MambaMixer (mamba_ssm's parameter names, its torch path): the
    mixer was checked only against this project's own references, and an x_proj split of
    (dt, C, B) for (dt, B, C) passed them all."""
    from transformers import MambaConfig as HFMambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    ours = make("mamba")
    hf = HFMambaMixer(
        HFMambaConfig(hidden_size=HIDDEN, state_size=ours.d_state, expand=2, conv_kernel=4, time_step_rank=ours.dt_rank,
                      use_conv_bias=True, use_bias=False),
        layer_idx=0,
    )
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = hidden(seqlen=13)
    with torch.no_grad():
        assert rel_err(ours(x), hf(x)) < 1e-5


# ---------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_ref_and_chunked_kernels_agree(kind):
    chunked, ref = make(kind, kernel="chunked"), make(kind, kernel="ref")
    ref.load_state_dict(chunked.state_dict())
    x1, x2 = hidden(seqlen=9).requires_grad_(), hidden(seqlen=9).requires_grad_()
    y1, y2 = chunked(x1), ref(x2)
    assert rel_err(y1, y2) < 1e-4
    weight = torch.randn_like(y1)
    (y1 * weight).sum().backward()
    (y2 * weight).sum().backward()
    assert rel_err(x1.grad, x2.grad) < 1e-4
    for (name, p1), p2 in zip(chunked.named_parameters(), ref.parameters()):
        assert rel_err(p1.grad, p2.grad) < 1e-4, name


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_cuda_kernel_on_cpu_fails_at_forward(kind):
    mixer = make(kind, kernel="cuda")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        mixer(hidden())


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_auto_kernel_runs_chunked_on_cpu(kind):
    mixer = make(kind, kernel="auto")
    assert mixer.kernel(torch.device("cpu")) == "chunked"
    assert mixer(hidden()).shape == (2, 11, HIDDEN)


# ------------------------------------------------------------------------ padding masks


@pytest.mark.parametrize("proj_bias", [False, True])
@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_left_padding_does_not_leak_into_tokens(kind, proj_bias):
    mixer = make(kind, proj_bias=proj_bias)
    x = hidden(batch=1, seqlen=8)
    padded = torch.cat([torch.randn(1, 3, HIDDEN) * 10, x], dim=1)  # garbage in the padding
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], dim=1)
    with torch.no_grad():
        expected = mixer(x)
        actual = mixer(padded, attention_mask=mask)[:, 3:]
    assert rel_err(actual, expected) < 1e-5


# ----------------------------------------------------------------------- decoding steps


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_step_matches_forward_token_by_token(kind):
    mixer = make(kind).eval()
    x = hidden(seqlen=10)
    with torch.no_grad():
        full, prefilled = mixer.prefill(x)
        state = mixer.allocate_state(2, device="cpu", dtype=torch.float32)
        assert isinstance(state, Mamba2State if kind == "mamba2" else MambaState)
        outs = []
        for t in range(10):
            y_t, state = mixer.step(x[:, t : t + 1], state)
            assert y_t.shape == (2, 1, HIDDEN)
            outs.append(y_t)
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-5
    assert rel_err(state.conv_state, prefilled.conv_state) < 1e-5
    assert rel_err(state.ssm_state, prefilled.ssm_state) < 1e-5
    assert torch.equal(full, mixer(x))


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_a_bf16_mixers_zero_state_has_prefills_dtypes(kind):
    """A bf16 model's decoding state as prefill leaves it (and generation caches it): the conv
    state in bf16, the SSM state in float32 (benchmarks/inference_speed.py allocates its decode
    state this way; in bf16 it had timed, and sized, a state generation never holds)."""
    mixer = make(kind).eval().to(torch.bfloat16)
    with torch.no_grad():
        _, prefilled = mixer.prefill(hidden(seqlen=6).to(torch.bfloat16))
    zero = mixer.allocate_state(2)
    assert (zero.conv_state.dtype, zero.ssm_state.dtype) == (prefilled.conv_state.dtype, prefilled.ssm_state.dtype) == (torch.bfloat16, torch.float32)
    assert zero.ssm_state.shape == prefilled.ssm_state.shape and zero.conv_state.shape == prefilled.conv_state.shape


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_prefill_then_steps_continue_the_sequence(kind):
    mixer = make(kind).eval()
    x = hidden(seqlen=9)
    with torch.no_grad():
        full = mixer(x)
        _, state = mixer.prefill(x[:, :2])  # shorter than d_conv: the conv state is left-padded
        outs = []
        for t in range(2, 9):
            y_t, state = mixer.step(x[:, t], state)  # (b, hidden) form
            outs.append(y_t)
    assert rel_err(torch.stack(outs, dim=1), full[:, 2:]) < 1e-5


def test_gated_rms_norm_matches_bamba():
    from transformers.models.bamba.modeling_bamba import BambaRMSNormGated

    from cald_scale.mixers.mamba2 import GatedRMSNorm

    gen = torch.Generator().manual_seed(0)
    ours, theirs = GatedRMSNorm(12, group_size=4, eps=1e-5), BambaRMSNormGated(12, group_size=4, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(12, generator=gen))
        theirs.weight.copy_(ours.weight)
    y1, z1 = (
        torch.randn(2, 5, 12, generator=gen).requires_grad_(),
        torch.randn(2, 5, 12, generator=gen).requires_grad_(),
    )
    y2, z2 = y1.detach().clone().requires_grad_(), z1.detach().clone().requires_grad_()
    out1, out2 = ours(y1, z1), theirs(y2, z2)
    assert rel_err(out1, out2) < 1e-6
    weight = torch.randn(out1.shape, generator=gen)
    (out1 * weight).sum().backward()
    (out2 * weight).sum().backward()
    for a, b in [(y1.grad, y2.grad), (z1.grad, z2.grad), (ours.weight.grad, theirs.weight.grad)]:
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_bf16_mixer_tracks_fp32(kind):
    mixer = make(kind)
    x = hidden(seqlen=9)
    expected = mixer(x)
    mixer_bf16 = make(kind).to(torch.bfloat16)
    mixer_bf16.load_state_dict(mixer.state_dict())
    x_bf16 = x.to(torch.bfloat16).requires_grad_()
    actual = mixer_bf16(x_bf16)
    assert actual.dtype == torch.bfloat16
    assert rel_err(actual.float(), expected) < 5e-2
    actual.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mixer_bf16.parameters())
    assert x_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(x_bf16.grad).all()


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_bf16_prefill_then_steps_equal_the_forward_bit_for_bit(kind):
    """The short conv sums in float32 (as causal-conv1d's kernels do), in one order for the
    sequence and the one-token step: a bf16 sum rounded after every tap made 60% of the cached
    outputs differ from the full forward's, and greedy decoding diverged."""
    torch.manual_seed(0)
    mixer = make(kind).eval()
    with torch.no_grad():
        mixer.conv1d.weight.normal_(0, 0.5)
    mixer = mixer.to(torch.bfloat16)
    x = torch.randn(4, 40, mixer.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        full = mixer(x)
        out, state = mixer.prefill(x[:, :8])
        outs = [out]
        for t in range(8, 40):
            y_t, state = mixer.step(x[:, t : t + 1], state)
            outs.append(y_t)
    assert torch.equal(torch.cat(outs, dim=1), full)
