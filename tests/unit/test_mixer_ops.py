"""Parity of the mixer ops: chunked / fast CPU paths against their sequential references."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_on_ranks

from cald_scale.mixers.ops import (
    causal_conv1d,
    causal_conv1d_update,
    dispatch,
    resolve_kernel,
    selective_scan_cpu,
    selective_scan_ref,
    selective_state_update,
    ssd_chunked,
    ssd_ref,
    ssd_step,
)

RTOL = 1e-4  # fp32, relative to the largest magnitude of the reference


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, name: str = "") -> None:
    assert actual is not None, f"{name}: missing"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def grads(out, inputs, seed: int = 0):
    """Gradients of a fixed random projection of ``out`` (a tensor or a tuple of tensors)."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ---------------------------------------------------------------------------- SSD (Mamba2)


def ssd_inputs(batch=2, seqlen=23, heads=4, headdim=8, groups=2, dstate=6, dt_scale=1.0, A_scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, seqlen, heads, headdim, generator=gen),
        dt=torch.rand(batch, seqlen, heads, generator=gen) * dt_scale + 0.01,
        A=-(torch.rand(heads, generator=gen) * A_scale + 0.1),
        B=torch.randn(batch, seqlen, groups, dstate, generator=gen),
        C=torch.randn(batch, seqlen, groups, dstate, generator=gen),
        D=torch.randn(heads, generator=gen),
        initial_state=torch.randn(batch, heads, headdim, dstate, generator=gen),
    )


def _leaves(inputs):
    return {k: v.clone().requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("groups", [1, 2])
# (301, 4): 76 chunks, past _SCAN_CHUNKS_FROM, so the chunk states come from the sequential scan.
@pytest.mark.parametrize("seqlen,chunk_size", [(16, 4), (23, 4), (23, 7), (16, 16), (9, 32), (301, 4)])
def test_ssd_chunked_matches_ref(seqlen, chunk_size, groups):
    inputs = ssd_inputs(seqlen=seqlen, groups=groups)
    ref_in, chk_in = _leaves(inputs), _leaves(inputs)
    y_ref = ssd_ref(**ref_in, return_final_state=True)
    y_chk = ssd_chunked(**chk_in, chunk_size=chunk_size, return_final_state=True)
    assert_close(y_chk[0], y_ref[0], name="y")
    assert_close(y_chk[1], y_ref[1], name="final_state")
    for name, g_chk, g_ref in zip(ref_in, grads(y_chk, list(chk_in.values())), grads(y_ref, list(ref_in.values()))):
        assert_close(g_chk, g_ref, name=f"grad {name}")


def test_ssd_chunked_without_optional_inputs():
    inputs = ssd_inputs()
    del inputs["initial_state"], inputs["D"]
    assert_close(ssd_chunked(**inputs, chunk_size=5), ssd_ref(**inputs))


def test_ssd_chunked_strong_decay_is_stable():
    # dt * |A| = 50 per step: a chunk of 8 sums to 400, far past exp's fp32 range (~88).
    inputs = ssd_inputs(seqlen=24, dt_scale=0.0, A_scale=0.0)
    inputs["dt"] = torch.full_like(inputs["dt"], 5.0)
    inputs["A"] = torch.full_like(inputs["A"], -10.0)
    ref_in, chk_in = _leaves(inputs), _leaves(inputs)
    y_ref = ssd_ref(**ref_in, return_final_state=True)
    y_chk = ssd_chunked(**chk_in, chunk_size=8, return_final_state=True)
    assert_close(y_chk[0], y_ref[0], name="y")
    assert_close(y_chk[1], y_ref[1], name="final_state")
    for name, g_chk, g_ref in zip(ref_in, grads(y_chk, list(chk_in.values())), grads(y_ref, list(ref_in.values()))):
        assert_close(g_chk, g_ref, name=f"grad {name}")


def test_ssd_chunked_bf16_runs_in_fp32():
    inputs = ssd_inputs()
    y = ssd_chunked(**{k: v.to(torch.bfloat16) for k, v in inputs.items()}, chunk_size=8)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ssd_ref(**inputs), rtol=3e-2)


