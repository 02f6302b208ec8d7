"""The CALD loss parts against their definitions."""

from __future__ import annotations

import pytest
import torch

from cald_scale.distill.losses import LossConfig, distilled_layers, layer_loss, lm_cross_entropy, logit_kl


def test_layer_loss_is_mse_of_parameter_free_layernorm():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def ln(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    torch.testing.assert_close(layer_loss(s, t), ((ln(s) - ln(t)) ** 2).mean())
    # Scale-invariant per token: a student off by a positive scale has zero layer loss.
    assert layer_loss(3.0 * t, t).item() < 1e-6


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 4, 11)
    assert logit_kl(logits, logits, 2.0).abs().item() < 1e-6
    other = torch.randn(2, 4, 11)
    p_t = torch.softmax(other / 2.0, -1)
    manual = (p_t * (torch.log_softmax(other / 2.0, -1) - torch.log_softmax(logits / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(logit_kl(logits, other, 2.0), manual)


def test_lm_cross_entropy_shifts_labels():
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 5), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token perfectly
    assert lm_cross_entropy(logits, ids).item() < 1e-4


def test_distilled_layers_and_validation():
    assert distilled_layers(4, LossConfig()) == [0, 1, 2]
    assert distilled_layers(4, LossConfig(skip_last=False, skip_first=1)) == [1, 2, 3]
    with pytest.raises(ValueError, match="covers no block"):
        distilled_layers(1, LossConfig())
    with pytest.raises(ValueError, match="a_layer"):
        LossConfig(a_layer=-1)
    with pytest.raises(ValueError, match="zero"):
        LossConfig(a_ce=0, a_layer=0, a_kl=0)
