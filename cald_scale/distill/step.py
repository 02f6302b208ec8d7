"""One CALD step: teacher and student side by side, stage-aligned and streamed.

Three schedules of the same loss:

- ``streamed`` (default, end to end): teacher stage k runs under no_grad, its block
  outputs feed the layer losses of student stage k at once and are released before
  stage k+1. What stays until backward is inherent: one tensor per distilled layer (the
  layer loss's gradient, in the student's dtype) plus the teacher state that stage k+1
  starts from.
- ``naive`` (the reference): the whole teacher first, every hidden state kept; identical
  losses and gradients (tests/unit/test_streaming.py), about 2L hidden states of memory.
- ``teacher_forced``: student block i takes the teacher's h_{i-1} as its input and learns
  on its own (loss = layer loss, no backward across blocks); each stage is
  back-propagated as soon as its loss exists, so at most two teacher hidden states are
  alive whatever the depth. CE and KL do not apply (no student path end to end).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch

from .losses import LossConfig, distilled_layers, layer_loss
from .stages import Batch, LayerwiseModel, as_batch, make_stages

__all__ = ["LossParts", "Schedule", "cald_forward", "teacher_forced_step", "combine_loss_parts", "distill_targets", "loss_part_names"]

Schedule = Literal["streamed", "naive"]
"""``cald_forward``'s schedules of the end-to-end loss (``teacher_forced_step`` is the third)."""


