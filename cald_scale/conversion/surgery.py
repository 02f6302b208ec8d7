"""Teacher -> student surgery: one generic mechanism for every registered family.

The student is built from the teacher's own config with attention replaced by mixers,
then filled tensor by tensor: every non-attention tensor (embeddings, MLPs, norms, head)
is read from the teacher's weights and copied exactly, and each mixer is initialised on
its own (seeded by run seed and layer index, optionally from that layer's Q/K/V/O). The
copy is checked: the only keys allowed to differ are the attention's (gone) and the
mixers' (new). Everything goes through a ``Placement``, so the same code builds a plain
student or a ZeRO-3 partitioned one layer by layer, and both get identical weights.
"""

from __future__ import annotations

from typing import Iterator

import gc
import logging

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ..config_loader import to_dict
from ..mixers import build_mixer
from ..mixers.mamba import TimeStepProjection
from .attention_rows import read_attention_rows
from .init import check_attention_weights, init_mixer_from_attention
from .classifier import CaldClassifierConfig, CaldEncoderForSequenceClassification
from .modeling import CaldStudentConfig, CaldStudentForCausalLM, ConversionConfig
from .placement import PLAIN, Placement, rotary_in_float32
from .registry import FamilyAdapter, get_adapter
from .weights import (
    RenamedReader,
    StateDictReader,
    WeightReader,
    WeightsMismatchError,
    load_weights,
)

__all__ = ["build_student", "convert_teacher", "share_copied_weights", "student_config", "attention_prefixes", "fresh_mixer", "initial_mixers"]

logger = logging.getLogger("cald_scale.conversion")


def student_config(teacher_config: PretrainedConfig, conversion: ConversionConfig, teacher_name_or_path: str | None = None) -> CaldStudentConfig | CaldClassifierConfig:
    """The student's HF config: the teacher's config, the family and the resolved mixer geometry.

    A causal LM teacher gives a ``CaldStudentConfig``; an encoder classifier teacher (its own
    class, ``conversion=None``) gives the same classifier config with the conversion set.
    """
    if isinstance(teacher_config, CaldClassifierConfig):
        get_adapter(teacher_config.teacher_hf_config())  # fails before any weight is read
        if conversion.converts and conversion.causal:
            raise ValueError(
                f"student.conversion.mixer={conversion.mixer!r} is causal: it cannot replace an encoder's attention, "
                "which sees both directions (use bimamba2 or linformer)"
            )
        return teacher_config.as_student(conversion, teacher_name_or_path)
    # An unconvertible family fails here, before any weight is read; a discovered adapter is
    # cached now, so its meta-device skeleton is never built under a partitioned construct().
    get_adapter(teacher_config)
    if not conversion.converts:
        raise ValueError("student.conversion.mixer=none (the teacher fine-tuned as it is) is the classification task's Std. run; a causal LM converts with mamba2 or mamba")
    if not conversion.causal:
        raise ValueError(
            f"student.conversion.mixer={conversion.mixer!r} is bidirectional: it can replace an encoder's attention, "
            "not a causal LM's (use mamba2 or mamba)"
        )
    data = teacher_config.to_dict()
    data.pop("quantization_config", None)
    config = CaldStudentConfig(
        teacher_config=data,
        conversion=to_dict(conversion.resolved(teacher_config)),
        teacher_name_or_path=teacher_name_or_path,
    )
    # The teacher's attention kernel for the attention layers a hybrid keeps (to_dict leaves it out).
    config._attn_implementation = teacher_config._attn_implementation
    return config


def attention_prefixes(model: nn.Module, adapter: FamilyAdapter) -> tuple[str, ...]:
    """State-dict key prefixes of the attention slots, in layer order (``model.layers.3.self_attn.``)."""
    slots = {id(adapter.attention(layer)): i for i, layer in enumerate(adapter.layers(model))}
    found = sorted((slots[id(m)], f"{name}.") for name, m in model.named_modules() if id(m) in slots)
    return tuple(prefix for _, prefix in found)


