"""Discover a family's adapter from its own modeling code, on a meta-device skeleton.

A family with no hand-written adapter converts when its layout is unambiguous:

1. the blocks: the single ``nn.ModuleList`` of ``num_hidden_layers`` modules under the base model;
2. the attention slot: the one module of a block whose children are the projections of a
   known layout (``PROJECTION_LAYOUTS``), at the same path in every block, with the
   shapes the config's head geometry gives;
3. the final norm: the norm module on the base model after the blocks (none: a post-LN encoder);
4. the embedding dropout: a dropout on the base model before the blocks (if any).

The skeleton is built on the meta device, so discovery reads no weights and allocates no
memory; anything else is refused here, before any weight is read, in one line naming
what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING
from transformers.pytorch_utils import Conv1D

from .families import (
    read_c_attn_linear,
    read_fused_qkv,
    read_gpt2_conv1d,
    read_query_key_value,
    read_query_key_value_dense,
    read_separate_qkv_dense,
    read_separate_qkv_out_proj,
    read_separate_qkvo,
)
from .modeling import family_attention, teacher_geometry
from .registry import AttentionWeights, FamilyAdapter

__all__ = ["ProjectionLayout", "PROJECTION_LAYOUTS", "DISCOVERABLE", "check_block_by_block", "discover_adapter", "is_encoder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectionLayout:
    """Child names that mark a module as an attention slot, and how to read its Q/K/V/O."""

    children: tuple[str, ...]
    read: Callable[[nn.Module, object], AttentionWeights]
    child_type: type[nn.Module] | None = None
    """The type the children must have where names alone are ambiguous (GPT-2's c_attn is a
    ``Conv1D``, GPTBigCode's an ``nn.Linear``)."""

    def matches(self, module: nn.Module) -> bool:
        names = {name for name, _ in module.named_children()}
        if not set(self.children) <= names:
            return False
        return self.child_type is None or all(isinstance(getattr(module, name), self.child_type) for name in self.children)


PROJECTION_LAYOUTS = (
    ProjectionLayout(("q_proj", "k_proj", "v_proj", "o_proj"), read_separate_qkvo),
    ProjectionLayout(("q_proj", "k_proj", "v_proj", "out_proj"), read_separate_qkv_out_proj),
    ProjectionLayout(("q_proj", "k_proj", "v_proj", "dense"), read_separate_qkv_dense),
    ProjectionLayout(("qkv_proj", "o_proj"), read_fused_qkv),
    ProjectionLayout(("c_attn", "c_proj"), read_gpt2_conv1d, Conv1D),
    ProjectionLayout(("c_attn", "c_proj"), read_c_attn_linear, nn.Linear),
    ProjectionLayout(("query_key_value", "dense"), read_query_key_value_dense),
    ProjectionLayout(("query", "key", "value"), read_query_key_value),
)
DISCOVERABLE = (
    "q_proj/k_proj/v_proj with o_proj, out_proj or dense, a fused qkv_proj [q | k | v] with o_proj, a fused "
    "c_attn [q | k | v] with c_proj (GPT-2's Conv1D or nn.Linear), a fused query_key_value with dense (Falcon, "
    "Persimmon), or query/key/value (BERT)"
)


class _Refusal(ValueError):
    """What makes a family unconvertible (turned into the one-line error of ``discover_adapter``)."""


def discover_adapter(config: PretrainedConfig, handwritten: list[str]) -> FamilyAdapter:
    """The adapter of ``config``'s family, read off a meta-device model built from it."""
    model_type = config.model_type
    try:
        skeleton = _skeleton(config)
        _refuse_unreadable_checkpoints(skeleton)
        base = FamilyAdapter.base(skeleton)
        layers_attr = _find_layers(base, config)
        layers = base.get_submodule(layers_attr)
        attention_attr, layout = _find_attention(layers)
        _refuse_alibi(config, layers[0])
        slot = layers[0].get_submodule(attention_attr)
        _check_geometry(layout, slot, config, attention_attr)
        # Weights the attention-informed init does not map (said when a conversion initialises from them).
        extra = [name for name, child in slot.named_children() if name not in layout.children and any(True for _ in child.parameters())]
        extra += [name for name, _ in slot.named_parameters(recurse=False)]  # e.g. gpt_oss's sinks, DiffLlama's lambdas
        final_norm_attr = _find_final_norm(base, layers_attr)
        embed_dropout_attr = _find_embed_dropout(base, layers_attr)
        # NOTE: decoders only: an encoder's embeddings module adds its own (RoFormer's "positional" module is rotary).
        position_embedding_attr = None if is_encoder(config) else _find_position_embedding(base, layers_attr)
        # NOTE: XGLM, BioGPT: a dropout call in the forward, outside any module, at the rate the
        # blocks' owner holds. A candidate here: check_block_by_block keeps it if the forward uses it.
        rate = getattr(base.get_submodule(layers_attr.rpartition(".")[0]), "dropout", None)
        embed_dropout_outside = float(rate) if embed_dropout_attr is None and isinstance(rate, (int, float)) and rate > 0 else 0.0
    except _Refusal as err:
        raise ValueError(
            f"cannot convert model type {model_type!r}: {err}. A family with another layout needs a hand-written "
            f"FamilyAdapter in cald_scale/conversion/families.py (hand-written: {', '.join(handwritten)})"
        ) from None
    # NOTE: RuntimeError: transformers' per-layer configs (gemma4_text) refuse a global head_dim with one.
    except (AttributeError, TypeError, RuntimeError) as err:  # a config without one decoder's fields (multimodal, per-layer geometry)
        raise ValueError(
            f"cannot convert model type {model_type!r}: its config does not describe one decoder stack ({type(err).__name__}: {err}); "
            "for a multimodal model, convert its text model (its text_config) as the teacher"
        ) from None
    return FamilyAdapter(
        model_type=model_type,
        attention_attr=attention_attr,
        final_norm_attr=final_norm_attr,
        read_attention=layout.read,
        layers_attr=layers_attr,
        embed_dropout_attr=embed_dropout_attr,
        embed_dropout_outside=embed_dropout_outside,
        attention_extras=tuple(extra),
        position_embedding_attr=position_embedding_attr,
        position_table_fixed=position_embedding_attr is not None and isinstance(base.get_submodule(position_embedding_attr), nn.Embedding),
        bamba_refusal=(
            f"{model_type} has no Bamba layout: Bamba's blocks are llama-shaped (a norm, the mixer or attention, a norm, "
            "the MLP, each on the residual in turn), and only the hand-written llama, mistral and qwen2 adapters map onto them"
        ),
        # NOTE: scales a family's forward applies outside its modules; check_block_by_block confirms
        # that the blocks, these and the head give the forward's logits.
        embed_multiplier=float(getattr(config, "embedding_multiplier", None) or 1.0),
        logit_multiplier=float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0),
    )