def test_ssd_step_matches_ref():
    inputs = ssd_inputs(seqlen=7)
    y_ref, final_ref = ssd_ref(**inputs, return_final_state=True)
    state = inputs["initial_state"]
    for t in range(7):
        y_t, state = ssd_step(
            inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t], inputs["D"], state
        )
        assert_close(y_t, y_ref[:, t], name=f"y[{t}]")
    assert_close(state, final_ref, name="state")


# ------------------------------------------------------------------ selective scan (Mamba)


def scan_inputs(batch=2, dim=6, seqlen=37, dstate=4, delta_shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=gen),
        delta=torch.randn(batch, dim, seqlen, generator=gen) * 0.5 + delta_shift,
        A=-torch.rand(dim, dstate, generator=gen) * 3 - 0.1,
        B=torch.randn(batch, dstate, seqlen, generator=gen),
        C=torch.randn(batch, dstate, seqlen, generator=gen),
        D=torch.randn(dim, generator=gen),
        z=torch.randn(batch, dim, seqlen, generator=gen),
        delta_bias=torch.randn(dim, generator=gen) * 0.1,
    )


@pytest.mark.parametrize("seqlen", [5, 16, 37])
@pytest.mark.parametrize(
    "use_z,softplus,use_D", [(True, True, True), (False, True, False), (True, False, True), (False, False, False)]
)
def test_selective_scan_cpu_matches_ref(seqlen, use_z, softplus, use_D):
    inputs = scan_inputs(seqlen=seqlen)
    if not use_z:
        del inputs["z"]
    if not use_D:
        del inputs["D"]
    if not softplus:  # delta must then be positive on its own
        inputs["delta"] = inputs["delta"].abs() + 0.01
        del inputs["delta_bias"]
    ref_in, cpu_in = _leaves(inputs), _leaves(inputs)
    out_ref = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    out_cpu = selective_scan_cpu(**cpu_in, delta_softplus=softplus, return_last_state=True)
    assert_close(out_cpu[0], out_ref[0], name="out")
    assert_close(out_cpu[1], out_ref[1], name="last_state")
    for name, g_cpu, g_ref in zip(ref_in, grads(out_cpu, list(cpu_in.values())), grads(out_ref, list(ref_in.values()))):
        assert_close(g_cpu, g_ref, name=f"grad {name}")


def test_selective_scan_cpu_strong_decay_is_stable():
    # softplus(delta) ~ 40 with |A| up to 3: per-step log-decays near -120 (exp underflows).
    inputs = scan_inputs(delta_shift=40.0)
    ref_in, cpu_in = _leaves(inputs), _leaves(inputs)
    out_ref = selective_scan_ref(**ref_in, delta_softplus=True)
    out_cpu = selective_scan_cpu(**cpu_in, delta_softplus=True)
    assert_close(out_cpu, out_ref, name="out")
    for name, g_cpu, g_ref in zip(ref_in, grads(out_cpu, list(cpu_in.values())), grads(out_ref, list(ref_in.values()))):
        assert_close(g_cpu, g_ref, name=f"grad {name}")


def test_selective_scan_cpu_float64_gradcheck():
    inputs = {k: v.double().requires_grad_() for k, v in scan_inputs(dim=3, seqlen=18, dstate=2).items()}
    names = list(inputs)
    fn = lambda *args: selective_scan_cpu(**dict(zip(names, args)), delta_softplus=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


def test_selective_state_update_matches_ref():
    inputs = scan_inputs(seqlen=6)
    out_ref, last_ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4)
    for t in range(6):
        y_t, state = selective_state_update(
            state,
            inputs["u"][..., t],
            inputs["delta"][..., t],
            inputs["A"],
            inputs["B"][..., t],
            inputs["C"][..., t],
            inputs["D"],
            z_t=inputs["z"][..., t],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        )
        assert_close(y_t, out_ref[..., t], name=f"y[{t}]")
    assert_close(state, last_ref, name="state")


# ---------------------------------------------------------------------------- causal conv


