"""Run an HF causal LM piece by piece (embed -> block i -> head) and split it into stages.

Calling the wrapped submodules one by one, outside the engine's own forward, is what
lets teacher stage k feed student stage k: under ZeRO-3 each submodule's pre-forward
hook gathers its partitioned parameters on demand, so nothing else is needed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

from ..conversion.registry import FamilyAdapter, get_adapter
from .losses import RowPieces

__all__ = ["LayerwiseModel", "make_stages"]


def make_stages(num_layers: int, stage_size: int) -> list[range]:
    """Contiguous groups of ``stage_size`` blocks; the last may be shorter."""
    if stage_size < 1:
        raise ValueError(f"train.stage_size must be >= 1, got {stage_size}")
    return [range(a, min(a + stage_size, num_layers)) for a in range(0, num_layers, stage_size)]


class LayerwiseModel:
    """Block-by-block view of a (teacher or student) causal LM.

    ``model`` is the plain module (``engine.module`` under DeepSpeed); for a converted
    student the family's own model is its ``backbone``.
    """

    def __init__(self, model: nn.Module, *, activation_checkpointing: bool = False, scope: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model = model
        self.lm = getattr(model, "backbone", model)
        self.adapter: FamilyAdapter = get_adapter(self.lm.config.model_type)
        self.base = self.adapter.base(self.lm)
        self.blocks = self.adapter.layers(self.lm)
        self.activation_checkpointing = activation_checkpointing
        # Optional context entered around every computation (memory accounting in benchmarks).
        self._scope = scope or contextlib.nullcontext
        # Set by the engines for a frozen ZeRO-3 head: its rows, gathered a piece at a time
        # (the CE then never holds the whole head; see losses.vocab_streamed_cross_entropy).
        self.head_pieces: RowPieces | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding output (the input of block 0)."""
        with self._scope():
            hidden = self.lm.get_input_embeddings()(input_ids)
            if self.adapter.embed_dropout_attr:
                hidden = getattr(self.base, self.adapter.embed_dropout_attr)(hidden)
        return hidden

    def context(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> dict:
        """Block inputs besides the hidden state (positions, rotary embeddings, mask).

        ``hidden`` only lends its dtype and device. Teacher and student share one family
        config, so one context serves both when their dtypes agree.
        """
        with self._scope():
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            return {
                "position_ids": position_ids,
                "position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids),
                "attention_mask": create_causal_mask(
                    config=self.base.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
                ),
            }

    def block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        layer = self.blocks[index]
        with self._scope():
            if self.activation_checkpointing and torch.is_grad_enabled():
                return checkpoint(self._call_block, layer, hidden, ctx, use_reentrant=False)
            return self._call_block(layer, hidden, ctx)

    @staticmethod
    def _call_block(layer: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        out = layer(hidden, **ctx)
        return out[0] if isinstance(out, tuple) else out

    def blocks_iter(self, hidden: torch.Tensor, ctx: dict, indices: range) -> Iterator[torch.Tensor]:
        for i in indices:
            hidden = self.block(i, hidden, ctx)
            yield hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._scope():
            return self.lm.get_output_embeddings()(self.adapter.final_norm(self.lm)(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last hidden state as the head sees it: ``head(h) == final_norm(h) @ head_weight.T``."""
        with self._scope():
            return self.adapter.final_norm(self.lm)(hidden)

    @property
    def head_weight(self) -> torch.Tensor | None:
        """The LM head's weight when the head is a plain bias-free linear map (else None)."""
        head = self.lm.get_output_embeddings()
        return head.weight if isinstance(head, nn.Linear) and head.bias is None else None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain full forward through the same pieces (evaluation)."""
        hidden = self.embed(input_ids)
        ctx = self.context(hidden, input_ids)
        for i in range(self.num_layers):
            hidden = self.block(i, hidden, ctx)
        return self.head(hidden)