# The tiny copy check_block_by_block builds: the family's own config with small sizes.
_TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
_TINY_IF_SET = {"head_dim": 16, "rotary_dim": 8, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1}
_TOLERANCE = 1e-4
# Fields a family stores equal to the width unless the model projects to another (OPT's
# word_embed_proj_dim: 768 in opt-125m's config, 512 in opt-350m's, which projects in and out).
_WIDTH_COPIES = ("word_embed_proj_dim",)


def check_block_by_block(config: PretrainedConfig, adapter: FamilyAdapter, handwritten: list[str]) -> FamilyAdapter:
    """``adapter``, checked: refuse a discovered causal-LM family whose forward does more than
    its blocks and head.

    Distillation runs a teacher block by block (embedding, blocks, final norm, head:
    ``LayerwiseModel``), so anything the family's forward does outside those modules that the
    adapter does not know of (a scale on the embeddings or logits other than the config's
    multipliers, a residual from the embedding into a later block) would make every layer's
    target wrong, silently. A tiny random copy of ``config`` (two blocks, width 64) is run both
    ways; a copy that cannot be built or run is reported and not checked. ``logits_scaling``
    divides the logits in Granite's families and multiplies them in HyperCLOVAX's: the
    direction the forward takes is the one returned.
    """
    if is_encoder(config) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return adapter
    from ..distill.stages import LayerwiseModel  # NOTE: imported here: it builds on the registry

    try:
        tiny = _tiny_copy(config)
        # NOTE: on the CPU and whole even when asked for inside a meta-device build, DeepSpeed's
        # zero.Init or transformers' no_init_weights (from_pretrained under ZeRO-3): the weights
        # are drawn here, by tensor methods no such context replaces.
        # The forwards run there too: under from_pretrained's meta device, a sliding-window
        # family's cache would make its tensors on meta (Gemma2). The run's kernel, as it runs.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), _outside_zero_init(), torch.no_grad():
            torch.manual_seed(0)
            kernel = family_attention(tiny, tiny._attn_implementation)
            model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32, attn_implementation=kernel).eval()
            for name, param in model.named_parameters():
                param.normal_(1.0 if param.dim() == 1 and name.endswith("weight") else 0.0, 0.1 if param.dim() == 1 else 0.2)
            ids = torch.randint(3, tiny.vocab_size, (2, 12))
            expected = model(input_ids=ids, use_cache=False).logits
            _check_attention_slot(tiny, model, adapter)
            if not expected.isfinite().all():
                raise ArithmeticError("its forward gives non-finite logits")
            scaling = float(getattr(config, "logits_scaling", None) or 1.0)
            candidates = [adapter] + ([dataclasses.replace(adapter, logit_multiplier=adapter.logit_multiplier * scaling**2)] if scaling != 1.0 else [])
            gaps = []
            for candidate in candidates:
                try:
                    got = LayerwiseModel(model, adapter=candidate).logits(ids)
                except ValueError as refused:  # what LayerwiseModel refuses by name (a layer type it cannot run): now, not mid-run
                    raise _Refusal(str(refused)) from None
                except Exception as err:  # noqa: BLE001 - the family's own forward ran: the view cannot run this family
                    raise _Refusal(
                        f"cannot convert model type {config.model_type!r}: its blocks cannot be run one at a time by the layerwise "
                        f"view distillation uses (on a tiny random copy of its config, {_shrunk(config, tiny)}, whose own forward "
                        f"runs: {type(err).__name__}: {err}); "
                        "the view runs the input embedding (plus an absolute position table before the blocks, if any), the blocks "
                        "(given the base model's rotary embedding otherwise), the final norm and the head"
                    ) from None
                gaps.append((got - expected).abs().max().item())
                if gaps[-1] <= _TOLERANCE * max(1.0, expected.abs().max().item()):
                    if candidate.embed_dropout_outside and not _drops_out_embeddings(model, candidate, ids):
                        candidate = dataclasses.replace(candidate, embed_dropout_outside=0.0)  # OPT keeps the rate, unused
                    return candidate
    except _Refusal as refused:
        raise ValueError(str(refused)) from None
    except Exception as err:  # noqa: BLE001 - a family whose config does not shrink this way: say so, convert
        logger.warning("%s: could not check block-by-block logits on a tiny copy (%s: %s)", config.model_type, type(err).__name__, err)
        return adapter
    raise ValueError(
        f"cannot convert model type {config.model_type!r}: its forward does more than its embedding, blocks, final norm and "
        f"head (block by block, a tiny random copy's logits differ from its forward's by {min(gaps):.3g}), so every layer's "
        "distillation target would be wrong. It needs a hand-written FamilyAdapter in cald_scale/conversion/families.py "
        f"(hand-written: {', '.join(handwritten)})"
    )