@pytest.mark.parametrize("seqlen", [2, 11])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_conv1d(channels_last, activation, seqlen):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, seqlen, generator=gen)
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_()
    weight = torch.randn(5, 4, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    y = causal_conv1d(x, weight, bias, activation)
    ref = F.conv1d(x, weight.unsqueeze(1), bias, padding=3, groups=5)[..., :seqlen]
    ref = F.silu(ref) if activation else ref
    assert_close(y, ref)
    for g, g_ref in zip(grads(y, [x, weight, bias]), grads(ref, [x, weight, bias])):
        assert_close(g, g_ref)


def test_causal_conv1d_update_matches_full():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, generator=gen)
    weight, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    full = causal_conv1d(x, weight, bias, "silu")
    state = torch.zeros(2, 5, 4)
    for t in range(9):
        before = state.clone()
        y_t, new_state = causal_conv1d_update(x[..., t], state, weight, bias, "silu")
        assert torch.equal(state, before), "the given state must not be modified"
        state = new_state
        assert_close(y_t, full[..., t])
    assert torch.equal(state, x[..., -4:])


def _step_cases(state_dtype, x_dtype, width=4):
    """(name, step(state, inplace) -> (y, new state), initial state) for the three one-token ops;
    inputs in ``x_dtype``, the state in ``state_dtype`` (a bf16 model keeps an fp32 SSM state)."""
    s = {k: v[:, 0] if k in ("x", "dt", "B", "C") else v for k, v in ssd_inputs(seqlen=1, groups=2).items()}
    scan = {k: v[..., 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in scan_inputs(seqlen=1).items()}
    s, scan = ({k: v.to(x_dtype) for k, v in d.items()} for d in (s, scan))
    gen = torch.Generator().manual_seed(1)
    x_t, weight, bias = (torch.randn(*shape, generator=gen).to(x_dtype) for shape in ((2, 5), (5, width), (5,)))
    return [
        ("ssd_step", lambda st, ip: ssd_step(s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], st, inplace=ip),
         s["initial_state"].to(state_dtype)),
        ("selective_state_update", lambda st, ip: selective_state_update(
            st, scan["u"], scan["delta"], scan["A"], scan["B"], scan["C"], scan["D"], z_t=scan["z"],
            dt_bias=scan["delta_bias"], dt_softplus=True, inplace=ip), torch.randn(2, 6, 4, generator=gen).to(state_dtype)),
        ("causal_conv1d_update", lambda st, ip: causal_conv1d_update(x_t, st, weight, bias, "silu", inplace=ip),
         torch.randn(2, 5, width, generator=gen).to(state_dtype)),
    ]


@pytest.mark.parametrize(
    "state_dtype,x_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)],
)
@pytest.mark.parametrize("case", range(3))
def test_steps_in_place_update_the_given_state_and_equal_the_copying_step(case, state_dtype, x_dtype):
    name, step, state = _step_cases(state_dtype, x_dtype)[case]
    y_copy, new_copy = step(state.clone(), False)
    given = state.clone()
    y, new = step(given, True)
    assert new is given, f"{name}: an in-place step returns the state it was given"
    assert torch.equal(y, y_copy) and torch.equal(new, new_copy), f"{name}: in place differs from the copying step"
    assert not torch.equal(given, state), f"{name}: the state did not change"
    # A strided state (a view the fast in-place paths cannot take) still ends up in place.
    wide = torch.cat([state, state], dim=-1)[..., : state.shape[-1]]
    y, new = step(wide, True)
    assert new is wide and torch.equal(y, y_copy) and torch.equal(wide, new_copy), f"{name}: strided state"


@pytest.mark.parametrize("width", [1, 2, 3])
def test_conv_step_in_place_at_every_width(width):
    _, step, state = _step_cases(torch.float32, torch.float32, width)[2]
    y_copy, new_copy = step(state.clone(), False)
    y, new = step(state, True)
    assert new is state and torch.equal(y, y_copy) and torch.equal(state, new_copy)


def test_a_bad_step_leaves_the_state_as_it_was():
    state = torch.arange(24.0).view(2, 3, 4)
    with pytest.raises(ValueError, match="x_t"):  # a batch of 4 against a state of 2
        causal_conv1d_update(torch.randn(4, 3), state, torch.randn(3, 4), None, "silu", inplace=True)
    with pytest.raises(ValueError, match="x_t"):  # one row would broadcast over the batch
        causal_conv1d_update(torch.randn(1, 3), state, torch.randn(3, 4), None, "silu", inplace=True)
    assert torch.equal(state, torch.arange(24.0).view(2, 3, 4))
    s = {k: v[:, 0] if k in ("x", "dt", "B", "C") else v for k, v in ssd_inputs(seqlen=1).items()}
    ssm = s["initial_state"].clone()
    with pytest.raises(ValueError, match="ssd_step"):  # B and C of another batch
        ssd_step(s["x"], s["dt"], s["A"], s["B"][:1], s["C"][:1], s["D"], ssm, inplace=True)
    assert torch.equal(ssm, s["initial_state"])


