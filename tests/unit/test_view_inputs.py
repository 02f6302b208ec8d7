"""The distillation step reads no input by name: a view owns its inputs (embed, context, token_mask).

A view whose batches carry no token ids (frame features and a frame mask, as a speech
encoder's will) runs through both schedules and the teacher-forced step unchanged, and the
layer losses count exactly the frames its ``token_mask`` marks.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_teacher

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.distill.losses import LossConfig
from cald_scale.distill.stages import LayerwiseModel
from cald_scale.distill.step import cald_forward, teacher_forced_step


class FrameView(LayerwiseModel):
    """A causal model fed frame features through a fixed projection, scored on real frames only."""

    def __init__(self, model, projection: torch.nn.Linear):
        super().__init__(model)
        self.projection = projection

    def embed(self, batch):
        return self.projection(batch["features"])

    def token_mask(self, batch):
        return batch["frame_mask"]

    def head_losses(self, hidden, batch, cfg, *, teacher=None, teacher_h=None):
        return None, None  # a layer-loss-only phase


@pytest.fixture
def views():
    torch.manual_seed(0)
    teacher = tiny_teacher("llama", layers=3)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2")).train()
    projection = torch.nn.Linear(8, teacher.config.hidden_size)
    return FrameView(teacher, projection), FrameView(student, projection)


def _frames(seed: int):
    """Two utterances of 12 and 7 frames, right-padded to 12 with frames drawn from ``seed``."""
    real = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))
    padding = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return {"features": torch.where(mask.bool()[..., None], real, padding), "frame_mask": mask}


@pytest.mark.parametrize("schedule", ["streamed", "naive", "teacher_forced"])
def test_a_view_without_token_ids_distils_on_its_own_mask(views, schedule):
    teacher, student = views
    cfg = LossConfig(a_ce=0.0, a_layer=1.0, a_kl=0.0)

    def layer_losses(batch):
        if schedule == "teacher_forced":
            return teacher_forced_step(teacher, student, batch, cfg, backward=lambda loss: None).per_layer
        return cald_forward(teacher, student, batch, cfg, schedule=schedule).per_layer

    with torch.no_grad():
        first, other_padding = layer_losses(_frames(1)), layer_losses(_frames(2))
        unmasked = _frames(1)
        unmasked["frame_mask"] = torch.ones_like(unmasked["frame_mask"])
        counted_padding = layer_losses(unmasked)
    assert len(first) == 2 and all(v > 0 for v in first)  # blocks 0 and 1 (the last is skipped)
    # The padded frames change the blocks' outputs there, but the mask leaves them out of the losses.
    assert first == pytest.approx(other_padding, rel=1e-6)
    assert first != pytest.approx(counted_padding, rel=1e-3)
