"""Streamed stage-aligned schedule == naive schedule (losses and gradients), with far less teacher memory."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_teacher

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.distill.losses import LossConfig
from cald_scale.distill.stages import LayerwiseModel, make_stages
from cald_scale.distill.step import cald_forward
from cald_scale.eval.memory import LiveTensorLedger


def _run(teacher, student, ids, cfg, **kw):
    parts = cald_forward(LayerwiseModel(teacher), LayerwiseModel(student), ids, cfg, **kw)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return parts, grads


@pytest.mark.parametrize("family,mixer", [("llama", "mamba2"), ("gpt_neox", "mamba")])
@pytest.mark.parametrize("stage_size", [1, 2, 4])
def test_streamed_equals_naive(family, mixer, stage_size):
    teacher = tiny_teacher(family, layers=4)
    student = convert_teacher(teacher, ConversionConfig(mixer=mixer)).train()
    ids = torch.randint(0, 256, (2, 32))
    cfg = LossConfig(a_ce=1.0, a_layer=15.0, a_kl=0.5, kl_temperature=2.0)
    naive, g_naive = _run(teacher, student, ids, cfg, schedule="naive")
    streamed, g_streamed = _run(teacher, student, ids, cfg, schedule="streamed", stage_size=stage_size)
    assert naive.as_floats() == streamed.as_floats()
    assert naive.per_layer == streamed.per_layer and len(naive.per_layer) == 3  # blocks 0..2, last skipped
    assert g_naive.keys() == g_streamed.keys() and len(g_naive) > 0
    for name in g_naive:
        assert torch.equal(g_naive[name], g_streamed[name]), name


def test_streamed_holds_at_most_two_over_L_of_naive_teacher_memory():
    layers = 8
    teacher = tiny_teacher("llama", layers=layers)
    student = convert_teacher(teacher, ConversionConfig())
    ids = torch.randint(0, 256, (2, 64))
    held = {}
    for schedule in ("naive", "streamed"):
        ledger = LiveTensorLedger()
        cald_forward(
            LayerwiseModel(teacher, scope=ledger.scope), LayerwiseModel(student), ids, LossConfig(),
            schedule=schedule, stage_size=1, on_boundary=lambda *_: ledger.sample(),
        )
        held[schedule] = ledger.peak_held_bytes
    one_hidden = 2 * 64 * 64 * 4
    assert held["naive"] >= layers * one_hidden  # every teacher block output kept
    assert held["streamed"] <= 2 / layers * held["naive"]


def test_loss_weights_and_skips():
    teacher = tiny_teacher("llama", layers=4)
    student = convert_teacher(teacher, ConversionConfig())
    ids = torch.randint(0, 256, (2, 16))
    lw_t, lw_s = LayerwiseModel(teacher), LayerwiseModel(student)
    parts = cald_forward(lw_t, lw_s, ids, LossConfig(skip_first=1, skip_last=False))
    assert len(parts.per_layer) == 3
    torch.testing.assert_close(parts.total, parts.ce + 15.0 * parts.layer)
    unguided = cald_forward(None, lw_s, ids, LossConfig(a_layer=0.0))
    assert unguided.per_layer == [] and unguided.layer.item() == 0.0
    with pytest.raises(ValueError, match="blocks"):
        cald_forward(LayerwiseModel(tiny_teacher("llama", layers=3)), lw_s, ids, LossConfig())


def test_make_stages():
    assert make_stages(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="stage_size"):
        make_stages(4, 0)


def test_activation_checkpointing_gives_the_same_gradients():
    teacher = tiny_teacher("llama", layers=3)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (2, 24))
    grads = []
    for checkpointing in (False, True):
        parts = cald_forward(LayerwiseModel(teacher), LayerwiseModel(student, activation_checkpointing=checkpointing), ids, LossConfig())
        parts.total.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        student.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