def test_causal_conv1d_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), None, "gelu")


# ------------------------------------------------------------------------------- dispatch


def test_resolve_cuda_on_cpu_raises_with_install_hint():
    with pytest.raises(RuntimeError, match="mamba-ssm") as err:
        resolve_kernel("cuda", torch.device("cpu"))
    assert "pip install 'mamba-ssm>=2.3,<2.4' 'causal-conv1d>=1.7,<1.8'" in str(err.value)


def test_resolve_auto_on_cpu_falls_back_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_LOGGED_FALLBACKS", set())
    with caplog.at_level(logging.INFO, logger="cald_scale.mixers"):
        assert resolve_kernel("auto", torch.device("cpu")) == "chunked"
        assert resolve_kernel("auto", "cpu") == "chunked"
    records = [r for r in caplog.records if r.name == "cald_scale.mixers"]
    assert len(records) == 1
    assert "chunked" in records[0].getMessage() and "pip install 'mamba-ssm>=2.3,<2.4' 'causal-conv1d>=1.7,<1.8'" in records[0].getMessage()


@pytest.mark.parametrize("kernel", ["ref", "chunked"])
def test_resolve_explicit_pure_pytorch_paths(kernel):
    assert resolve_kernel(kernel, torch.device("cpu")) == kernel


def test_resolve_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        resolve_kernel("triton", torch.device("cpu"))


