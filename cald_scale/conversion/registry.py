"""Model-family adapters: where a family keeps its blocks, attention and head.

Conversion, streaming and initialisation are generic; a family contributes only the
few facts that differ between HF modeling files (attribute names, fused QKV layouts).
Adapters are found by the HF ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["AttentionWeights", "BambaLayout", "FamilyAdapter", "register_family", "get_adapter", "supported_families"]


@dataclass
class AttentionWeights:
    """A teacher attention block's projections, in ``nn.Linear`` layout (out, in).

    q: (num_heads * head_dim, hidden); k, v: (num_kv_heads * head_dim, hidden);
    o: (hidden, num_heads * head_dim). Biases may be None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class BambaLayout:
    """How a family's decoder maps onto transformers' ``BambaForCausalLM`` (native export).

    Bamba's block is a pre-norm Llama block whose token mixer is a Mamba2 mixer or a Llama
    attention, so a family of that shape exports by renaming keys.
    """

    key_renames: tuple[tuple[str, str], ...]
    """(regex, replacement) pairs applied in order to each student backbone key."""
    attention_bias: Callable[[object], bool]
    """Bamba's ``attention_bias`` (one flag for q/k/v/o) for a teacher config."""
    zero_filled: tuple[str, ...] = ()
    """Suffixes of Bamba parameters the family does not have but that equal zero (qwen2's
    o_proj has no bias; with attention_bias Bamba gives it one, so it is exported as zeros)."""


@dataclass(frozen=True)
class FamilyAdapter:
    """What a model family looks like; everything else comes from the HF PreTrainedModel API."""

    model_type: str
    attention_attr: str
    """Name of the attention module inside a decoder layer (``self_attn``, ``attention``)."""
    final_norm_attr: str
    """Name of the final norm on the base model (``norm``, ``final_layer_norm``)."""
    read_attention: Callable[[nn.Module, object], AttentionWeights]
    """Reads Q/K/V/O from one attention module (given the model config)."""
    embed_dropout_attr: str | None = None
    """Optional dropout applied to embeddings on the base model (gpt_neox ``emb_dropout``)."""
    bamba: BambaLayout | None = None
    """The native Bamba export of this family's students; None: Bamba cannot express it."""
    bamba_refusal: str = ""
    """Why a family without ``bamba`` cannot export to Bamba (shown to the user)."""

    # --- accessors used by conversion and streaming -------------------------------------
    @staticmethod
    def base(model: nn.Module) -> nn.Module:
        return model.base_model if hasattr(model, "base_model") else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.base(model), self.final_norm_attr)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_attr)

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.attention_attr, module)


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    from . import families  # noqa: F401  (registers the built-in families)

    return sorted(_REGISTRY)


def get_adapter(model_type: str) -> FamilyAdapter:
    from . import families  # noqa: F401

    if model_type not in _REGISTRY:
        raise ValueError(
            f"model family {model_type!r} is not supported for conversion; supported families: "
            f"{supported_families()}. A new family needs a small FamilyAdapter in "
            "cald_scale/conversion/families.py."
        )
    return _REGISTRY[model_type]
