"""The linear the ZeRO-3 engines put in place of DeepSpeed's F.linear, against DeepSpeed's own
Function, bit for bit (the 2-rank ``graph_free_linear`` check runs it inside a real step)."""

import pytest
import torch

from cald_scale.engines.zero3 import ParamSavingLinear, graph_free_linear

pytest.importorskip("deepspeed")
from deepspeed.runtime.zero.linear import zero3_linear_wrap  # noqa: E402


def _run(linear, shape, with_bias, wants):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 24, generator=gen).requires_grad_(wants[0])
    w = torch.nn.Parameter(torch.randn(40, 24, generator=gen), requires_grad=wants[1])
    b = torch.nn.Parameter(torch.randn(40, generator=gen), requires_grad=wants[2]) if with_bias else None
    out = linear(x, w, b)
    out.backward(torch.randn(out.shape, generator=gen))
    return out, [t.grad if t is not None else None for t in (x, w, b)]


WANTS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
CASES = [(shape, with_bias, wants) for shape in [(), (5,), (3, 7), (2, 3, 5)] for with_bias in (True, False) for wants in WANTS if with_bias or wants[:2] != (False, False)]


@pytest.mark.parametrize(("shape", "with_bias", "wants"), CASES)
def test_same_output_and_gradients_as_deepspeeds_linear_bit_for_bit(shape, with_bias, wants):
    """Every input rank (a 1-D input included), with and without bias, each input alone wanting a gradient."""
    ours, ours_grads = _run(ParamSavingLinear.apply, shape, with_bias, wants)
    theirs, their_grads = _run(zero3_linear_wrap, shape, with_bias, wants)
    assert torch.equal(ours, theirs)
    for mine, other in zip(ours_grads, their_grads):
        assert (mine is None) == (other is None)
        if mine is not None:
            assert torch.equal(mine, other)


def test_saves_the_weight_parameter_itself_not_a_view_of_its_data():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ParamSavingLinear.apply(x, w, None)
    assert any(t is w for t in saved)


def test_grad_free_calls_take_torchs_linear_and_autocast_calls_deepspeeds(monkeypatch):
    import cald_scale.engines.zero3 as zero3

    calls = []
    monkeypatch.setattr(zero3, "_memory_efficient_linear", lambda *a: calls.append("deepspeed") or zero3_linear_wrap(*a))
    x, w = torch.randn(4, 8, requires_grad=True), torch.nn.Parameter(torch.randn(6, 8))
    with torch.no_grad():
        assert graph_free_linear(x, w).grad_fn is None
    assert graph_free_linear(x.detach(), w.detach()).grad_fn is None
    assert type(graph_free_linear(x, w).grad_fn).__name__ == "ParamSavingLinearBackward"
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = graph_free_linear(x, w)
    assert calls == ["deepspeed"] and out.dtype == torch.bfloat16


def test_a_backward_inside_an_autocast_region_computes_as_its_forward_did():
    """DeepSpeed's Function pins its backward to the forward's autocast state; so does ours
    (a float32 forward, then ``backward`` inside a bf16 autocast region: float32 gradients)."""
    gen = torch.Generator().manual_seed(0)
    grads = {}
    for name, linear in (("ours", ParamSavingLinear.apply), ("deepspeed", zero3_linear_wrap)):
        x = torch.randn(8, 64, generator=gen).requires_grad_()
        w = torch.nn.Parameter(torch.randn(32, 64, generator=gen))
        out = linear(x, w, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.sum().backward()
        reference = torch.ones(8, 32) @ w.detach()
        grads[name] = (x.grad.dtype, (x.grad - reference).abs().max().item())
    assert grads["ours"] == (torch.float32, 0.0) and grads["deepspeed"] == (torch.float32, 0.0), grads


def test_functorch_transforms_take_deepspeeds_linear(monkeypatch):
    """``torch.func`` needs a Function with ``setup_context``: graph_free_linear hands it DeepSpeed's."""
    import cald_scale.engines.zero3 as zero3

    monkeypatch.setattr(zero3, "_memory_efficient_linear", zero3_linear_wrap)  # as use_graph_free_linear sets it
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    grad = torch.func.grad(lambda weight: graph_free_linear(x, weight).sum())(w)
    assert torch.allclose(grad, torch.ones(4, 6).T @ x)