# The kernel the Q/K check runs a tiny copy with (registered with transformers on first use).
_CAPTURE_KERNEL = "cald_scale_capture"
_CAPTURED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cald_captured_attention", default=None)
# Least cosine between a head's query (key) as read and as the kernel gets it: q/k norms' gains
# (drawn near 1 on the tiny copy) leave 0.99 or more; another head's or the key's rows, about 0.
_MIN_HEAD_COSINE = 0.95


def _capturing_kernel(module, query, key, value, *args, **kwargs):
    """An attention kernel for one token: records the query and key states it gets, returns the
    value (a query's only key gets all of its weight, whatever mask, scale or softcap)."""
    captured = _CAPTURED.get()
    if captured is None:  # registered with transformers for the process: a model of the user's that names it
        raise RuntimeError(f"{_CAPTURE_KERNEL!r} is cald_scale's recording kernel for its conversion checks, not an attention implementation")
    captured.setdefault(id(module), (query, key))
    return value.repeat_interleave(query.shape[1] // value.shape[1], dim=1).transpose(1, 2).contiguous(), None


def _check_attention_slot(config: PretrainedConfig, model: nn.Module, adapter: FamilyAdapter) -> None:
    """The slot a mixer takes, run on one token (``config``: the tiny copy's):

    - it returns what a mixer returns in its place, ``(output, weights)`` as attention does in
      transformers; one that returns more (GPT-NeoX-Japanese hands its output projection's bias
      to the block) or a bare tensor leaves its block expecting what no mixer gives;
    - the reader's Q and K rows are the ones it computes with (``_check_query_key_rows``);
    - the reader's V and O rows are the ones it computes with: over one token attention returns
      O(V x) (each query head attends to itself only, whatever Q, K, rotary or scale), so a reader
      that splits a fused projection in the wrong order (head by head read as ``[q | k | v]``) is
      refused here instead of starting every mixer from the wrong rows. Skipped where the
      attention has no output projection in the slot.

    The rows are not compared where the attention holds weights besides norms (gpt-oss's sinks
    and DiffLlama's lambdas change what one token gets, Dory's scales its queries per channel).
    """
    slot = adapter.attention(adapter.layers(model)[0])
    seen = {}

    def capture(module, args, kwargs, out):
        seen["x"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), out

    hook = slot.register_forward_hook(capture, with_kwargs=True)
    try:
        model(input_ids=torch.tensor([[5]]), use_cache=False)
    finally:
        hook.remove()
    if "out" not in seen:
        return
    returned = seen["out"]
    if not (isinstance(returned, (tuple, list)) and len(returned) <= 2):
        what = f"{len(returned)} values" if isinstance(returned, (tuple, list)) else f"a {type(returned).__name__}"
        raise _Refusal(
            f"cannot convert model type {config.model_type!r}: its attention ({type(slot).__name__}) returns {what} to its "
            "block, where a mixer in its place returns (output, attention weights) as attention does in transformers"
        )
    if any("norm" not in name for name in adapter.attention_extras):
        return  # weights besides norms change what one token gets (sinks, lambdas, Dory's per-channel query scales)
    weights = adapter.read_attention(slot, config)
    _check_query_key_rows(config, model, slot, weights, seen["x"], adapter.attention_extras)
    if weights.o is None:
        return
    _, heads, kv_heads, head_dim = teacher_geometry(config)

    def per_query_head(t):  # K/V rows of each group, repeated for its query heads (grouped-query attention)
        return t.unflatten(0, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)

    v_bias = per_query_head(weights.v_bias) if weights.v_bias is not None else None
    got = nn.functional.linear(nn.functional.linear(seen["x"], per_query_head(weights.v), v_bias), weights.o, weights.o_bias)
    out = returned[0]
    gap = (got - out).abs().max().item()
    if not gap <= _TOLERANCE * max(1.0, out.abs().max().item()):
        raise _Refusal(
            f"cannot convert model type {config.model_type!r}: its attention projections are not read as its forward uses them "
            f"(on one token, the value and output rows read give an output {gap:.3g} from its attention's); it needs a reader "
            f"for its layout in cald_scale/conversion/families.py"
        )


def _check_query_key_rows(
    config: PretrainedConfig, model: nn.Module, slot: nn.Module, weights: AttentionWeights, x: torch.Tensor, extras: tuple[str, ...]
) -> None:
    """The reader's Q and K rows are the ones the attention computes with. On one token, at
    position 0, rotary is the identity, so the query and key states the attention hands its
    kernel are its Q and K projections of ``x`` (the slot's input) through its q/k norms (the
    slot's own modules, applied here too), up to a scale: each head's must point where the
    reader's rows for that head point. A reader that swaps Q and K, or splits their heads in
    another order, is refused here; the mixer would start from the wrong rows, silently. The
    kernel is swapped for one that records its inputs (``_capturing_kernel``); an attention that
    calls no kernel through transformers' ``AttentionInterface`` (GPT-Neo), or holds a norm
    that is not a q or k norm, is not checked."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    norms = {"query": None, "key": None}
    for name in (e for e in extras if "norm" in e.lower()):
        which = {"q": "query", "k": "key"}.get(name.lower()[0])  # q_norm, q_layernorm, query_layernorm; k_...
        if which is None:
            return  # a norm inside the attention that is neither (BitNet's before its output projection)
        norms[which] = slot.get_submodule(name)

    if _CAPTURE_KERNEL not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_CAPTURE_KERNEL, _capturing_kernel)
    was, captured = model.config._attn_implementation, {}
    token = _CAPTURED.set(captured)
    try:
        model.set_attn_implementation(_CAPTURE_KERNEL)
        model(input_ids=torch.tensor([[5]]), use_cache=False)
    except Exception:  # noqa: BLE001 - a family that takes no registered kernel: its Q and K stay unchecked
        return
    finally:
        _CAPTURED.reset(token)
        model.set_attn_implementation(was)
    if id(slot) not in captured:
        return
    _, heads, kv_heads, head_dim = teacher_geometry(config)
    for name, rows, bias, states, count in (("query", weights.q, weights.q_bias, captured[id(slot)][0], heads), ("key", weights.k, weights.k_bias, captured[id(slot)][1], kv_heads)):
        theirs = states[0, :, 0] if states.dim() == 4 else None  # (batch, heads, tokens, head_dim)
        if theirs is None or tuple(theirs.shape) != (count, head_dim):
            return  # a kernel input of another layout: not interpreted
        if tuple(rows.shape[:1]) != (count * head_dim,):
            raise _Refusal(
                f"cannot convert model type {config.model_type!r}: its {name} projection is read as {tuple(rows.shape)}, where "
                f"{count} heads of {head_dim} make {count * head_dim} rows; it needs a reader for its layout in cald_scale/conversion/families.py"
            )
        ours = nn.functional.linear(x.reshape(-1, x.shape[-1])[0], rows, bias).reshape(count, head_dim)
        if (norm := norms[name]) is not None:
            try:
                ours = _through_norm(norm, ours)
            except Exception:  # noqa: BLE001 - a norm that takes other shapes: Q and K unchecked
                return
        cosine = nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=-1).min().item()
        if not cosine >= _MIN_HEAD_COSINE:
            raise _Refusal(
                f"cannot convert model type {config.model_type!r}: its attention projections are not read as its forward uses them "
                f"(on one token, a {name} head's rows read point elsewhere than the {name} its attention computes: cosine "
                f"{cosine:.3f}); it needs a reader for its layout in cald_scale/conversion/families.py"
            )


def _through_norm(norm: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """``heads`` (heads, head_dim) through a q or k norm: head by head with a weight per head
    (Cohere), over the whole projection when its weight is that wide (OLMo2), else head by head,
    laid out (batch, heads, tokens, head_dim) as the per-head norms of Persimmon, Qwen3 and
    StableLM take it."""
    count, head_dim = heads.shape
    weight = next(norm.parameters(), None)
    if weight is not None and tuple(weight.shape) == (count, head_dim):  # Cohere's use_qk_norm: a (heads, head_dim) weight over (batch, tokens, heads, head_dim)
        return norm(heads.reshape(1, 1, count, head_dim)).reshape(count, head_dim)
    if weight is not None and weight.numel() == count * head_dim:
        return norm(heads.reshape(1, 1, -1)).reshape(count, head_dim)
    return norm(heads.reshape(1, count, 1, head_dim)).reshape(count, head_dim)


def _drops_out_embeddings(model: nn.Module, adapter: FamilyAdapter, ids: torch.Tensor) -> bool:
    """Whether ``model``'s forward drops out its embeddings at the rate its blocks' owner holds
    (``owner.dropout``), by a call of its own: in training mode, from one seed, do its logits move
    when that rate goes from 0 to 0.5? (Only that rate differs: other training-time draws, OPT's
    LayerDrop, are the same in both.)"""
    owner = adapter.base(model).get_submodule(adapter.layers_attr.rpartition(".")[0])
    logits = []
    try:
        model.train()
        for rate in (0.0, 0.5):
            owner.dropout = rate
            torch.manual_seed(1)
            logits.append(model(input_ids=ids, use_cache=False).logits)
    finally:
        model.eval()
    return not torch.equal(*logits)


def _tiny_copy(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with a few small sizes (its other settings, multipliers included, kept)."""
    tiny = copy.deepcopy(config)
    layers = config.num_hidden_layers
    for name, value in _TINY.items():
        setattr(tiny, name, value)
    for name, value in _TINY_IF_SET.items():
        # NOTE: a field a family derives (Falcon's head_dim, a property without a setter) follows the sizes set here.
        attribute = getattr(type(config), name, None)
        if getattr(config, name, None) and not (isinstance(attribute, property) and attribute.fset is None):
            setattr(tiny, name, value)
    heads = config.num_attention_heads
    tiny.num_attention_heads = 4
    if kv := getattr(config, "num_key_value_heads", None):  # multi-head, multi-query and grouped stay so
        tiny.num_key_value_heads = 4 if kv == heads else 1 if kv == 1 else 2
        if getattr(config, "num_kv_heads", None) == kv:  # Falcon's own name for it, which its attention reads
            tiny.num_kv_heads = tiny.num_key_value_heads
    for name, value in vars(config).items():  # per-layer lists (layer_types, ...) cut to the copy's depth
        if isinstance(value, list) and len(value) == layers:
            setattr(tiny, name, value[:2])
    for name in _WIDTH_COPIES:  # kept equal to the width, as the family's config stores it
        if getattr(config, name, None) == config.hidden_size:
            setattr(tiny, name, tiny.hidden_size)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, name, None), int):
            setattr(tiny, name, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name])
    _shrink_rope_factors(tiny)
    return tiny


