"""Streamed stage-aligned schedule == naive schedule (losses and gradients), with far less teacher memory."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_teacher

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.distill.losses import LossConfig, layer_loss
from cald_scale.distill.stages import LayerwiseModel, make_stages
from cald_scale.distill.step import cald_forward, teacher_forced_step
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


def _held_teacher_bytes(teacher, student, ids, schedule, cfg=None, poison_stage=None):
    """Teacher-derived bytes alive at the worst stage boundary, autograd's saved tensors included."""
    ledger = LiveTensorLedger()
    t_lw = LayerwiseModel(teacher, scope=ledger.source_scope)
    s_lw = LayerwiseModel(student, scope=ledger.sink_scope)
    cfg = cfg or LossConfig()
    with ledger.watch():
        if schedule == "teacher_forced":
            teacher_forced_step(t_lw, s_lw, ids, cfg, backward=lambda loss: loss.backward(), on_boundary=ledger.on_boundary(), poison_stage=poison_stage)
        else:
            parts = cald_forward(t_lw, s_lw, ids, cfg, schedule=schedule, on_boundary=ledger.on_boundary())
            parts.total.backward()
    student.zero_grad(set_to_none=True)
    return ledger.peak_held_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_holds_one_hidden_state_per_distilled_layer(dtype):
    layers, batch, seqlen = 6, 2, 32
    teacher = tiny_teacher("llama", layers=layers).to(dtype)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (batch, seqlen))
    hidden = batch * seqlen * teacher.config.hidden_size * dtype.itemsize
    distilled = layers - 1  # the last block is skipped by default
    naive = _held_teacher_bytes(teacher, student, ids, "naive")
    streamed = _held_teacher_bytes(teacher, student, ids, "streamed")
    assert naive >= (layers + distilled) * hidden  # every block output, plus one loss tensor per layer
    scalars = 8 * layers  # the per-layer loss values themselves
    assert streamed <= (distilled + 1) * hidden + scalars
    assert streamed < 0.6 * naive


def test_the_ledger_sees_what_autograd_keeps(monkeypatch):
    """The autograd layer loss keeps fp32 LN(teacher) per layer: twice a bf16 student's budget, and the ledger says so."""
    from cald_scale.distill import step as step_module
    from cald_scale.distill.losses import layer_loss_reference

    layers, batch, seqlen = 6, 2, 32
    teacher = tiny_teacher("llama", layers=layers).to(torch.bfloat16)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (batch, seqlen))
    hidden = batch * seqlen * teacher.config.hidden_size * 2
    monkeypatch.setattr(step_module, "layer_loss", layer_loss_reference)
    held = _held_teacher_bytes(teacher, student, ids, "streamed")
    assert held >= 2 * (layers - 1) * hidden


@pytest.mark.parametrize("layers,poison_stage", [(4, None), (10, None), (4, 1)])
def test_teacher_forced_holds_two_hidden_states_whatever_the_depth(layers, poison_stage):
    """Also when a stage is skipped (non-finite): its graph goes with it, not with the next stage."""
    batch, seqlen = 2, 32
    teacher = tiny_teacher("llama", layers=layers)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (batch, seqlen))
    hidden = batch * seqlen * teacher.config.hidden_size * 4
    assert _held_teacher_bytes(teacher, student, ids, "teacher_forced", poison_stage=poison_stage) <= 2 * hidden + 8 * layers


@pytest.mark.parametrize("stage_size", [1, 2, 3])
def test_teacher_forced_gradients_are_per_block(stage_size):
    """Each block's gradient equals an isolated block trained on the teacher's input, also
    inside a stage of several blocks (where block 1 follows block 0 in the same stage)."""
    teacher = tiny_teacher("llama", layers=3)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (2, 16))
    cfg = LossConfig(skip_last=False)
    parts = teacher_forced_step(LayerwiseModel(teacher), LayerwiseModel(student), ids, cfg, backward=lambda loss: loss.backward(), stage_size=stage_size)
    assert len(parts.per_layer) == 3 and not parts.total.requires_grad
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(".layers." in n for n in grads)  # embeddings and head get nothing
    student.zero_grad(set_to_none=True)
    # Block 1 alone, fed the teacher's h_0: the same gradient.
    t_lw, s_lw = LayerwiseModel(teacher), LayerwiseModel(student)
    with torch.no_grad():
        h = t_lw.embed(ids)
        ctx = t_lw.context(h, ids)
        h0 = t_lw.block(0, h, ctx)
        h1 = t_lw.block(1, h0, ctx)
    loss = cfg.a_layer / 3 * layer_loss(s_lw.block(1, h0, s_lw.context(h0, ids)), h1)
    loss.backward()
    for name, param in student.named_parameters():
        if ".layers.1." in name and param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7)


def test_a_non_finite_teacher_forced_stage_is_skipped_and_the_rest_learn():
    teacher = tiny_teacher("llama", layers=3)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (2, 16))
    parts = teacher_forced_step(LayerwiseModel(teacher), LayerwiseModel(student), ids, LossConfig(skip_last=False),
                                backward=lambda loss: loss.backward(), poison_stage=1)
    assert parts.skipped_stages == 1 and math.isnan(parts.per_layer[1])
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert any(".layers.0." in n for n in grads) and any(".layers.2." in n for n in grads)
    assert not any(".layers.1." in n for n in grads)  # the skipped block got nothing
    # The logged loss is the stages that learned: finite, their layer losses' mean.
    assert parts.terms["layer"].item() == pytest.approx((parts.per_layer[0] + parts.per_layer[2]) / 2, rel=1e-6)


