"""Run an encoder classifier piece by piece: embed -> block i -> pooled head.

The encoder track's counterpart of ``LayerwiseModel`` (stages.py), with the same calls,
so ``cald_forward`` and ``teacher_forced_step`` run it unchanged. What differs from a
causal LM: batches are padded (the view reads the batch's ``attention_mask`` and a sentence
pair's ``token_type_ids``), the attention is bidirectional, and the head is pooling + a
linear classifier whose task loss is class cross-entropy (and whose KL is over class logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from ..conversion.classifier import pool
from ..conversion.registry import FamilyAdapter
from .losses import LossConfig, logit_kl
from .stages import Batch, LayerwiseModel

__all__ = ["EncoderLayerwise"]


class EncoderLayerwise(LayerwiseModel):
    """Block-by-block view of a ``CaldEncoderForSequenceClassification`` (teacher or student)."""

    @staticmethod
    def _parts(model: nn.Module, adapter: FamilyAdapter | None = None) -> tuple[nn.Module, FamilyAdapter, nn.Module]:
        # Teacher and student are the same class: their keys are shared from the top.
        return model, adapter or model.adapter, model.encoder

    @property
    def vocab_size(self) -> int:
        return self.model.config.num_labels

    @property
    def head_weight(self) -> None:
        return None

    def embed(self, batch: Batch) -> torch.Tensor:
        """The embedding output; a sentence pair's ``token_type_ids`` mark its second segment."""
        with self._scope():
            hidden = self.base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
            # ELECTRA-small's embeddings are narrower than its blocks: its model projects them up.
            project = getattr(self.base, "embeddings_project", None)
            return project(hidden) if project is not None else hidden

    def context(self, hidden: torch.Tensor, batch: Batch) -> dict:
        """The bidirectional attention mask (attention blocks) and the padding mask (mixers; attention
        ignores it, so teacher and student share one context)."""
        attention_mask = batch.get("attention_mask")
        with self._scope():
            ctx = {"attention_mask": create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask)}
            if attention_mask is not None:
                ctx["mixer_padding_mask"] = attention_mask
            return ctx

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (b, num_labels)."""
        with self._scope():
            pooled = pool(hidden, attention_mask, self.model.config.pooling)
            return self.model.classifier(self.model.dropout(pooled))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # post-LN blocks: the last block's output is what the head reads

    def head_losses(self, hidden: torch.Tensor, batch: Batch, cfg: LossConfig, *, teacher: "EncoderLayerwise | None" = None, teacher_h: torch.Tensor | None = None):
        """(class CE against ``batch["labels"]`` or None, KL to the teacher's class logits or None)."""
        mask = batch.get("attention_mask")
        want_kl = cfg.a_kl > 0 and teacher is not None and teacher_h is not None
        if not (cfg.a_ce > 0 or want_kl):
            return None, None
        logits = self.head(hidden, mask).float()
        ce = F.cross_entropy(logits, batch["labels"]) if cfg.a_ce > 0 else None
        kl = None
        if want_kl:
            with torch.no_grad():
                t_logits = teacher.head(teacher_h, mask).float()
            kl = logit_kl(logits, t_logits, cfg.kl_temperature)
        return ce, kl

    def task_loss(self, batch: Batch) -> torch.Tensor:
        """Class CE through the same pieces (the trajectory teacher's own fine-tuning)."""
        return F.cross_entropy(self.logits(batch).float(), batch["labels"])

    def logits(self, batch: Batch) -> torch.Tensor:
        """Plain full forward through the same pieces (evaluation)."""
        return self.head(self.last_hidden(batch), batch.get("attention_mask"))