def _shrunk(config: PretrainedConfig, tiny: PretrainedConfig) -> str:
    """The fields the tiny copy changed, ``name old->new``, for a message."""
    changed = [f"{k} {v}->{getattr(tiny, k)}" for k, v in sorted(vars(config).items()) if isinstance(v, int) and getattr(tiny, k, v) != v]
    return ", ".join(changed) or "the same sizes"


def _shrink_rope_factors(tiny: PretrainedConfig) -> None:
    """Per-frequency RoPE factors (longrope's long_factor / short_factor: Phi-3-128k, Phi-3.5) cut
    to the tiny copy's rotary half-width, as its narrower heads have fewer frequencies."""
    rope = getattr(tiny, "rope_parameters", None) or getattr(tiny, "rope_scaling", None)
    if not isinstance(rope, dict):
        return
    head_dim = getattr(tiny, "head_dim", None) or tiny.hidden_size // tiny.num_attention_heads
    factor = rope.get("partial_rotary_factor", getattr(tiny, "partial_rotary_factor", None)) or 1.0
    half = int(head_dim * factor) // 2
    for name in ("long_factor", "short_factor"):
        if isinstance(rope.get(name), list) and len(rope[name]) > half:
            rope[name] = rope[name][:half]


def _refuse_unreadable_checkpoints(skeleton: nn.Module) -> None:
    """A family whose checkpoints hold tensors transformers converts at load in a way conversion
    cannot rebuild tensor by tensor (Sarvam-MoE splits a fused q/k/v by the model): refused now,
    before any weight is read. A MoE's experts, stacked and joined, are read."""
    from .weights import WeightsMismatchError, _transforms_for, refuse_unreadable_converters

    try:
        refuse_unreadable_converters(_transforms_for(skeleton)[1])
    except WeightsMismatchError as err:
        raise _Refusal(str(err)) from None


