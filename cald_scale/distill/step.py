"""One CALD forward: teacher and student side by side, stage-aligned and streamed.

Streamed schedule (default): teacher stage k runs under no_grad, its block outputs feed
the layer losses of student stage k at once, and they are released before stage k+1, so
at most ``stage_size`` teacher hidden states are alive. The naive schedule (whole
teacher first, every hidden state kept) is kept as the reference: both give identical
losses and gradients (tests/unit/test_streaming.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch

from .losses import LossConfig, distilled_layers, layer_loss, lm_cross_entropy, logit_kl
from .stages import LayerwiseModel, make_stages

__all__ = ["LossParts", "cald_forward"]

Schedule = Literal["streamed", "naive"]


@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    layer: torch.Tensor
    kl: torch.Tensor
    per_layer: list[float]

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "ce": self.ce.item(), "layer": self.layer.item(), "kl": self.kl.item()}


def _combine(cfg: LossConfig, ce, layer_terms: list[torch.Tensor], kl, device) -> LossParts:
    zero = torch.zeros((), device=device)
    layer = torch.stack(layer_terms).mean() if layer_terms else zero
    ce = ce if ce is not None else zero
    kl = kl if kl is not None else zero
    total = cfg.a_ce * ce + cfg.a_layer * layer + cfg.a_kl * kl
    return LossParts(total=total, ce=ce, layer=layer, kl=kl, per_layer=[t.item() for t in layer_terms])


def cald_forward(
    teacher: LayerwiseModel | None,
    student: LayerwiseModel,
    input_ids: torch.Tensor,
    cfg: LossConfig,
    *,
    stage_size: int = 1,
    schedule: Schedule = "streamed",
    on_boundary: Callable[[str, int], None] | None = None,
) -> LossParts:
    """Loss parts for one micro-batch; ``teacher=None`` trains unguided (CE only).

    ``on_boundary(event, stage)`` is called after each teacher stage ("teacher") and after
    each student stage once its teacher activations are released ("stage"); memory
    accounting hooks in there.
    """
    boundary = on_boundary or (lambda event, stage: None)
    if teacher is not None and teacher.num_layers != student.num_layers:
        raise ValueError(f"teacher has {teacher.num_layers} blocks but student has {student.num_layers}: stages cannot align")
    use_teacher = teacher is not None and (cfg.a_layer > 0 or cfg.a_kl > 0)
    wanted = set(distilled_layers(student.num_layers, cfg)) if use_teacher and cfg.a_layer > 0 else set()
    stages = make_stages(student.num_layers, stage_size)
    layer_terms: list[torch.Tensor] = []

    s_h, s_ctx = student.embed(input_ids)
    t_h = t_ctx = None
    if use_teacher:
        with torch.no_grad():
            t_h, t_ctx = teacher.embed(input_ids)

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
                    layer_terms.append(layer_loss(s_h, t_outs[j]))
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
                layer_terms.append(layer_loss(s_h, t_all[i]))
        del t_all
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'streamed' or 'naive'")

    ce = kl = None
    if cfg.a_ce > 0 or cfg.a_kl > 0:
        s_logits = student.head(s_h)
        if cfg.a_ce > 0:
            ce = lm_cross_entropy(s_logits, input_ids)
        if cfg.a_kl > 0 and use_teacher:
            with torch.no_grad():
                t_logits = teacher.head(t_h)
            kl = logit_kl(s_logits, t_logits, cfg.kl_temperature)
    return _combine(cfg, ce, layer_terms, kl, input_ids.device)