def test_fault_injection_poisons_the_first_stage_that_has_a_distilled_layer():
    """With skip_first covering stage 0, poisoning "stage 0" must still exercise the skip."""
    teacher = tiny_teacher("llama", layers=3)
    student = convert_teacher(teacher, ConversionConfig()).train()
    ids = torch.randint(0, 256, (2, 16))
    parts = teacher_forced_step(LayerwiseModel(teacher), LayerwiseModel(student), ids, LossConfig(skip_first=1, skip_last=False),
                                backward=lambda loss: loss.backward(), poison_stage=0)
    assert parts.skipped_stages == 1 and math.isnan(parts.per_layer[0]) and math.isfinite(parts.per_layer[1])


def test_loss_weights_and_skips():
    teacher = tiny_teacher("llama", layers=4)
    student = convert_teacher(teacher, ConversionConfig())
    ids = torch.randint(0, 256, (2, 16))
    lw_t, lw_s = LayerwiseModel(teacher), LayerwiseModel(student)
    parts = cald_forward(lw_t, lw_s, ids, LossConfig(skip_first=1, skip_last=False))
    assert len(parts.per_layer) == 3
    torch.testing.assert_close(parts.total, parts.terms["ce"] + 15.0 * parts.terms["layer"])
    assert set(parts.as_floats()) == {"loss", "ce", "layer"}  # a KL weight of 0 leaves the part out
    unguided = cald_forward(None, lw_s, ids, LossConfig(a_layer=0.0))
    assert unguided.per_layer == [] and set(unguided.terms) == {"ce"}
    torch.testing.assert_close(unguided.total, unguided.terms["ce"])
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


@pytest.mark.parametrize("stage_size", [1, 3])
def test_every_part_of_the_cald_step_equals_its_definition_on_the_models_own_forwards(stage_size):
    """The step against an oracle outside the layerwise path: the student's and teacher's own HF
    forwards (hidden states and logits). The layer term is a_layer x the MEAN of the per-layer
    MSEs, the KL is taken at loss.kl_temperature; both once slipped past tests that compared the
    step with itself (a sum instead of the mean, a temperature of 1 whatever was set)."""
    from cald_scale.distill.losses import layer_loss_reference, lm_cross_entropy, logit_kl

    teacher = tiny_teacher("llama", layers=4)
    student = convert_teacher(teacher, ConversionConfig())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = LossConfig(a_ce=1.0, a_layer=15.0, a_kl=0.5, kl_temperature=2.0)
    with torch.no_grad():
        parts = cald_forward(LayerwiseModel(teacher), LayerwiseModel(student), ids, cfg, stage_size=stage_size)
        t = teacher(ids, output_hidden_states=True)
        s = student(ids, output_hidden_states=True)
    # hidden_states[i + 1] is block i's output (the last entry is after the final norm: block 3 is left out, skip_last).
    layers = [layer_loss_reference(s.hidden_states[i + 1], t.hidden_states[i + 1]).item() for i in range(3)]
    assert parts.per_layer == pytest.approx(layers, rel=1e-5)
    assert parts.terms["layer"].item() == pytest.approx(sum(layers) / 3, rel=1e-5)
    ce, kl = lm_cross_entropy(s.logits, ids), logit_kl(s.logits, t.logits, 2.0)
    torch.testing.assert_close(parts.terms["ce"], ce)
    torch.testing.assert_close(parts.terms["kl"], kl)
    assert not torch.isclose(kl, logit_kl(s.logits, t.logits, 1.0))  # the temperature matters here
    torch.testing.assert_close(parts.total, ce + 15.0 * sum(layers) / 3 + 0.5 * kl)


def test_a_teacher_in_another_dtype_than_the_student_runs_on_its_own_positions(monkeypatch):
    """The student's rotary tables are computed once per batch and shared with the teacher only
    when both compute in one dtype: a float32 teacher beside a bf16 student computes its own, so
    the hidden states the layer loss reads are its own forward's, to the bit."""
    import cald_scale.distill.step as step

    teacher = tiny_teacher("llama", layers=3).eval()
    teacher.config.max_position_embeddings = 4096
    student = convert_teacher(teacher, ConversionConfig()).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    seen = []
    monkeypatch.setattr(step, "layer_loss", lambda s_h, t_h, *a, **k: seen.append(t_h) or layer_loss(s_h, t_h, *a, **k))
    with torch.no_grad():
        cald_forward(LayerwiseModel(teacher), LayerwiseModel(student), ids, LossConfig(skip_last=False))
        own = teacher(ids, output_hidden_states=True).hidden_states
    assert len(seen) == 3 and all(t.dtype == torch.float32 for t in seen)
    for i, t_h in enumerate(seen):
        assert torch.equal(t_h, own[i + 1]) if i < 2 else torch.equal(teacher.model.norm(t_h), own[3]), i