def _refuse_alibi(config: PretrainedConfig, layer: nn.Module) -> None:
    """ALiBi families (Bloom, Falcon-RW-1B and -7B: Falcon's ``alibi``) give attention a position
    bias their model's forward builds into the mask or hands each block; the layerwise view builds
    causal masks and rotary embeddings only, so their teacher blocks would run without it."""
    if getattr(config, "alibi", False) or "alibi" in inspect.signature(type(layer).forward).parameters:
        # NOTE: a ValueError, not a _Refusal: no hand-written adapter would help (the view builds the bias).
        raise ValueError(
            f"cannot convert model type {config.model_type!r}: its attention takes an ALiBi position bias, which the "
            "layerwise view distillation uses does not build (it gives blocks causal masks and rotary embeddings, or adds "
            "an absolute position table to the embeddings)"
        )


def is_encoder(config: PretrainedConfig) -> bool:
    """A bidirectional encoder family (it has a masked-LM head class; BERT also lists a causal one)."""
    return type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)


def _skeleton(config: PretrainedConfig) -> nn.Module:
    """The family's model on the meta device: its module tree, without memory or weights."""
    # NOTE: an encoder is built bare: its causal-LM class warns and is not what the encoder track converts.
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not is_encoder(config) else AutoModel
    with torch.device("meta"), no_init_weights(), _outside_zero_init():
        # NOTE: a copy (from_config may set fields on it), eager: the module tree is the same, and
        # a family without sdpa cannot be built with it.
        return auto.from_config(copy.deepcopy(config), attn_implementation="eager")