@dataclasses.dataclass
class LossParts:
    """The weighted total and its named, unweighted parts: "ce" (the task's loss on its labels,
    next-token or class CE, from the view's ``head_losses``), "layer" and "kl"."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    per_layer: list[float]
    skipped_stages: int = 0
    """Teacher-forced stages not back-propagated (a non-finite loss); the total and terms are
    then those of the stages that were."""

    def as_floats(self) -> dict[str, float]:
        return dict(zip(("loss", *self.terms), _floats([self.total, *self.terms.values()])))

    def detached(self) -> "LossParts":
        """The same values without their graph: a micro-batch that is not back-propagated must
        not hold its activations while the next one runs."""
        return dataclasses.replace(self, total=self.total.detach(), terms={k: v.detach() for k, v in self.terms.items()})


def _floats(values: list[torch.Tensor]) -> list[float]:
    """Scalar tensors as floats in one device-to-host copy (``.item()`` each would wait on the device once per value)."""
    return torch.stack([v.detach().double() for v in values]).tolist() if values else []


def distill_targets(cfg: LossConfig, num_layers: int, has_teacher: bool) -> tuple[bool, tuple[int, ...]]:
    """(whether the teacher runs, the layers whose losses are distilled) for a micro-batch under
    ``cfg``: the teacher runs only where a term reads it (layer losses or KL); both modes decide here."""
    use_teacher = has_teacher and (cfg.a_layer > 0 or cfg.a_kl > 0)
    wanted = tuple(distilled_layers(num_layers, cfg)) if use_teacher and cfg.a_layer > 0 else ()
    return use_teacher, wanted


def loss_part_names(cfg: LossConfig, use_teacher: bool, wanted: tuple[int, ...]) -> list[str]:
    """The parts ``combine_loss_parts`` gives under ``cfg``, in its order (ce, layer, kl)."""
    return [name for name, applies in (("ce", cfg.a_ce > 0), ("layer", bool(wanted)), ("kl", cfg.a_kl > 0 and use_teacher)) if applies]


def combine_loss_parts(cfg: LossConfig, ce, layer_terms: list[torch.Tensor], kl, device) -> LossParts:
    """``a_ce * ce + a_layer * mean(layer terms) + a_kl * kl``; parts that do not apply are left out."""
    terms, total = {}, torch.zeros((), device=device)
    for name, weight, value in (
        ("ce", cfg.a_ce, ce),
        ("layer", cfg.a_layer, torch.stack(layer_terms).mean() if layer_terms else None),
        ("kl", cfg.a_kl, kl),
    ):
        if value is not None:
            terms[name] = value
            total = total + weight * value
    return LossParts(total=total, terms=terms, per_layer=_floats(layer_terms))


def cald_forward(
    teacher: LayerwiseModel | None,
    student: LayerwiseModel,
    batch: Batch | torch.Tensor,
    cfg: LossConfig,
    *,
    stage_size: int = 1,
    schedule: Schedule = "streamed",
    on_boundary: Callable[[str, int], None] | None = None,
    layer_tokens: float | None = None,
) -> LossParts:
    """Loss parts for one micro-batch; ``teacher=None`` trains unguided (task loss only).
    ``layer_tokens``: a padded batch's layer losses divide by this many tokens (``layer_loss``).

    ``on_boundary(event, stage)`` is called after each teacher stage ("teacher") and after
    each student stage once its teacher activations are released ("stage"); memory
    accounting hooks in there.
    """
    boundary = on_boundary or (lambda event, stage: None)
    batch = as_batch(batch)
    mask = student.token_mask(batch)
    if teacher is not None and teacher.num_layers != student.num_layers:
        raise ValueError(f"teacher has {teacher.num_layers} blocks but student has {student.num_layers}: stages cannot align")
    use_teacher, wanted = distill_targets(cfg, student.num_layers, teacher is not None)
    wanted = set(wanted)
    stages = make_stages(student.num_layers, stage_size)
    layer_terms: list[torch.Tensor] = []

    s_h = student.embed(batch)
    s_ctx = student.context(s_h, batch)
    t_h = t_ctx = None
    if use_teacher:
        with torch.no_grad():
            t_h = teacher.embed(batch)
            t_ctx = s_ctx if teacher.dtype == student.dtype else teacher.context(t_h, batch)

    if schedule == "streamed" or not use_teacher:
        for k, stage in enumerate(stages):
            t_outs: list[torch.Tensor] = []
            if use_teacher:
                with torch.no_grad():
                    for t_h in teacher.blocks_iter(t_h, t_ctx, stage):
                        t_outs.append(t_h if stage[len(t_outs)] in wanted or stage[len(t_outs)] == stage[-1] else None)
                boundary("teacher", k)
            for j, i in enumerate(stage):
                s_h = student.block(i, s_h, s_ctx)
                if i in wanted:
                    layer_terms.append(layer_loss(s_h, t_outs[j], mask, tokens=layer_tokens))
            # NOTE: release this stage's teacher activations before the next stage runs.
            del t_outs
            boundary("stage", k)
    elif schedule == "naive":
        with torch.no_grad():
            t_all = list(teacher.blocks_iter(t_h, t_ctx, range(teacher.num_layers)))
            t_h = t_all[-1]
        boundary("teacher", -1)
        for i, s_h in enumerate(student.blocks_iter(s_h, s_ctx, range(student.num_layers))):
            if i in wanted:
                layer_terms.append(layer_loss(s_h, t_all[i], mask, tokens=layer_tokens))
        boundary("student", -1)
        del t_all
    else:
        raise ValueError(f"unknown schedule {schedule!r} for cald_forward; use 'streamed' or 'naive' (teacher_forced_step for 'teacher_forced')")

    # The task's head losses: next-token CE and logit KL (LM), class CE and KL (classification).
    ce, kl = student.head_losses(s_h, batch, cfg, teacher=teacher if use_teacher else None, teacher_h=t_h)
    boundary("head", len(stages))
    return combine_loss_parts(cfg, ce, layer_terms, kl, s_h.device)


def teacher_forced_step(
    teacher: LayerwiseModel,
    student: LayerwiseModel,
    batch: Batch | torch.Tensor,
    cfg: LossConfig,
    *,
    backward: Callable[[torch.Tensor], None],
    stage_size: int = 1,
    on_boundary: Callable[[str, int], None] | None = None,
    all_agree: Callable[[bool], bool] = lambda flag: flag,
    poison_stage: int | None = None,
    layer_tokens: float | None = None,
) -> LossParts:
    """Teacher-forced layer alignment: each student stage runs on the teacher's input to that
    stage and is back-propagated (``backward(stage_loss)``) before the next stage runs.

    Stage losses are weighted so that their gradients sum to those of
    ``a_layer * mean(layer losses)``. A stage whose loss is not finite is not
    back-propagated (the blocks are independent, so the others still learn) and is counted in
    ``skipped_stages``; the returned total and layer loss are the other stages' (their layer
    losses' mean). ``all_agree(flag)`` makes every rank take the same branch (True only if
    ``flag`` holds on all ranks). ``poison_stage``: that stage's loss is made NaN
    (fault-injection tests; the first stage from it that has a distilled layer). ``layer_tokens``
    as in ``cald_forward``. The returned tensors are detached.
    """
    boundary = on_boundary or (lambda event, stage: None)
    batch = as_batch(batch)
    mask = student.token_mask(batch)
    if teacher.num_layers != student.num_layers:
        raise ValueError(f"teacher has {teacher.num_layers} blocks but student has {student.num_layers}: stages cannot align")
    if cfg.a_layer <= 0:
        raise ValueError("the teacher_forced schedule trains on the layer loss alone: loss.a_layer must be > 0")
    wanted = set(distilled_layers(student.num_layers, cfg))
    weight = cfg.a_layer / len(wanted)
    layer_terms: list[torch.Tensor] = []
    skipped = 0
    with torch.no_grad():
        t_h = teacher.embed(batch)
    s_ctx = student.context(t_h.to(student.dtype), batch)  # the student's own embedding is not used
    t_ctx = s_ctx if teacher.dtype == student.dtype else teacher.context(t_h, batch)
    for k, stage in enumerate(make_stages(student.num_layers, stage_size)):
        t_in = t_h
        with torch.no_grad():
            t_outs = list(teacher.blocks_iter(t_in, t_ctx, stage))
        boundary("teacher", k)
        terms = []
        for j, i in enumerate(stage):
            # Every block starts from the teacher's input to it, also inside a stage of
            # several blocks: no student output feeds another block, so no backward crosses blocks.
            s_h = student.block(i, t_in if j == 0 else t_outs[j - 1], s_ctx)
            if i in wanted:
                terms.append(layer_loss(s_h, t_outs[j], mask, tokens=layer_tokens))
        if terms:
            stage_loss = weight * torch.stack(terms).sum()
            if poison_stage is not None and k >= poison_stage:
                stage_loss = stage_loss * float("nan")
                terms = [t * float("nan") for t in terms]
                poison_stage = None
            if not stage_loss.requires_grad:
                pass  # a hybrid's kept attention layer with frozen weights: nothing to learn
            elif all_agree(bool(torch.isfinite(stage_loss))):
                backward(stage_loss)
            else:
                skipped += 1
            layer_terms.extend(t.detach() for t in terms)
            del stage_loss  # NOTE: a skipped stage's graph (and its teacher input) must not outlive it
        t_h = t_outs[-1]
        # NOTE: this stage's graph (and the teacher input it saved) is gone after backward.
        del t_outs, terms, s_h, t_in
        boundary("stage", k)
    stacked = torch.stack(layer_terms)
    finite = torch.isfinite(stacked)
    layer = stacked[finite].mean() if bool(finite.any()) else stacked.mean()  # the stages that learned
    return LossParts(total=cfg.a_layer * layer, terms={"layer": layer}, per_layer=_floats(layer_terms), skipped_stages=skipped)
