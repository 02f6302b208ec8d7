"""The CALD objective: a_ce * task CE + a_layer * mean layer MSE(LN(s), LN(t)) + a_kl * T^2 KL(t || s)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["LossConfig", "layer_loss", "lm_cross_entropy", "logit_kl", "distilled_layers"]


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """Weights of the loss parts (paper LM defaults: a_ce 1, a_layer 15, a_kl 0)."""

    a_ce: float = 1.0
    """Weight of the task loss (next-token cross-entropy for LMs)."""
    a_layer: float = 15.0
    """Weight of the mean layerwise hidden-state MSE."""
    a_kl: float = 0.0
    """Weight of the logit KL to the teacher."""
    kl_temperature: float = 1.0
    """Softmax temperature T of the KL term (scaled by T^2)."""
    skip_first: int = 0
    """Number of leading blocks left out of the layer loss (the embedding output is never in it)."""
    skip_last: bool = True
    """Leave the last block out of the layer loss (paper default)."""

    def __post_init__(self):
        for name in ("a_ce", "a_layer", "a_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_temperature <= 0:
            raise ValueError(f"loss.kl_temperature must be > 0, got {self.kl_temperature}")
        if self.skip_first < 0:
            raise ValueError("loss.skip_first must be >= 0")
        if self.a_ce == self.a_layer == self.a_kl == 0:
            raise ValueError("all loss weights are zero: nothing to train")


def distilled_layers(num_layers: int, cfg: LossConfig) -> list[int]:
    """0-based block indices whose outputs enter the layer loss."""
    last = num_layers - 1 if cfg.skip_last else num_layers
    layers = list(range(cfg.skip_first, last))
    if cfg.a_layer > 0 and not layers:
        raise ValueError(f"the layer loss covers no block of a {num_layers}-layer model (skip_first={cfg.skip_first})")
    return layers


def layer_loss(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """MSE between parameter-free layer-normed hidden states (fp32 for stability)."""
    dim = (student_h.shape[-1],)
    return F.mse_loss(F.layer_norm(student_h.float(), dim), F.layer_norm(teacher_h.float(), dim))


def lm_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token CE over a packed batch (labels are the inputs shifted by one)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over tokens."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