@contextlib.contextmanager
def _outside_zero_init():
    """Discovery runs inside a model's __init__ (it asks for its adapter), which may be under
    DeepSpeed's zero.Init: the skeleton must not be partitioned there (its shapes read (0,))."""
    try:
        from deepspeed.runtime.zero import partition_parameters
    except ImportError:  # no DeepSpeed, no zero.Init
        yield
        return
    context = partition_parameters.top_level_context
    active = context is not None and getattr(context, "patched", False)  # a context its owner switched off stays off
    if active:
        partition_parameters.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            partition_parameters.restore_init_context()


def _describe(module: nn.Module) -> str:
    """``a, b (b1, b2), c``: a module's children and grandchildren, for error messages."""
    parts = []
    for name, child in module.named_children():
        grand = [n for n, _ in child.named_children()]
        parts.append(f"{name} ({', '.join(grand)})" if grand else name)
    return f"[{', '.join(parts)}]"


def _find_layers(base: nn.Module, config: PretrainedConfig) -> str:
    """Path of the single outermost ``nn.ModuleList`` holding ``num_hidden_layers`` blocks."""
    num = getattr(config, "num_hidden_layers", None)
    lists = [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) and (num is None or len(m) == num)]
    # A list inside another (an MoE's experts inside a block) is not the block list.
    outer = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
    if len(outer) != 1:
        what = "no" if not outer else f"several ({', '.join(outer)})"
        raise _Refusal(f"{what} nn.ModuleList of its {num} blocks found under {type(base).__name__}; found children {_describe(base)}")
    return outer[0]