def fresh_mixer(config: CaldStudentConfig, layer_idx: int, seed: int, std: float) -> nn.Module:
    """Layer ``layer_idx``'s mixer as a plain module, drawn from its own RNG stream.

    The SSM's own parameters keep the mamba_ssm init (A, D, dt); every projection and
    convolution is drawn as the teacher family draws its weights (normal, ``std`` =
    its ``initializer_range``; zero bias), so a fresh mixer starts as a small
    perturbation of the teacher without attention. NOTE: PyTorch's default for the
    depthwise convolution (uniform +-0.5) makes fresh mixers flood the residual stream:
    SmolLM2's converted student starts at CE 13.5 with it and 10.5 with this, and after
    the default 50 steps reaches held-out perplexity 357 against about 200.

    NOTE: one stream per (seed, layer) makes the initialisation independent of how the
    student is built (whole or partitioned, on any number of ranks).
    """
    conversion = config.conversion_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + layer_idx)
        mixer = build_mixer(conversion.mixer, conversion.mixer_config(), config.hidden_size, layer_idx)
        with torch.no_grad():
            for module in mixer.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d)) and not isinstance(module, TimeStepProjection):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
    return mixer


def initial_mixers(
    student: CaldStudentForCausalLM, weights: WeightReader, seed: int, layers: range | None = None, placement: Placement = PLAIN
) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(the student's mixer, its initial weights as a fresh mixer), one layer at a time (only
    ``layers`` when given): seeded per layer, optionally from that layer's teacher attention.

    Of the fresh mixer only what ``placement`` keeps of each weight is sure to be initialised
    from the teacher (the rest may keep its seeded values): a ZeRO-3 rank reads the rows of the
    teacher's projections its partitions need, not the whole layer's attention."""
    conversion = student.config.conversion_config()
    teacher_config = student.config.teacher_hf_config()
    prefixes = attention_prefixes(student.backbone, student.adapter)
    renamed = RenamedReader(weights, student.backbone) if conversion.attention_init else None
    if conversion.attention_init and student.adapter.attention_extras:
        # NOTE: e.g. Qwen3's and OLMo2's q_norm / k_norm: what the attention computes from its
        # projections (a normalised q and k) is not what the mixer starts from.
        logger.warning(
            "%s's attention has weights besides its projections (%s): the attention-informed mixer init maps the "
            "projections alone, so it starts further from the teacher than for llama-like families",
            student.adapter.model_type, ", ".join(student.adapter.attention_extras),
        )
    std = getattr(teacher_config, "initializer_range", 0.02)
    for mixer in student.mixers():
        idx = mixer.layer_idx
        if layers is not None and idx not in layers:
            continue
        fresh = fresh_mixer(student.config, idx, seed, std)
        if conversion.attention_init:
            where = f"layer {idx}'s attention ({prefixes[idx]})"
            kept = {name: part for name, tensor in mixer.state_dict(keep_vars=True).items() if (part := placement.kept(tensor)) is not None}
            try:
                attn = read_attention_rows(student.adapter.read_attention, renamed, prefixes[idx], teacher_config, by_rows=bool(kept))
            except (AttributeError, KeyError, TypeError) as err:  # a projection missing from the checkpoint
                raise ValueError(f"the teacher's weights lack a projection of {where} that attention_init reads ({err})") from err
            check_attention_weights(attn, teacher_config, where)
            init_mixer_from_attention(fresh, attn, teacher_config, kept)
        yield mixer, fresh


def _init_mixers(student: CaldStudentForCausalLM, weights: WeightReader, seed: int, placement: Placement) -> None:
    """Initialise every mixer, one layer at a time, into its (possibly partitioned) parameters."""
    for mixer, fresh in initial_mixers(student, weights, seed, placement=placement):
        targets = mixer.state_dict(keep_vars=True)
        for name, value in fresh.state_dict().items():
            placement.assign(targets[name], value)


def build_student(
    teacher_config: PretrainedConfig,
    weights: WeightReader,
    conversion: ConversionConfig,
    *,
    seed: int = 0,
    placement: Placement = PLAIN,
    teacher_name_or_path: str | None = None,
    share_with: PreTrainedModel | None = None,
) -> CaldStudentForCausalLM:
    """Build the linear-time student of the teacher whose config and weights are given.

    ``share_with``: a teacher model whose tensors the student uses instead of copies for
    every non-attention weight (only for frozen copied weights: one copy in memory).
    """
    config = student_config(teacher_config, conversion, teacher_name_or_path)
    student_class = CaldEncoderForSequenceClassification if isinstance(config, CaldClassifierConfig) else CaldStudentForCausalLM
    # NOTE: no random init: every tensor is written below (copied, or a seeded fresh mixer).
    with placement.construct(teacher_config), no_init_weights():
        student = student_class(config)
    adapter = student.adapter
    student.backbone.tie_weights()  # no_init_weights also skips tying
    rotary_in_float32(student)  # a hybrid's kept attention computes the teacher's angles
    gc.collect()  # the untied head's tensor, if any (partitioned tensors sit in reference cycles)
    kept = set(config.attention_layers)  # a hybrid's attention is copied like everything else
    mixer_keys = tuple(p for i, p in enumerate(attention_prefixes(student.backbone, adapter)) if i not in kept) if student.mixers() else ()
    if share_with is not None:
        share_copied_weights(student, share_with)
        gc.collect()  # the student's own copies, now replaced
    else:
        # Copy every non-attention tensor; the backbone has the teacher's exact key layout.
        try:
            load_weights(
                student.backbone,
                weights,
                placement.assign,
                shape_of=placement.shape_of,
                skip_missing=mixer_keys,
                skip_unexpected=mixer_keys,  # the same slots hold attention in the teacher
            )
        except WeightsMismatchError as err:
            raise WeightsMismatchError(f"teacher/student mismatch while copying weights: {err}") from err
    _init_mixers(student, weights, seed, placement)
    placement.check_written(student, "the converted student")
    logger.info(
        "converted %s (%d of %d layers) -> %s student (%s placement%s), attention_init=%s",
        adapter.model_type,
        len(mixer_keys),
        teacher_config.num_hidden_layers,
        config.mixer,
        placement.name,
        ", copied weights shared with the teacher" if share_with is not None else "",
        config.conversion_config().attention_init,
    )
    return student


def share_copied_weights(student: CaldStudentForCausalLM, teacher: PreTrainedModel) -> None:
    """Make the student's non-mixer parameters the teacher's own parameter objects (one copy of each)."""
    mixers = {id(m) for m in student.mixers()}
    inside_mixer = set()
    for mixer in student.mixers():
        inside_mixer.update(id(m) for m in mixer.modules())
    teacher_modules = dict(teacher.named_modules())
    for name, module in student.backbone.named_modules():
        if id(module) in inside_mixer or id(module) in mixers:
            continue
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            source = teacher_modules.get(name)
            if source is None or getattr(source, pname, None) is None:
                raise RuntimeError(f"teacher/student mismatch: the teacher has no parameter {name}.{pname} to share")
            shared = source._parameters[pname]
            if tuple(getattr(shared, "ds_shape", shared.shape)) != tuple(getattr(param, "ds_shape", param.shape)):
                raise RuntimeError(f"teacher/student mismatch: {name}.{pname} has different shapes")
            module._parameters[pname] = shared


def convert_teacher(
    teacher: PreTrainedModel,
    conversion: ConversionConfig,
    teacher_name_or_path: str | None = None,
    *,
    seed: int = 0,
) -> CaldStudentForCausalLM:
    """Build the student of an in-memory plain ``teacher`` (which is left untouched).
    ``teacher_name_or_path``: where the teacher comes from, recorded in the student's config (a
    local folder as an absolute path, so ``cald-scale evaluate`` started elsewhere finds it)."""
    from ..fileio import absolute_if_local
    from .teacher import BUILTIN_TEACHERS

    if teacher_name_or_path:
        teacher_name_or_path = absolute_if_local(teacher_name_or_path, names=BUILTIN_TEACHERS)
    student = build_student(
        teacher.config,
        StateDictReader(teacher.state_dict()),
        conversion,
        seed=seed,
        teacher_name_or_path=teacher_name_or_path,
    )
    # NOTE: the parameters alone: a bf16 teacher keeps its rotary inv_freq in float32, and so
    # must a hybrid's kept attention (Module.to would round it, moving every position's angle).
    dtype = next(teacher.parameters()).dtype
    for param in student.parameters():
        param.data = param.data.to(dtype)
    return student


@torch.no_grad()
def copied_tensors_match(teacher: PreTrainedModel, student: CaldStudentForCausalLM) -> bool:
    """True when every tensor the student shares with the teacher is bitwise equal."""
    student_state = student.backbone.state_dict()
    teacher_state = teacher.state_dict()
    shared = [k for k in teacher_state if k in student_state]
    return bool(shared) and all(torch.equal(teacher_state[k], student_state[k]) for k in shared)
