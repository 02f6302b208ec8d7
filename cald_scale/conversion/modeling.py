"""The converted student as a real HF model: any supported teacher family, attention -> mixer.

``CaldStudentForCausalLM`` holds the teacher family's own causal-LM class (``backbone``)
with every attention module replaced by a linear-time mixer. Its config records the
teacher's config, the family and the mixer, so ``save_pretrained``/``from_pretrained``
rebuild the same architecture from the folder alone (after ``import cald_scale``).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.generation import GenerationMixin

from ..configuration import from_dict, to_dict
from ..mixers import build_mixer
from ..mixers.config import Mamba2Config, MambaConfig
from .registry import get_adapter

__all__ = ["ConversionConfig", "CaldStudentConfig", "CaldStudentForCausalLM", "MixerAsAttention", "teacher_geometry"]


@dataclasses.dataclass(kw_only=True)
class ConversionConfig:
    """How a teacher becomes a student."""

    mixer: Literal["mamba2", "mamba"] = "mamba2"
    """Which linear-time mixer replaces self-attention."""
    mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    """Mamba2 settings (geometry fields are overwritten when ``match_teacher_geometry``)."""
    mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    """Mamba (selective SSM) settings."""
    match_teacher_geometry: bool = True
    """Mamba2: heads, head_dim, d_state = head_dim and one group per head taken from the
    teacher attention, so Q/K/V/O map one-to-one onto C/B/x/out_proj."""
    attention_init: bool = True
    """Initialise mixer projections from the teacher's Q/K/V/O ("Mamba in the Llama"); false:
    fresh mixers as in the paper. On the default job it halved held-out perplexity at every
    point of the run (benchmarks/results/recovery.md)."""

    def resolved(self, teacher_config: PretrainedConfig) -> "ConversionConfig":
        """A copy with every geometry field made concrete for this teacher."""
        out = copy.deepcopy(self)
        if self.mixer == "mamba2" and self.match_teacher_geometry:
            hidden, heads, _, head_dim = teacher_geometry(teacher_config)
            if (heads * head_dim) % hidden != 0:
                raise ValueError(
                    f"teacher attention width {heads}x{head_dim} is not a multiple of hidden size {hidden}; "
                    "set student.conversion.match_teacher_geometry=false and give mamba2 geometry explicitly"
                )
            out.mamba2 = dataclasses.replace(
                self.mamba2,
                num_heads=heads,
                head_dim=head_dim,
                expand=heads * head_dim // hidden,
                d_state=head_dim,
                n_groups=heads,
            )
        return out

    def mixer_config(self) -> Mamba2Config | MambaConfig:
        return self.mamba2 if self.mixer == "mamba2" else self.mamba


def teacher_geometry(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """(hidden, num_heads, num_kv_heads, head_dim) of a teacher config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads, kv_heads, head_dim


class MixerAsAttention(nn.Module):
    """Sits where the teacher's attention sat: same call, returns ``(output, None)``."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        # NOTE: the decoder passes its 4D causal mask; mixers are causal by construction and
        # packed LM batches carry no padding, so the mask is not needed here.
        return self.mixer(hidden_states), None


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
        # Mirror the fields that tools (generation, DeepSpeed auto-config) read from a config.
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.teacher_config:
                kwargs.setdefault(key, self.teacher_config[key])
        kwargs.setdefault("tie_word_embeddings", self.teacher_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def mixer(self) -> str:
        return self.conversion["mixer"]

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
        self.adapter = get_adapter(teacher_config.model_type)
        self.backbone = AutoModelForCausalLM.from_config(teacher_config)
        conversion = config.conversion_config()
        for idx, layer in enumerate(self.adapter.layers(self.backbone)):
            self.adapter.set_attention(layer, None)
            # NOTE: a replaced attention may sit in a reference cycle (hooks that capture its
            # parameters do that); collect it now, so at most one is alive while mixers are built.
            gc.collect()
            mixer = build_mixer(conversion.mixer, conversion.mixer_config(), teacher_config.hidden_size, idx)
            self.adapter.set_attention(layer, MixerAsAttention(mixer))
        self.post_init()

    # The HF API everything else (streaming, generation, resizing) goes through.
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def mixers(self) -> list[nn.Module]:
        return [self.adapter.attention(layer).mixer for layer in self.adapter.layers(self.backbone)]

    def mixer_parameters(self) -> list[nn.Parameter]:
        """The parameters of the new mixers (everything else is copied from the teacher)."""
        return [p for m in self.mixers() for p in m.parameters()]

    def _init_weights(self, module: nn.Module) -> None:
        if hasattr(module, "reset_parameters") and any(module is m for m in self.mixers()):
            module.reset_parameters()
            return
        self.backbone._init_weights(module)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        kwargs.setdefault("use_cache", False)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


AutoConfig.register(CaldStudentConfig.model_type, CaldStudentConfig)
AutoModelForCausalLM.register(CaldStudentConfig, CaldStudentForCausalLM)