def _slots(layer: nn.Module) -> list[tuple[str, ProjectionLayout]]:
    """(path, layout) of every module in ``layer`` whose children are attention projections."""
    found = []
    for name, module in layer.named_modules():
        layout = next((lay for lay in PROJECTION_LAYOUTS if lay.matches(module)), None)
        if layout is not None and name:
            found.append((name, layout))
    return found


def _find_attention(layers: nn.ModuleList) -> tuple[str, ProjectionLayout]:
    """The one attention slot of block 0, checked to sit at the same path in every block."""
    first = _slots(layers[0])
    if not first and (later := next(((i, slots) for i, layer in enumerate(layers) if (slots := _slots(layer))), None)):
        raise _Refusal(f"layer {later[0]} has attention at [{later[1][0][0]}] but layer 0 has none (a hybrid or mixed-block family)")
    if not first:
        raise _Refusal(
            f"no attention module with q/k/v projections found in layer 0; "
            f"found children {_describe(layers[0])}; recognised layouts: {DISCOVERABLE}"
        )
    if len(first) > 1:
        raise _Refusal(f"several attention modules in layer 0 ({', '.join(name for name, _ in first)}): which one a mixer replaces is ambiguous")
    for i, layer in enumerate(layers):
        if _slots(layer) != first:
            found = ", ".join(name for name, _ in _slots(layer)) or "none"
            raise _Refusal(f"layer {i} has attention at [{found}] but layer 0 at [{first[0][0]}] (a hybrid or mixed-block family)")
    return first[0]


