"""Sequence classification on an encoder (BERT, RoBERTa, ...): the teacher and its converted student.

One HF model class serves both sides of the encoder track. ``CaldEncoderForSequenceClassification``
is the family's own encoder (``AutoModel``, no pooler) plus a pooled linear head. With
``config.conversion = None`` it is the teacher (its attention intact: the "Std." fine-tune
trains exactly this); with a conversion, every attention slot holds a bidirectional mixer
(Linformer or BiMamba2) and every other weight is the teacher's. Teacher and student
therefore share one state-dict layout, which is what lets conversion copy weights by key
and the layer loss pair block i with block i.

Both save and reload as plain HF folders (``from_pretrained`` after ``import cald_scale``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ..config_loader import from_dict
from .modeling import ConversionConfig, family_attention, keep_mixer_padding, mixer_padding, replace_attention
from .registry import get_adapter
from .weights import StateDictReader, StoredTensor, WeightReader

__all__ = ["CaldClassifierConfig", "CaldEncoderForSequenceClassification", "EncoderWithNewHead", "Pooling", "classifier_config", "pool"]

Pooling = Literal["mean", "cls"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: Pooling) -> torch.Tensor:
    """(b, l, d) -> (b, d): the mean over real tokens, or the first token (CLS / <s>)."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class CaldClassifierConfig(PretrainedConfig):
    """An encoder family's config, a classification head, and (for a student) its conversion."""

    model_type = "cald_classifier"

    def __init__(
        self,
        encoder_config: dict | None = None,
        pooling: Pooling = "mean",
        classifier_dropout: float | None = None,
        conversion: dict | None = None,
        teacher_name_or_path: str | None = None,
        **kwargs,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder_config = encoder_config or {}
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.conversion = conversion
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_family = self.encoder_config.get("model_type")
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "pad_token_id"):
            if key in self.encoder_config:
                kwargs.setdefault(key, self.encoder_config[key])
        super().__init__(**kwargs)

    @property
    def is_student(self) -> bool:
        """Whether attention was converted (``mixer: none``, the Std. run, leaves a teacher)."""
        return self.conversion is not None and self.conversion.get("mixer") != "none"

    @property
    def mixer(self) -> str | None:
        return self.conversion["mixer"] if self.conversion else None

    @property
    def attention_layers(self) -> list[int]:
        return list(self.conversion.get("attention_layers", [])) if self.conversion else []

    def conversion_config(self) -> ConversionConfig:
        if self.conversion is None:
            raise ValueError("this classifier is a teacher: it has no conversion")
        return from_dict(ConversionConfig, self.conversion, "conversion")

    def teacher_hf_config(self) -> PretrainedConfig:
        """The encoder family's own config (geometry, initializer_range, positions)."""
        data = dict(self.encoder_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def as_student(self, conversion: ConversionConfig, teacher_name_or_path: str | None = None) -> "CaldClassifierConfig":
        """This (teacher) config with ``conversion`` applied: the student's config."""
        from ..config_loader import to_dict

        out = copy.deepcopy(self)
        out.conversion = to_dict(conversion.resolved(self.teacher_hf_config()))
        out.teacher_name_or_path = teacher_name_or_path or self.teacher_name_or_path
        return out


def classifier_config(encoder_config: PretrainedConfig, num_labels: int, *, pooling: Pooling = "mean", label_names: list[str] | None = None) -> CaldClassifierConfig:
    """The teacher classifier's config on top of a pretrained encoder's config."""
    data = encoder_config.to_dict()
    for key in ("architectures", "id2label", "label2id", "num_labels", "problem_type"):
        data.pop(key, None)
    labels = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ValueError(f"{num_labels} labels but {len(labels)} label names")
    return CaldClassifierConfig(
        encoder_config=data,
        pooling=pooling,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


class CaldEncoderForSequenceClassification(PreTrainedModel):
    """An encoder (the family's ``AutoModel`` without pooler) + pooling + dropout + a linear head."""

    config_class = CaldClassifierConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: CaldClassifierConfig):
        super().__init__(config)
        encoder_config = config.teacher_hf_config()
        self.adapter = get_adapter(encoder_config)
        # NOTE: no pooler: a sentence-embedding checkpoint (MiniLM) has none worth keeping, and
        # pooling is this head's choice (mean or CLS).
        # NOTE: the attention kernel asked for (teacher.attn_implementation) is this config's; the
        # encoder's own config is rebuilt from a dict, which leaves it out.
        # NOTE: in the dtype asked for (from_pretrained's, or the default), not the one the encoder's
        # config records, as CaldStudentForCausalLM builds its backbone: else encoder and head differ.
        # NOTE: ELECTRA has no pooler, so no add_pooling_layer argument either.
        bare = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(MODEL_MAPPING[type(encoder_config)].__init__).parameters else {}
        config._attn_implementation = family_attention(encoder_config, config._attn_implementation)  # from_pretrained asks sdpa
        self.encoder = AutoModel.from_config(
            encoder_config, attn_implementation=config._attn_implementation, dtype=torch.get_default_dtype(), **bare,
        )
        dropout = config.classifier_dropout if config.classifier_dropout is not None else getattr(encoder_config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self._mixers = replace_attention(self.encoder, self.adapter, config.conversion_config(), encoder_config) if config.is_student else []
        self._tied_weights_keys = self._shared_parameter_names() or None
        self.post_init()

    def _shared_parameter_names(self) -> dict[str, str]:
        """{later name: first name} of each parameter held under several names (a Linformer's
        length projection shared by all layers): HF then saves it once and re-ties it on load."""
        first: dict[int, str] = {}
        tied = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                tied[name] = first[id(param)]
            else:
                first[id(param)] = name
        return tied

    # The same accessors the causal student has (conversion, streaming, export go through them).
    @property
    def backbone(self) -> nn.Module:
        """The module whose state-dict keys equal the teacher's: the whole classifier."""
        return self

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, **kwargs) -> None:
        # As the causal student's: a recompute sees the padding mask its forward saw.
        super()._set_gradient_checkpointing(enable, keep_mixer_padding(gradient_checkpointing_func), **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def mixers(self) -> list[nn.Module]:
        return list(self._mixers)

    def mixer_parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for mixer in self._mixers:
            for p in mixer.parameters():
                if id(p) not in seen:  # a Linformer projection shared by all layers counts once
                    seen.add(id(p))
                    out.append(p)
        return out

    def _init_weights(self, module: nn.Module) -> None:
        if any(module is m for m in self._mixers) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        if module is self.classifier:
            std = getattr(self.config.teacher_hf_config(), "initializer_range", 0.02)
            module.weight.data.normal_(0.0, std)
            module.bias.data.zero_()
            return
        self.encoder._init_weights(module)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        if self.config.is_student and attention_mask is not None:
            kwargs["mixer_padding_mask"] = attention_mask
        # NOTE: the encoder always returns its output object; a caller's return_dict=False is
        # honoured here, as HF's *ForSequenceClassification do (a tuple, the loss first if any).
        return_dict = kwargs.pop("return_dict", None)
        with mixer_padding(kwargs.get("mixer_padding_mask")):
            out = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=output_hidden_states,
                return_dict=True,
                **kwargs,
            )
        logits = self.classifier(self.dropout(pool(out.last_hidden_state, attention_mask, self.config.pooling)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return output.to_tuple() if return_dict is False else output


def encoder_keys(keys: list[str], encoder_config: PretrainedConfig) -> dict[str, str]:
    """A pretrained encoder checkpoint's own tensors, by their name in the bare model: a bare
    ``BertModel`` folder as it is; a task model's (``BertForMaskedLM``, ``RobertaForMaskedLM``,
    ``BertForPreTraining``: most hub checkpoints) under its base-model prefix (``bert.``,
    ``roberta.``), its task head (``cls.``, ``lm_head.``) left out. The pooler and the
    position-id buffers are left out too (this head pools for itself)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    prefix = MODEL_MAPPING[type(encoder_config)].base_model_prefix + "."
    prefixed = any(k.startswith(prefix) for k in keys)
    out = {}
    for key in keys:
        if prefixed and not key.startswith(prefix):
            continue  # the task model's head
        bare = key.removeprefix(prefix) if prefixed else key
        if not bare.startswith("pooler.") and not bare.endswith("position_ids"):
            out[bare] = key
    return out


class EncoderWithNewHead:
    """A pretrained encoder's checkpoint (``encoder_keys``: a bare ``BertModel``-style folder or a
    task model's) read as a teacher classifier's: its keys moved under ``encoder.``, and a new
    head drawn from its own seeded stream (normal, the family's ``initializer_range``; zero
    bias), so every rank and every run draws the same head."""

    def __init__(self, encoder: WeightReader, config: CaldClassifierConfig, seed: int):
        self._encoder = encoder
        self._keys = {f"encoder.{bare}": key for bare, key in encoder_keys(encoder.keys(), config.teacher_hf_config()).items()}
        hidden, std = config.hidden_size, getattr(config.teacher_hf_config(), "initializer_range", 0.02)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
        self._head = StateDictReader(
            {
                "classifier.weight": torch.randn(config.num_labels, hidden, generator=generator) * std,
                "classifier.bias": torch.zeros(config.num_labels),
            }
        )

    def keys(self) -> list[str]:
        return [*self._keys, *self._head.keys()]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._encoder.shape(self._keys[key]) if key in self._keys else self._head.shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self._encoder.get(self._keys[key]) if key in self._keys else self._head.get(key)

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """A range of the flattened tensor (a ZeRO-3 rank's partition): the encoder's, read alone."""
        if key in self._keys:
            return StoredTensor(self._encoder, self._keys[key]).read_flat(start, stop)
        return self._head.get_flat(key, start, stop)


AutoConfig.register(CaldClassifierConfig.model_type, CaldClassifierConfig)
AutoModelForSequenceClassification.register(CaldClassifierConfig, CaldEncoderForSequenceClassification)
