"""Run an HF causal LM piece by piece (embed -> block i -> head) and split it into stages.

Calling the wrapped submodules one by one, outside the engine's own forward, is what
lets teacher stage k feed student stage k: under ZeRO-3 each submodule's pre-forward
hook gathers its partitioned parameters on demand, so nothing else is needed.

Each block gets the inputs its attention type needs, as the family's own forward gives
them: a sliding-window layer its sliding-window mask (and, where the family's rotary
embedding differs by layer type, its own position embeddings).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..conversion.modeling import ATTENTION_TYPES, attention_types
from ..conversion.registry import FamilyAdapter, get_adapter
from ..engines.zero3 import needs_grad_input
from .losses import LossConfig, RowPieces, _call_as_forward, linear_head_losses, lm_head_losses, next_token_nll, vocab_streamed_cross_entropy

__all__ = ["Batch", "LayerwiseModel", "PerLayerType", "as_batch", "attention_types", "layerwise", "make_stages"]

Batch = dict[str, torch.Tensor]
"""A micro-batch by input name: ``input_ids``, and for padded tasks ``attention_mask`` (and
``labels``, ``token_type_ids``). Only the views read the names: the step passes batches through."""

# The causal mask of each attention type (the names transformers uses in ``config.layer_types``).
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
assert set(_MASKS) == set(ATTENTION_TYPES)


def as_batch(batch: Batch | torch.Tensor) -> Batch:
    """A micro-batch as a dict (a bare tensor is a packed LM batch of ``input_ids``)."""
    return {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch


def make_stages(num_layers: int, stage_size: int) -> list[range]:
    """Contiguous groups of ``stage_size`` blocks; the last may be shorter."""
    if stage_size < 1:
        raise ValueError(f"train.stage_size must be >= 1, got {stage_size}")
    return [range(a, min(a + stage_size, num_layers)) for a in range(0, num_layers, stage_size)]


class PerLayerType(dict):
    """A block input that differs by attention type: attention type -> value (see ``LayerwiseModel.block``)."""


class LayerwiseModel:
    """Block-by-block view of a (teacher or student) causal LM.

    ``model`` is the plain module (``engine.module`` under DeepSpeed); for a converted
    student the family's own model is its ``backbone``.

    The view owns its inputs: ``embed``, ``context``, ``token_mask`` and the head read what
    they need from the batch, so the distillation step runs any task's views unchanged (an
    encoder's segment ids and padding, later a speech encoder's frames).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activation_checkpointing: bool = False,
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        head_chunk_tokens: int | None = None,
        adapter: FamilyAdapter | None = None,
    ):
        self.model = model
        self.lm, self.adapter, self.base = self._parts(model, adapter)
        self.blocks = self.adapter.layers(self.lm)
        self.layer_types = attention_types(self.lm.config, len(self.blocks))
        # NOTE: families whose rotary embedding differs by layer type (Olmo3, Gemma3) take it as an argument.
        rotary = getattr(self.base, "rotary_emb", None)
        self._rotary_by_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self.activation_checkpointing = activation_checkpointing
        # Optional context entered around every computation (memory accounting in benchmarks).
        self._scope = scope or contextlib.nullcontext
        # Set by the engines for a frozen ZeRO-3 head: its rows, gathered a piece at a time
        # (the CE then never holds the whole head; see losses.vocab_streamed_cross_entropy).
        self.head_pieces: RowPieces | None = None
        # The run's loss.head_chunk_tokens (None: automatic) for the passes outside a phase's loss:
        # evaluation and a trajectory teacher's own fine-tuning.
        self.head_chunk_tokens = head_chunk_tokens

    @staticmethod
    def _parts(model: nn.Module, adapter: FamilyAdapter | None = None) -> tuple[nn.Module, FamilyAdapter, nn.Module]:
        """(the module whose keys teacher and student share, its family adapter, the family's
        base model); for a converted student the family's own model is its ``backbone``.
        ``adapter``: the family's, when known (discovery checks one it has not cached yet)."""
        lm = getattr(model, "backbone", model)
        adapter = adapter or get_adapter(lm.config)
        return lm, adapter, adapter.base(lm)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def embed(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """The embedding output (the input of block 0)."""
        with self._scope():
            hidden = self.lm.get_input_embeddings()(as_batch(batch)["input_ids"])
            if self.adapter.embed_multiplier != 1.0:  # as the family's model forward does (Granite)
                hidden = hidden * self.adapter.embed_multiplier
            if self.adapter.position_embedding_attr:  # absolute positions (GPT-2, XGLM): a packed batch's 0..l-1
                hidden = hidden + self._absolute_positions(hidden)
            if self.adapter.embed_dropout_attr:
                hidden = getattr(self.base, self.adapter.embed_dropout_attr)(hidden)
            elif self.adapter.embed_dropout_outside:  # XGLM, BioGPT: a call in their forward, at the blocks' owner's rate
                owner = self.base.get_submodule(self.adapter.layers_attr.rpartition(".")[0])
                hidden = F.dropout(hidden, p=self.adapter.embed_dropout_outside, training=owner.training)
        return hidden

    def _absolute_positions(self, hidden: torch.Tensor) -> torch.Tensor:
        table = self.base.get_submodule(self.adapter.position_embedding_attr)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if type(table) is nn.Embedding:
            return table(position_ids)
        # NOTE: the families' own tables take position_ids by name (OPT's first argument is a
        # mask it reads only when position_ids is None); their offsets are theirs to add.
        takes_mask = "attention_mask" in inspect.signature(table.forward).parameters
        return table(position_ids=position_ids, **({"attention_mask": None} if takes_mask else {})).to(hidden.dtype)

    def context(self, hidden: torch.Tensor, batch: Batch | torch.Tensor) -> dict:
        """Block inputs besides the hidden state (positions, rotary embeddings, masks).

        Built once per batch, one mask per attention type present (``PerLayerType``);
        ``block`` hands each layer those of its type. ``hidden`` lends its length, dtype and
        device (packed LM batches need nothing else of the batch). Teacher and student share
        one family config, so one context serves both when their dtypes agree.
        """
        with self._scope():
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            types = sorted(set(self.layer_types))
            masks = PerLayerType(
                (kind, _MASKS[kind](config=self.base.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids))
                for kind in types
            )
            ctx = {"position_ids": position_ids, "attention_mask": masks}
            if self.adapter.position_embedding_attr:  # positions were added to the embeddings
                return ctx
            if self._rotary_by_type:
                ctx["position_embeddings"] = PerLayerType((kind, self.base.rotary_emb(hidden, position_ids, kind)) for kind in types)
            else:
                ctx["position_embeddings"] = self.base.rotary_emb(hidden, position_ids=position_ids)
            return ctx

    def token_mask(self, batch: Batch | torch.Tensor) -> torch.Tensor | None:
        """(b, l) 1 where a block output is a real token, 0 at padding; None: every position
        is (a packed batch). The layer losses, their token count and the drift read this."""
        return as_batch(batch).get("attention_mask")

    def block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        layer = self.blocks[index]
        # Inputs that differ by attention type: this layer's own.
        ctx = {k: v[self.layer_types[index]] if isinstance(v, PerLayerType) else v for k, v in ctx.items()}
        if torch.is_grad_enabled() and not hidden.requires_grad and needs_grad_input(layer):
            # A trainable ZeRO-3 leaf block: its gradients are reduced once its input's gradient
            # exists, so it needs an input that has one (one extra input gradient, discarded).
            hidden = hidden.detach().requires_grad_()
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
            logits = self.lm.get_output_embeddings()(self._final_norm(hidden))
            if self.adapter.logit_multiplier != 1.0:  # as the family's causal-LM forward does (Granite, Cohere)
                logits = logits * self.adapter.logit_multiplier
            cap = self._logit_softcap
            # As Gemma2ForCausalLM.forward does it (same operations, same rounding).
            return torch.tanh(logits / cap) * cap if cap is not None else logits

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last hidden state as the head sees it: ``head(h) == final_norm(h) @ head_weight.T``."""
        with self._scope():
            return self._final_norm(hidden)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.adapter.final_norm(self.lm)
        return norm(hidden) if norm is not None else hidden  # none: a post-LN family

    @property
    def _logit_softcap(self) -> float | None:
        return getattr(self.lm.config, "final_logit_softcapping", None)

    @property
    def head_weight(self) -> torch.Tensor | None:
        """The LM head's weight when the head is a plain bias-free linear map (else None;
        soft-capped or scaled logits (Gemma2; Granite, Cohere) are not a plain linear map of the final norm's output)."""
        head = self.lm.get_output_embeddings()
        plain = isinstance(head, nn.Linear) and head.bias is None and self._logit_softcap is None and self.adapter.logit_multiplier == 1.0
        return head.weight if plain else None

    def head_losses(self, hidden: torch.Tensor, batch: dict, cfg: LossConfig, *, teacher: "LayerwiseModel | None" = None, teacher_h: torch.Tensor | None = None):
        """(next-token CE or None, KL to the teacher's logits or None) from the last block's output.

        The logits are never materialised for more than a chunk of tokens at a time; a frozen
        ZeRO-3 head is read piece by piece when no KL needs whole logit rows.
        """
        input_ids = as_batch(batch)["input_ids"]
        want_kl = cfg.a_kl > 0 and teacher is not None and teacher_h is not None
        if cfg.a_ce > 0 and not want_kl and self.head_pieces is not None:
            return vocab_streamed_cross_entropy(self.final_norm(hidden), input_ids, self.head_pieces), None
        if not (cfg.a_ce > 0 or want_kl):
            return None, None
        kw = dict(
            want_ce=cfg.a_ce > 0,
            teacher_h=teacher_h if want_kl else None,
            teacher_head=teacher.head if want_kl else None,
            temperature=cfg.kl_temperature,
            chunk_tokens=cfg.chunk_tokens(self.vocab_size),
        )
        if self.head_weight is None:  # a head that is not a plain linear map: chunks through the module
            return lm_head_losses(hidden, input_ids, self.head, **kw)
        # One weight gradient for all chunks (a trained head, tied or not); see linear_head_losses.
        with self._scope():
            return linear_head_losses(self.final_norm(hidden), input_ids, self.lm.get_output_embeddings(), **kw)

    @property
    def chunk_tokens(self) -> int:
        """Tokens per logits chunk outside a phase's loss (``head_chunk_tokens``, or automatic)."""
        return LossConfig(head_chunk_tokens=self.head_chunk_tokens).chunk_tokens(self.vocab_size)

    def task_loss(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """The model's own task loss (next-token CE) through the same pieces: a teacher fine-tuning."""
        ce, _ = lm_head_losses(self.last_hidden(batch), as_batch(batch)["input_ids"], self.head, want_ce=True, chunk_tokens=self.chunk_tokens)
        return ce

    def logits(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Plain full forward through the same pieces."""
        return self.head(self.last_hidden(batch))

    @torch.no_grad()
    def next_token_nll(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, l) NLL of each next token (0 at the last position): evaluation, with the logits
        never whole (a 150k vocabulary makes them the largest tensor of an eval batch)."""
        hidden = self.last_hidden(input_ids)
        chunk = self.chunk_tokens
        if self.head_weight is None:  # a head that is not a plain linear map: chunks through the module
            return next_token_nll(hidden, input_ids, self.head, chunk_tokens=chunk)
        head = self.lm.get_output_embeddings()
        with self._scope():  # NOTE: as the head's own call, so ZeRO-3 gathers its weight once for all chunks
            return _call_as_forward(head, lambda x: next_token_nll(x, input_ids, lambda c: F.linear(c, head.weight), chunk_tokens=chunk), self.final_norm(hidden))

    def last_hidden(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """The last block's output, every block run in turn."""
        hidden = self.embed(batch)
        ctx = self.context(hidden, batch)
        for i in range(self.num_layers):
            hidden = self.block(i, hidden, ctx)
        return hidden


def layerwise(model: nn.Module, **kwargs) -> LayerwiseModel:
    """The block-by-block view that fits ``model``: an encoder classifier's (``EncoderLayerwise``)
    or a causal LM's."""
    from ..conversion.classifier import CaldEncoderForSequenceClassification
    from .encoder_stages import EncoderLayerwise  # NOTE: imported here: it builds on this module

    view = EncoderLayerwise if isinstance(model, CaldEncoderForSequenceClassification) else LayerwiseModel
    return view(model, **kwargs)