def _check_geometry(layout: ProjectionLayout, slot: nn.Module, config: PretrainedConfig, path: str) -> None:
    """Q/K/V/O read off the slot with the shapes the config's head geometry gives (mixer
    initialisation relies on them; a fused projection is split by them)."""
    hidden, heads, kv_heads, head_dim = teacher_geometry(config)
    from .init import attention_shape_errors

    try:
        attn = layout.read(slot, config)
    except RuntimeError as err:  # a fused projection that does not split into [q | k | v]
        raise _Refusal(f"the projections of {path} do not split by the config's heads ({heads} query, {kv_heads} kv, head_dim {head_dim}): {err}") from None
    except (AttributeError, TypeError) as err:  # a projection that is no plain linear layer (no .weight)
        raise _Refusal(f"the projections of {path} are not linear layers this conversion reads ({err})") from None
    if wrong := attention_shape_errors(attn, config):
        raise _Refusal(f"the projections of {path} do not match the config's heads ({heads} query, {kv_heads} kv, head_dim {head_dim}): {', '.join(wrong)}")


def _after_and_before(base: nn.Module, layers_attr: str) -> tuple[list[str], list[str]]:
    """Paths of the modules registered after / before the block list, on each module along its path."""
    after, before = [], []
    module, prefix = base, ""
    for part in layers_attr.split("."):
        names = [name for name, _ in module.named_children()]
        at = names.index(part)
        after += [prefix + name for name in names[at + 1 :]]
        before += [prefix + name for name in names[:at]]
        module, prefix = getattr(module, part), f"{prefix}{part}."
    return after, before


def _find_final_norm(base: nn.Module, layers_attr: str) -> str | None:
    after, before = _after_and_before(base, layers_attr)
    norms = [path for path in after if _is_norm(base.get_submodule(path))]
    if len(norms) > 1:
        raise _Refusal(f"several norms after the blocks ({', '.join(norms)}): which is the final norm is ambiguous")
    if not norms:  # OPT registers its final_layer_norm before its blocks: taken by that name only
        norms = [path for path in before if path.rpartition(".")[2].startswith("final") and _is_norm(base.get_submodule(path))]
    return norms[0] if len(norms) == 1 else None  # none: a post-LN encoder


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _find_position_embedding(base: nn.Module, layers_attr: str) -> str | None:
    """An absolute position table before the blocks: an embedding other than the input one
    (GPT-2's ``wpe``), or a module named for positions (XGLM's sinusoidal table)."""
    _, before = _after_and_before(base, layers_attr)
    tokens = base.get_input_embeddings()
    found = [
        path for path in before
        if (module := base.get_submodule(path)) is not tokens
        and (isinstance(module, nn.Embedding) or "positional" in type(module).__name__.lower())
    ]
    if len(found) > 1:
        raise _Refusal(f"several embeddings besides the input one before the blocks ({', '.join(found)}): which one gives the positions is ambiguous")
    return found[0] if found else None


def _find_embed_dropout(base: nn.Module, layers_attr: str) -> str | None:
    _, before = _after_and_before(base, layers_attr)
    dropouts = [path for path in before if isinstance(base.get_submodule(path), nn.Dropout)]
    if len(dropouts) > 1:
        raise _Refusal(f"several dropouts before the blocks ({', '.join(dropouts)}): which one applies to the embeddings is ambiguous")
    return dropouts[0] if dropouts else None