# --------------------------------------------------------------------- CUDA kernel parity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_chunked():
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from cald_scale.mixers.ops import _cuda

    dev = torch.device("cuda")
    assert resolve_kernel("auto", dev) == "cuda"

    # SSD (Mamba2): outputs, final state and gradients.
    inputs = {k: v.to(dev) for k, v in ssd_inputs(seqlen=200, heads=8, headdim=64, groups=2, dstate=64).items()}
    cu_in, chk_in = _leaves(inputs), _leaves(inputs)
    y_cu = _cuda.ssd_chunked(**cu_in, chunk_size=64, return_final_state=True)
    y_chk = ssd_chunked(**chk_in, chunk_size=64, return_final_state=True)
    assert_close(y_cu[0], y_chk[0], rtol=1e-3, name="ssd y")
    assert_close(y_cu[1], y_chk[1], rtol=1e-3, name="ssd final_state")
    for name, g_cu, g_chk in zip(cu_in, grads(y_cu[0], list(cu_in.values())), grads(y_chk[0], list(chk_in.values()))):
        if g_cu is not None:
            assert_close(g_cu, g_chk, rtol=1e-3, name=f"ssd grad {name}")

    # Selective scan (Mamba).
    inputs = {k: v.to(dev) for k, v in scan_inputs(dim=64, seqlen=300, dstate=16).items()}
    cu_in, cpu_in = _leaves(inputs), _leaves(inputs)
    out_cu = _cuda.selective_scan(**cu_in, delta_softplus=True)
    out_cpu = selective_scan_cpu(**cpu_in, delta_softplus=True)
    assert_close(out_cu, out_cpu, rtol=1e-3, name="scan out")
    for name, g_cu, g_cpu in zip(cu_in, grads(out_cu, list(cu_in.values())), grads(out_cpu, list(cpu_in.values()))):
        assert_close(g_cu, g_cpu, rtol=1e-3, name=f"scan grad {name}")

    # Causal conv and the decoding steps.
    x = torch.randn(2, 64, 50, device=dev)
    weight, bias = torch.randn(64, 4, device=dev), torch.randn(64, device=dev)
    assert_close(_cuda.causal_conv1d(x, weight, bias, "silu"), causal_conv1d(x, weight, bias, "silu"), rtol=1e-3)
    state = torch.randn(2, 64, 4, device=dev)
    for a, b in zip(
        _cuda.causal_conv1d_update(x[..., 0], state, weight, bias, "silu"),
        causal_conv1d_update(x[..., 0], state, weight, bias, "silu"),
    ):
        assert_close(a, b, rtol=1e-3)
    s = {k: v[:, 0] if k in ("x", "dt", "B", "C") else v for k, v in ssd_inputs(seqlen=1).items()}
    s = {k: v.to(dev) for k, v in s.items()}
    args = (s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], s["initial_state"])
    for a, b in zip(_cuda.ssd_step(*args), ssd_step(*args)):
        assert_close(a, b, rtol=1e-3)
    # In place (how a cache decodes): the kernels write the state they are given, also a bf16
    # model's (bf16 inputs with an fp32 SSM state, a bf16 conv state) and Mamba-1's.
    scan = {k: v[..., 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in scan_inputs(dim=64, seqlen=1).items()}
    scan = {k: v.to(dev) for k, v in scan.items()}
    bf = torch.bfloat16
    cases = [
        (lambda st, ip: _cuda.ssd_step(*args[:-1], st, inplace=ip), args[-1]),
        (lambda st, ip: _cuda.ssd_step(*(a.to(bf) for a in args[:-1]), st, inplace=ip), args[-1]),
        (lambda st, ip: _cuda.causal_conv1d_update(x[..., 0], st, weight, bias, "silu", inplace=ip), state),
        (lambda st, ip: _cuda.causal_conv1d_update(x[..., 0].to(bf), st, weight.to(bf), bias.to(bf), "silu", inplace=ip), state.to(bf)),
        (lambda st, ip: _cuda.causal_conv1d_update(x[..., 0].to(bf), st, weight.to(bf), bias.to(bf), "silu", inplace=ip), state),
        (lambda st, ip: _cuda.selective_state_update(
            st, scan["u"], scan["delta"], scan["A"], scan["B"], scan["C"], scan["D"], z_t=scan["z"],
            dt_bias=scan["delta_bias"], dt_softplus=True, inplace=ip), torch.randn(2, 64, 16, device=dev)),
    ]
    for i, (step, state) in enumerate(cases):
        y_copy, new_copy = step(state.clone(), False)
        given = state.clone()
        y, new = step(given, True)
        assert new is given, f"in-place case {i}"
        assert_close(y.float(), y_copy.float(), rtol=1e-6, name=f"in-place case {i}: y")
        assert_close(new.float(), new_copy.float(), rtol=1e-6, name=f"in-place case {i}: state")


@pytest.mark.parametrize("conv_kernel", [True, False])
def test_dispatch_asks_only_for_the_kernels_its_mixer_uses(monkeypatch, caplog, conv_kernel):
    """Mamba2 runs on mamba_ssm's Triton SSD; the compiled selective scan (which a no-compile
    mamba-ssm install lacks) is Mamba-1's alone. causal-conv1d is optional: without it (its
    source build outlasted a GPU lease) the "cuda" path stays, with the conv in pure PyTorch."""
    from cald_scale.mixers.ops import _cuda, dispatch

    groups = {
        "causal_conv1d": (True, None) if conv_kernel else (False, "no causal_conv1d"),
        "mamba_triton": (True, None),
        "selective_scan": (False, "no selective_scan_cuda"),
    }
    monkeypatch.setattr(_cuda, "kernel_groups", lambda: groups)
    monkeypatch.setattr(dispatch, "_LOGGED_FALLBACKS", set())
    cuda = torch.device("cuda")  # a device descriptor: nothing runs on it here
    with caplog.at_level("WARNING", logger="cald_scale.mixers"):
        assert resolve_kernel("auto", cuda, "mamba2") == "cuda"
    assert resolve_kernel("auto", cuda, "mamba") == "chunked"
    with pytest.raises(RuntimeError, match="selective_scan_cuda"):
        resolve_kernel("cuda", cuda, "mamba")
    conv_notes = [r.getMessage() for r in caplog.records if "short conv pure PyTorch" in r.getMessage()]
    assert conv_notes == ([] if conv_kernel else ["Mixer kernel 'cuda': the scans run mamba_ssm's kernels, the short conv pure PyTorch: no causal_conv1d"])


def test_cuda_conv_wrappers_run_the_pure_conv_without_causal_conv1d():
    """Where causal-conv1d does not import (as here), the "cuda" path's conv wrappers are the
    pure-PyTorch conv and step, bit for bit, forward and backward."""
    from cald_scale.mixers.ops import _cuda

    if _cuda.kernel_groups()["causal_conv1d"][0]:
        pytest.skip("causal-conv1d imports here: the wrappers run its kernels")
    assert _cuda.conv_backend() == "pure-PyTorch"
    x = torch.randn(2, 50, 24).transpose(1, 2).requires_grad_()  # channels-last, as the mixers pass it
    weight, bias = torch.randn(24, 4, requires_grad=True), torch.randn(24, requires_grad=True)
    y = _cuda.causal_conv1d(x, weight, bias, "silu")
    expected = causal_conv1d(x, weight, bias, "silu")
    assert torch.equal(y, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads(y, [x, weight, bias]), grads(expected, [x, weight, bias])))
    state = torch.randn(2, 24, 4)
    for a, b in zip(_cuda.causal_conv1d_update(x[..., 0], state, weight, bias, "silu"),
                    causal_conv1d_update(x[..., 0], state, weight, bias, "silu")):
        assert torch.equal(a, b)


