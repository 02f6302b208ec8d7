"""The converted student as a real HF model: any supported teacher family, attention -> mixer.

``CaldStudentForCausalLM`` holds the teacher family's own causal-LM class (``backbone``)
with every attention module replaced by a linear-time mixer. Its config records the
teacher's config, the family and the mixer, so ``save_pretrained``/``from_pretrained``
rebuild the same architecture from the folder alone (after ``import cald_scale``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import gc
import logging
import weakref
from typing import Any, Callable, Container, Iterator, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
from transformers.generation import GenerationMixin

from ..config_loader import from_dict, to_dict
from ..generation.cache import StudentCache
from ..mixers import MIXER_KINDS, LengthProjection, build_mixer
from ..mixers.config import BiMamba2Config, LinformerConfig, Mamba2Config, MambaConfig
from .registry import get_adapter

logger = logging.getLogger("cald_scale.conversion")

__all__ = ["ConversionConfig", "CaldStudentConfig", "CaldStudentForCausalLM", "MixerAsAttention", "replace_attention", "teacher_geometry"]


@dataclasses.dataclass(kw_only=True)
class ConversionConfig:
    """How a teacher becomes a student."""

    mixer: Literal["mamba2", "mamba", "linformer", "bimamba2", "none"] = "mamba2"
    """Which linear-time mixer replaces self-attention. Causal LMs take mamba2 or mamba;
    encoders take the bidirectional linformer or bimamba2. ``none`` converts nothing: the
    "student" is the teacher itself, fine-tuned by the same trainer (the encoder track's
    "Std." run, which makes the target teacher and the waypoints)."""
    mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    """Mamba2 settings (geometry fields are overwritten when ``match_teacher_geometry``)."""
    mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    """Mamba (selective SSM) settings."""
    linformer: LinformerConfig = dataclasses.field(default_factory=LinformerConfig)
    """Linformer settings (heads, head_dim and max_positions follow the teacher when
    ``match_teacher_geometry``; k and the sharing mode are the user's)."""
    bimamba2: BiMamba2Config = dataclasses.field(default_factory=BiMamba2Config)
    """Bidirectional Mamba2 settings (each direction's geometry as for mamba2)."""
    match_teacher_geometry: bool = True
    """Mamba2 and BiMamba2: heads, head_dim, d_state = head_dim and one group per head taken
    from the teacher attention, so Q/K/V/O map one-to-one onto C/B/x/out_proj; the gated
    norm's epsilon is the teacher's rms_norm_eps. Linformer: the teacher's heads, head_dim
    and position table length."""
    attention_layers: list[int] = dataclasses.field(default_factory=list)
    """Layers that keep the teacher's attention (a hybrid; the rest get mixers), e.g. every
    other layer for MambaInLlama's 50% hybrid. Empty: every layer is converted."""
    attention_every: int | None = None
    """A hybrid spread over the depth, for any teacher: layers 1, 1 + k, 1 + 2k, ... keep their
    attention (k=2: MambaInLlama's 50% hybrid, odd layers; k=4: its 25%, 8 of SmolLM2's 30).
    0: none. null: the task's default (``RunConfig``: 4 for a causal LM, 0 for classification
    or when ``attention_layers`` lists the layers). Exclusive with ``attention_layers``."""
    attention_init: bool = True
    """Initialise mixer projections from the teacher's Q/K/V/O ("Mamba in the Llama"); false:
    fresh mixers as in the paper. On the all-Mamba2 Shakespeare recipe it took held-out perplexity
    from 120.8 to 74.2 (benchmarks/results/recovery.md)."""

    def __post_init__(self):
        every = self.attention_every or 0
        if every < 0:
            raise ValueError(f"student.conversion.attention_every must be >= 0 (0: no attention kept), got {every}")
        if every and self.attention_layers:
            raise ValueError(
                f"student.conversion.attention_every={every} and attention_layers={self.attention_layers}: only one of the two may "
                "choose the kept attention layers; set one (attention_every=0 to list them)"
            )
        if every and not self.converts:
            raise ValueError("student.conversion.mixer=none converts no layer: student.conversion.attention_every must be 0")

    @property
    def converts(self) -> bool:
        """False for ``mixer: none`` (the teacher trained as it is)."""
        return self.mixer != "none"

    @property
    def causal(self) -> bool:
        """Whether the mixer sees only the past (decoders can use only such mixers)."""
        return not self.converts or MIXER_KINDS[self.mixer][1].causal

    def resolved(self, teacher_config: PretrainedConfig) -> "ConversionConfig":
        """A copy with every geometry field made concrete for this teacher."""
        out = copy.deepcopy(self)
        layers = teacher_config.num_hidden_layers
        bad = [i for i in self.attention_layers if not isinstance(i, int) or not 0 <= i < layers]
        if bad or len(set(self.attention_layers)) != len(self.attention_layers):
            raise ValueError(
                f"student.conversion.attention_layers must be distinct layer indices in [0, {layers}), "
                f"got {self.attention_layers}"
            )
        every = self.attention_every or 0  # checked when built (__post_init__)
        kept = list(range(1, layers, every)) if every else sorted(self.attention_layers)
        out.attention_layers, out.attention_every = kept, 0  # resolved: the layers, listed
        if not self.converts:
            if kept:
                raise ValueError("student.conversion.mixer=none converts no layer: student.conversion.attention_layers must be empty")
            return out
        if len(kept) == layers:
            raise ValueError("student.conversion keeps every layer's attention (attention_layers / attention_every): nothing to convert")
        if not self.match_teacher_geometry:
            if self.attention_init and self.mixer in ("mamba2", "bimamba2"):
                _check_init_geometry(self.mamba2 if self.mixer == "mamba2" else self.bimamba2.mamba2, teacher_config)
            return out
        if self.mixer == "mamba2":
            out.mamba2 = _matched_mamba2(self.mamba2, teacher_config, "student.conversion.mamba2")
        elif self.mixer == "bimamba2":
            matched = _matched_mamba2(self.bimamba2.mamba2, teacher_config, "student.conversion.bimamba2.mamba2")
            out.bimamba2 = dataclasses.replace(self.bimamba2, mamba2=matched)
        elif self.mixer == "linformer":
            _, heads, _, head_dim = teacher_geometry(teacher_config)
            positions = getattr(teacher_config, "max_position_embeddings", None) or self.linformer.max_positions
            matched = {"num_heads": heads, "head_dim": head_dim, "max_positions": positions}
            _warn_replaced(self.linformer, LinformerConfig(), matched, "student.conversion.linformer")
            out.linformer = dataclasses.replace(self.linformer, **matched)
        return out

    def mixer_config(self) -> Mamba2Config | MambaConfig | LinformerConfig | BiMamba2Config:
        if not self.converts:
            raise ValueError("student.conversion.mixer=none has no mixer")
        return getattr(self, self.mixer)


def _matched_mamba2(cfg: Mamba2Config, teacher_config: PretrainedConfig, where: str) -> Mamba2Config:
    """``cfg`` with the teacher attention's geometry (heads, head_dim, d_state = head_dim, a group
    per head). A geometry field set to something else is named in a warning, not replaced unsaid."""
    hidden, heads, _, head_dim = teacher_geometry(teacher_config)
    width = heads * head_dim
    # The attention's width is the mixer's inner width: a multiple of hidden_size as an expand
    # factor (as Bamba's config has it), any other (Gemma-2/3, Qwen3-4B) as intermediate_size.
    inner = {"expand": width // hidden, "intermediate_size": None} if width % hidden == 0 else {"expand": 1, "intermediate_size": width}
    matched = {
        "num_heads": heads, "head_dim": head_dim, **inner, "d_state": head_dim, "n_groups": heads,
        # Bamba's convention (native export): the gated norm uses the teacher's epsilon.
        "norm_eps": getattr(teacher_config, "rms_norm_eps", cfg.norm_eps),
    }
    _warn_replaced(cfg, Mamba2Config(), matched, where)
    return dataclasses.replace(cfg, **matched)


def _warn_replaced(cfg, default, matched: dict, where: str) -> None:
    """Name the fields of ``cfg`` set to something other than their default that teacher
    matching replaces with ``matched``.

    NOTE: said, not refused: a run saved with such a setting must still resume (its student is
    the matched one), and a value equal to the default cannot be told from no setting at all.
    """
    given = {k: getattr(cfg, k) for k, v in matched.items() if getattr(cfg, k) not in (v, getattr(default, k))}
    if given:
        logger.warning(
            "%s sets %s, which student.conversion.match_teacher_geometry (on) replaces with the teacher's (%s): set "
            "match_teacher_geometry=false to use them (and attention_init=false unless they are the teacher's heads)",
            where, given, {k: matched[k] for k in given},
        )


def _check_init_geometry(cfg: Mamba2Config, teacher_config: PretrainedConfig) -> None:
    """The init from the teacher's Q/K/V (``attention_init``) fills a Mamba2 whose heads, groups
    and state are the teacher's: say so before any weight is read, not after."""
    hidden, heads, _, head_dim = teacher_geometry(teacher_config)
    num_heads = cfg.resolved_num_heads(hidden)
    if not (num_heads == cfg.n_groups == heads and cfg.head_dim == cfg.d_state == head_dim):
        raise ValueError(
            f"student.conversion.attention_init fills the mixer from the teacher's Q/K/V, which needs {heads} heads and groups "
            f"of head_dim = d_state = {head_dim}; the mamba2 geometry given has {num_heads} heads, {cfg.n_groups} groups, head_dim "
            f"{cfg.head_dim}, d_state {cfg.d_state}: set student.conversion.match_teacher_geometry=true, or attention_init=false"
        )


ATTENTION_TYPES = ("full_attention", "sliding_attention")
"""The attention types (transformers' ``config.layer_types`` names) a model is run with block by block."""


def attention_types(config: PretrainedConfig, num_layers: int) -> list[str]:
    """Per layer, its attention type, as the family's own forward picks its mask.

    Families that mix types list them in ``config.layer_types`` (Gemma2, Qwen2 with
    ``use_sliding_window``); the others give every layer one mask: sliding-window when
    ``config.sliding_window`` is set (Mistral, Phi-3), else full causal.
    """
    types = getattr(config, "layer_types", None)
    if types is None:
        single = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [single] * num_layers
    unknown = sorted(set(types) - set(ATTENTION_TYPES))
    if unknown:
        raise ValueError(f"{config.model_type} layers of type {unknown} cannot be run block by block (known types: {sorted(ATTENTION_TYPES)})")
    return list(types[:num_layers])


def window_reachable(config: PretrainedConfig) -> bool:
    """Whether a sliding window is shorter than the positions the model takes (Phi-3-128k sets a
    window of 262144 over 131072 positions: never reached)."""
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    return window is not None and (positions is None or window < positions)


def family_attention(config: PretrainedConfig, asked: str | None) -> str | None:
    """The attention kernel ``config``'s family runs when ``asked`` for one: sdpa falls back to
    eager for a family whose modeling code has no sdpa path (Gemma2, GPT-Neo, XGLM), as
    transformers refuses to build it otherwise."""
    if asked != "sdpa":
        return asked
    # The classes built from it: the bare model (an encoder's) and the causal LM (a decoder's).
    built = [mapping.get(type(config), None) for mapping in (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING)]
    return "eager" if any(cls is not None and not cls._supports_sdpa for cls in built) else asked


def teacher_geometry(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """(hidden, num_heads, num_kv_heads, head_dim) of a teacher config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads, kv_heads, head_dim


_PADDING_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("cald_mixer_padding_mask", default=None)


@contextlib.contextmanager
def mixer_padding(mask: torch.Tensor | None) -> Iterator[None]:
    """The (batch, new tokens) padding mask for the mixers of a model's forward called inside.

    It also goes to the decoder layers as the keyword ``mixer_padding_mask``, which most
    families hand on to their attention; some do not (StableLM, Nemotron call their attention
    with named arguments only), and their mixers read it from here instead. (HF gradient
    checkpointing recomputes outside this context: ``keep_mixer_padding`` carries it there.)
    """
    token = _PADDING_MASK.set(mask)
    try:
        yield
    finally:
        _PADDING_MASK.reset(token)


def keep_mixer_padding(checkpoint_fn: Callable) -> Callable:
    """``checkpoint_fn`` (a gradient-checkpointing function: ``fn(function, *args)``) whose
    recompute in backward runs under the padding mask its forward saw (see ``mixer_padding``):
    HF gradient checkpointing recomputes a layer outside the model's forward."""

    def checkpointed(function, *args, **kwargs):
        mask = _PADDING_MASK.get()

        def under_the_same_mask(*a, **k):
            with mixer_padding(mask):
                return function(*a, **k)

        return checkpoint_fn(under_the_same_mask, *args, **kwargs)

    return checkpointed


class MixerAsAttention(nn.Module):
    """Sits where the teacher's attention sat: same call, returns ``(output, None)``.

    Without a cache it mixes the whole sequence. With a ``StudentCache`` the first call
    (the prompt) runs ``prefill`` and stores the layer's conv and SSM state; later calls
    run one ``step`` per token from that state, so a new token costs the same at any
    context length.
    """

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    # What the decoder hands an attention module that a mixer does not need: the causal
    # mask (mixers are causal by construction; padding comes as ``mixer_padding_mask``) and
    # positions (mixers have none). Anything else is refused rather than silently dropped.
    _UNNEEDED = frozenset({"attention_mask", "position_ids", "position_embeddings", "use_cache", "cache_position", "output_hidden_states"})

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        layer_past: Cache | None = None,
        mixer_padding_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        unexpected = sorted(k for k, v in kwargs.items() if k not in self._UNNEEDED and v is not None and v is not False)
        if unexpected:
            raise TypeError(
                f"a mixer layer cannot honour {unexpected} (e.g. packed-sequence boundaries or attention "
                "weights): it has no attention to apply them to"
            )
        cache = cache if cache is not None else layer_past  # gpt_neox calls the cache ``layer_past``
        if mixer_padding_mask is None:  # a family whose layer drops keyword arguments (see mixer_padding)
            mixer_padding_mask = _PADDING_MASK.get()
        if cache is None:
            return self.mixer(hidden_states, mixer_padding_mask), None
        idx = self.mixer.layer_idx
        if not cache.has_previous_state(idx):
            out, state = self.mixer.prefill(hidden_states, mixer_padding_mask)
            cache.update_conv_state(state.conv_state, idx)
            cache.update_recurrent_state(state.ssm_state, idx)
            return out, None
        # Continuing from the cache's state: one step per token (a chunk after the prompt is
        # rare), each updating the cache's own tensors in place. NOTE: copying the state in and
        # out through the cache's update methods cost a decode step at batch 8 about a tenth.
        state = self.mixer.state_class(cache.get_conv_state(idx), cache.get_recurrent_state(idx))
        # A pad (left padding longer than the prompt's first chunk, or a prompt fed a token at a
        # time) is masked in the step as prefill masks it: a few products, no state copy, so a
        # decode step (its mask all ones) pays nothing for it.
        outs = []
        for t in range(hidden_states.shape[1]):
            keep = None if mixer_padding_mask is None else mixer_padding_mask[:, t]
            out_t, state = self.mixer.step(hidden_states[:, t : t + 1], state, inplace=True, keep=keep)
            outs.append(out_t)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out, None


def replace_attention(model: nn.Module, adapter, conversion: "ConversionConfig", teacher_config: PretrainedConfig) -> list[nn.Module]:
    """Put a mixer (wrapped in ``MixerAsAttention``) into every attention slot of ``model``
    except a hybrid's kept layers; returns the mixers in layer order."""
    if not conversion.converts:
        return []
    kept = set(conversion.attention_layers)
    mixer_config = conversion.mixer_config()
    # A Linformer with sharing "layer": one length projection, the same module in every layer.
    shared = LengthProjection.for_config(mixer_config) if conversion.mixer == "linformer" and mixer_config.sharing == "layer" else None
    mixers = []
    for idx, layer in enumerate(adapter.layers(model)):
        if idx in kept:
            continue  # a hybrid keeps the teacher's attention here
        replaced = weakref.ref(adapter.attention(layer))
        adapter.set_attention(layer, None)
        # NOTE: a replaced attention may sit in a reference cycle (hooks that capture its
        # parameters do that); collect it now, so at most one is alive while mixers are built.
        # A full collection costs up to ~0.7 s per layer: only when refcounting left it alive.
        if replaced() is not None:
            gc.collect()
        extra = {"shared_projection": shared} if shared is not None else {}
        mixer = build_mixer(conversion.mixer, mixer_config, teacher_config.hidden_size, idx, **extra)
        adapter.set_attention(layer, MixerAsAttention(mixer))
        mixers.append(mixer)
    return mixers


class CaldStudentConfig(PretrainedConfig):
    model_type = "cald_student"

    def __init__(
        self,
        teacher_config: dict | None = None,
        conversion: dict | None = None,
        teacher_name_or_path: str | None = None,
        **kwargs,
    ):
        self.teacher_config = teacher_config or {}
        self.conversion = conversion or to_dict(ConversionConfig())
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_family = self.teacher_config.get("model_type")
        # Mirror the fields that tools (generation, DeepSpeed auto-config) read from a config,
        # under the names the teacher's family stores them (GPT-J's hidden_size is n_embd).
        aliases = getattr(CONFIG_MAPPING[self.teacher_family], "attribute_map", {}) if self.teacher_family in CONFIG_MAPPING else {}
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            stored = key if key in self.teacher_config else aliases.get(key)
            if stored in self.teacher_config:
                kwargs.setdefault(key, self.teacher_config[stored])
        kwargs.setdefault("tie_word_embeddings", self.teacher_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def mixer(self) -> str:
        return self.conversion["mixer"]

    @property
    def attention_layers(self) -> list[int]:
        """Layers that kept the teacher's attention (empty unless a hybrid)."""
        return list(self.conversion.get("attention_layers", []))

    @property
    def layer_types(self) -> list[str]:
        """Per layer: ``linear_attention`` (a mixer), or a kept attention's type in the teacher
        (``full_attention``, ``sliding_attention``: its cache then keeps only the window)."""
        kept = set(self.attention_layers)
        if not kept:
            return ["linear_attention"] * self.num_hidden_layers
        teacher = self.teacher_hf_config()
        types = attention_types(teacher, self.num_hidden_layers)
        if not window_reachable(teacher):  # within the positions allowed its mask is the full one (Phi-3-128k)
            types = ["full_attention"] * len(types)
        return [types[i] if i in kept else "linear_attention" for i in range(self.num_hidden_layers)]

    @property
    def kept_attention(self) -> bool:
        """Whether some layer kept the teacher's attention (a hybrid)."""
        return bool(self.attention_layers)

    def conversion_config(self) -> ConversionConfig:
        return from_dict(ConversionConfig, self.conversion, "conversion")

    def teacher_hf_config(self) -> PretrainedConfig:
        data = dict(self.teacher_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)


class CaldStudentForCausalLM(PreTrainedModel, GenerationMixin):
    """A teacher family's causal LM whose attention blocks are linear-time mixers."""

    config_class = CaldStudentConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: CaldStudentConfig):
        super().__init__(config)
        teacher_config = config.teacher_hf_config()
        self.adapter = get_adapter(teacher_config)
        # NOTE: from_config would build the backbone in the dtype the teacher's config names, not
        # the one this model is being built in (from_pretrained(dtype=...) sets the default); and
        # with the attention kernel asked of this model (the teacher's, or from_pretrained's
        # attn_implementation), which the teacher's config, rebuilt from a dict, leaves out.
        # NOTE: from_pretrained asks this class for sdpa (a hybrid's kept attention); a family
        # without it keeps the eager attention its teacher ran.
        config._attn_implementation = family_attention(teacher_config, config._attn_implementation)
        self.backbone = AutoModelForCausalLM.from_config(
            teacher_config, dtype=torch.get_default_dtype(), attn_implementation=config._attn_implementation
        )
        replace_attention(self.backbone, self.adapter, config.conversion_config(), teacher_config)
        self.post_init()

    # The HF API everything else (streaming, generation, resizing) goes through.
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """Resized by the backbone (its tied head with it); the vocabulary it ends with is written
        into this config and the teacher config it keeps, so the saved student reloads."""
        embeddings = self.backbone.resize_token_embeddings(*args, **kwargs)
        vocab = self.backbone.config.vocab_size
        self.config.vocab_size = vocab
        self.config.teacher_config = {**self.config.teacher_config, "vocab_size": vocab}
        return embeddings

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, **kwargs) -> None:
        super()._set_gradient_checkpointing(enable, keep_mixer_padding(gradient_checkpointing_func), **kwargs)

    def mixers(self, layers: Container[int] | None = None) -> list[nn.Module]:
        """The mixers, in layer order (a hybrid's attention layers have none); with ``layers``,
        those of these layer indices only (a pipeline stage's)."""
        slots = (self.adapter.attention(layer) for layer in self.adapter.layers(self.backbone))
        mixers = [slot.mixer for slot in slots if isinstance(slot, MixerAsAttention)]
        return mixers if layers is None else [m for m in mixers if m.layer_idx in layers]

    def mixer_parameters(self) -> list[nn.Parameter]:
        """The parameters of the new mixers (everything else is copied from the teacher)."""
        return [p for m in self.mixers() for p in m.parameters()]

    def _init_weights(self, module: nn.Module) -> None:
        if hasattr(module, "reset_parameters") and any(module is m for m in self.mixers()):
            module.reset_parameters()
            return
        self.backbone._init_weights(module)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, cache=None, use_cache=None, **kwargs):
        # NOTE: position_ids in the signature: generate() then numbers a left-padded row's tokens
        # from its first real one, which an absolute position table (GPT-2) needs.
        legacy = kwargs.pop("past_key_values", None)  # the pre-5.x name of ``cache``
        cache = cache if cache is not None else legacy
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, StudentCache):
            raise TypeError(f"the student generates with a StudentCache (model.new_cache()), got {type(cache).__name__}")
        batch_size, new_tokens = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[:2]
        if cache is not None:
            cache.check_usable()
            cache.check_room(new_tokens)
            cache.check_batch(batch_size)
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["mixer_padding_mask"] = attention_mask[:, -new_tokens:]
        with mixer_padding(kwargs.get("mixer_padding_mask")):
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, cache=cache,
                use_cache=bool(cache), **kwargs,
            )
        if cache is not None:
            cache.advance(new_tokens)
        return out

    # --- generation ----------------------------------------------------------------------
    def new_cache(self, max_cache_len: int | None = None) -> StudentCache:
        """An empty cache for this layout: conv + SSM state per mixer, KV per kept attention
        (preallocated for ``max_cache_len`` positions and written in place when given)."""
        layer_types = self.config.layer_types
        window = getattr(self.backbone.config, "sliding_window", None) if "sliding_attention" in layer_types else None  # the teacher's
        return StudentCache(layer_types, max_cache_len, sliding_window=window)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        # NOTE: generate() would build a DynamicCache from the config; the student's layout is
        # mixers (and maybe kept attention), so it gets its own cache.
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            implementation = generation_config.cache_implementation
            if implementation not in (None, "dynamic", "static"):
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported by the student: its mixers keep a "
                    "constant-size recurrent state; a hybrid's kept attention takes 'dynamic' (the default) or 'static'"
                )
            # "static": a hybrid's kept attention preallocates its KV for the whole generation and
            # writes it in place (the default concatenates: a copy of the layer's cache per token).
            # NOTE: generate's max_cache_length counts the prompt also when it comes as inputs_embeds
            # (max_length then does not); a max_cache_len the caller gave wins if longer. A student
            # of mixers alone has no KV to preallocate (its StudentCache ignores the length).
            static = implementation == "static"
            length = max(max_cache_length, generation_config.max_cache_len or 0) if static else None
            model_kwargs["cache"] = self.new_cache(length)
            return
        given = model_kwargs.get("cache")
        if isinstance(given, StudentCache) and given.max_cache_len is not None and max_cache_length > given.max_cache_len:
            # Refused now rather than when it fills up, tokens into the generation.
            raise ValueError(
                f"the cache given preallocates {given.max_cache_len} positions for its attention layers; this generation "
                f"needs {max_cache_length}: make it longer (model.new_cache(max_cache_len=...)) or pass none"
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        # NOTE: generate() turns the 2-D padding mask into per-layer 4-D masks ahead of time when
        # the cache is preallocated (a hybrid's static KV); the mixers read padding from the 2-D
        # mask, so it is kept, and the backbone builds its attention mask from it each forward.
        return attention_mask

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        # NOTE: generate() on a GPU compiles the forward of any model whose cache is compileable,
        # which a StudentCache of mixers alone is; that path (torch.compile over mamba_ssm's
        # Triton kernels) has not run here, and the tested fast decode is GraphedDecode. So
        # compilation is on request only: generate(..., compile_config=CompileConfig()).
        if generation_config.compile_config is None:
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)


AutoConfig.register(CaldStudentConfig.model_type, CaldStudentConfig)
AutoModelForCausalLM.register(CaldStudentConfig, CaldStudentForCausalLM)
