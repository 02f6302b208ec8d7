"""Model-family adapters: where a family keeps its blocks, attention and head.

Conversion, streaming and initialisation are generic; a family contributes only the
few facts that differ between HF modeling files (attribute paths, fused QKV layouts).
Adapters are found by the HF ``config.model_type``: a hand-written one when the family
registered it (``families.py``: the exceptions, and the families with a Bamba export),
otherwise one discovered from the family's own modeling code (``discovery.py``) and
cached per model type and config.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

__all__ = ["AttentionWeights", "BambaLayout", "FamilyAdapter", "register_family", "get_adapter", "supported_families"]


@dataclass
class AttentionWeights:
    """A teacher attention block's projections, in ``nn.Linear`` layout (out, in).

    q: (num_heads * head_dim, hidden); k, v: (num_kv_heads * head_dim, hidden);
    o: (hidden, num_heads * head_dim), or None when the family keeps its output projection
    outside the attention slot (BERT's ``attention.output.dense``): the mixer then stands for
    the attention's context and its own output projection starts as the identity.
    Biases may be None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor | None
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


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b`` for the dotted ``path`` "a.b" (a slot emptied with None reads None)."""
    return reduce(getattr, path.split("."), root)


@dataclass(frozen=True)
class FamilyAdapter:
    """What a model family looks like; everything else comes from the HF PreTrainedModel API."""

    model_type: str
    attention_attr: str
    """Dotted path of the attention slot inside a block (``self_attn``, ``attention``,
    BERT's ``attention.self``): the module that a mixer replaces."""
    final_norm_attr: str | None
    """Dotted path of the final norm on the base model (``norm``, ``final_layer_norm``);
    None for post-LN encoders, whose last block ends in its own norm."""
    read_attention: Callable[[nn.Module, object], AttentionWeights]
    """Reads Q/K/V/O from one attention slot (given the model config). ``o`` is None when
    the output projection sits outside the slot (BERT's ``attention.output.dense``) and is
    therefore kept, copied like any other weight. It selects rows of the slot's tensors
    (splitting, viewing, indexing, joining), whatever their dtype, and leaves their columns as
    they are: a ZeRO-3 rank learns which checkpoint rows it needs by running it on one-column
    integer stand-ins (``attention_rows.py``; a reader that transposes or computes on its
    weights is found out there and read whole, one that reorders columns would not be)."""
    layers_attr: str = "layers"
    """Dotted path of the ``nn.ModuleList`` of blocks on the base model (BERT: ``encoder.layer``)."""
    embed_dropout_attr: str | None = None
    """Optional dropout applied to embeddings on the base model (gpt_neox ``emb_dropout``)."""
    embed_dropout_outside: float = 0.0
    """A dropout rate the family's forward applies to the embeddings itself, outside any module
    (XGLM, BioGPT: the rate their blocks' owner holds), which the layerwise view applies the
    same way; 0: none (OPT holds such a rate and does not use it)."""
    attention_extras: tuple[str, ...] = ()
    """Weights of the attention slot besides its projections (Qwen3's q_norm / k_norm, gpt_oss's
    sinks): the attention-informed mixer init maps the projections alone."""
    position_embedding_attr: str | None = None
    """Absolute position embeddings on the base model, added to the token embeddings (GPT-2's
    ``wpe``, XGLM's sinusoidal table); None: positions enter inside the blocks (rotary)."""
    position_table_fixed: bool = False
    """The position table has a row per trained position (an embedding: GPT-2, OPT), so a
    student that keeps it takes no longer context than the teacher; XGLM's sinusoidal table
    is computed for any length."""
    bamba: BambaLayout | None = None
    """The native Bamba export of this family's students; None: Bamba cannot express it."""
    bamba_refusal: str = ""
    """Why a family without ``bamba`` cannot export to Bamba (shown to the user)."""
    embed_multiplier: float = 1.0
    """What the family's model forward multiplies the embedding output by, outside any module
    (Granite's ``embedding_multiplier``); block by block it must be applied the same way."""
    logit_multiplier: float = 1.0
    """What its causal-LM forward multiplies the logits by (Granite's 1 / ``logits_scaling``,
    Cohere's ``logit_scale``)."""

    # --- accessors used by conversion and streaming -------------------------------------
    @staticmethod
    def base(model: nn.Module) -> nn.Module:
        return model.base_model if hasattr(model, "base_model") else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _resolve(self.base(model), self.layers_attr)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return _resolve(self.base(model), self.final_norm_attr) if self.final_norm_attr else None

    def attention(self, layer: nn.Module) -> nn.Module:
        return _resolve(layer, self.attention_attr)

    def set_attention(self, layer: nn.Module, module: nn.Module | None) -> None:
        parent, _, name = self.attention_attr.rpartition(".")
        setattr(_resolve(layer, parent) if parent else layer, name, module)


_REGISTRY: dict[str, FamilyAdapter] = {}
_DISCOVERED: dict[tuple[str, str | None], FamilyAdapter] = {}
"""Discovered adapters by (model type, the config's JSON): a second config of one family (other
heads, other multipliers) is inspected and checked on its own."""


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_families() -> str:
    """Which families convert: the hand-written adapters, and the rule for every other family."""
    from . import families  # noqa: F401  (registers the built-in families)
    from .discovery import DISCOVERABLE

    found = f"; discovered so far: {', '.join(sorted({model_type for model_type, _ in _DISCOVERED}))}" if _DISCOVERED else ""
    return (
        f"hand-written adapters for {', '.join(sorted(_REGISTRY))}; any other family is discovered from its "
        f"modeling code when its blocks hold one attention module with {DISCOVERABLE}{found}"
    )


def get_adapter(config_or_model_type: PretrainedConfig | str) -> FamilyAdapter:
    """The adapter of a family: hand-written, or discovered once per model type.

    Give the teacher's config where there is one: discovery then inspects exactly the
    architecture that will be converted (on the meta device, so no memory and no weights).
    A family that cannot be converted raises one ValueError naming what is missing.
    """
    from . import families  # noqa: F401
    from .discovery import check_block_by_block, discover_adapter

    if isinstance(config_or_model_type, str):
        model_type, config = config_or_model_type, None
    else:
        model_type, config = config_or_model_type.model_type, config_or_model_type
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    key = (model_type, config.to_json_string(use_diff=False) if config is not None else None)
    if key not in _DISCOVERED:
        if config is None:
            try:
                config = AutoConfig.for_model(model_type)
            except ValueError as err:
                raise ValueError(
                    f"model family {model_type!r} is not supported for conversion: transformers has no config for it "
                    f"({supported_families()})"
                ) from err
        adapter = discover_adapter(config, handwritten=sorted(_REGISTRY))
        _DISCOVERED[key] = check_block_by_block(config, adapter, handwritten=sorted(_REGISTRY))
    return _DISCOVERED[key]