def test_long_inference_runs_in_segments_with_the_same_result(monkeypatch):
    """Without autograd, a sequence longer than two segments is scanned segment by segment,
    each from the state the last one ended in; outputs and final state equal the one-pass scan."""
    from cald_scale.mixers.ops import ssd as ssd_module

    inputs = ssd_inputs(seqlen=150, groups=2)
    whole = ssd_chunked(**inputs, chunk_size=8, return_final_state=True)
    monkeypatch.setattr(ssd_module, "_SEGMENT_TOKENS", 32)
    calls = []
    original = ssd_module._SSDChunked.apply
    monkeypatch.setattr(ssd_module._SSDChunked, "apply", lambda *a: (calls.append(a[0].shape[1]), original(*a))[1])
    with torch.no_grad():
        segmented = ssd_chunked(**inputs, chunk_size=8, return_final_state=True)
    assert calls == [32, 32, 32, 32, 22]
    assert_close(segmented[0], whole[0], name="y")
    assert_close(segmented[1], whole[1], name="final_state")
    calls.clear()
    ssd_chunked(**_leaves(inputs), chunk_size=8)  # with autograd: one pass
    assert calls == [150]


def _threads_seen_by_ops(fn) -> set[int]:
    """Every intra-op thread count in force while ``fn``'s aten ops ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(torch.get_num_threads())
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_scans_use_all_threads_for_inference_and_one_while_training():
    from cald_scale.mixers import Mamba2Config, Mamba2Mixer

    torch.set_num_threads(2)  # restored by conftest
    torch.manual_seed(0)
    mixer = Mamba2Mixer(Mamba2Config(head_dim=8, d_state=8, chunk_size=16, kernel="chunked"), hidden_size=32)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        assert _threads_seen_by_ops(lambda: mixer(x)) == {2}
    # Training: the conv, the SSD and the gated norm run on one thread (their matmuls get both back).
    out = None

    def forward():
        nonlocal out
        out = mixer(x)

    assert _threads_seen_by_ops(forward) == {1, 2}
    assert _threads_seen_by_ops(lambda: out.sum().backward()) == {1, 2}
    assert torch.get_num_threads() == 2


def _threads_in_scan_scope(rank: int) -> int:
    from cald_scale.mixers.ops._threads import scan_threads

    torch.set_num_threads(2)
    with torch.no_grad(), scan_threads(torch.zeros(1)):
        return torch.get_num_threads()


def test_scans_keep_one_thread_when_ranks_share_the_machine(tmp_path):
    assert run_on_ranks(_threads_in_scan_scope, tmp_path / "ranks") == [1, 1]


def test_the_kernel_install_hint_names_the_gpu_extras_tested_releases():
    """The hint printed when a CUDA kernel is missing pinned nothing, so it installed a mamba-ssm
    whose Triton modules _cuda.py may not read (helper-90): it names pyproject's gpu extra."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from pathlib import Path

    from cald_scale.mixers.ops import _cuda

    extra = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    kernels = [spec for spec in extra if spec.startswith(("mamba-ssm", "causal-conv1d"))]
    assert len(kernels) == 2 and all(f"'{spec}'" in _cuda.INSTALL_HINT for spec in kernels), (kernels, _cuda.INSTALL_HINT)
