"""Native export: a Llama-family student with Mamba2 mixers as a transformers ``BambaForCausalLM``.

Bamba's block is the teacher's block with a Mamba2 mixer (parameters named as ours) in the
attention slot, so the export is a key rename given by the family adapter
(``FamilyAdapter.bamba``) and a config translation. The folder loads with stock
transformers, no ``import cald_scale``:

    AutoModelForCausalLM.from_pretrained(folder)   # -> BambaForCausalLM

Layouts Bamba cannot express (gpt_neox blocks, Mamba-1 mixers) are refused here; their
students load through the Auto classes after ``import cald_scale`` (docs/using.md).

NOTE: with ``proj_bias`` (off by default) Bamba lets in_proj's bias at left pads into the
first real tokens' convolution window, which the student does not: on a padded batch such an
export differs from the student in those tokens (unpadded inputs are equal).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, BambaConfig, BambaForCausalLM
from transformers.initialization import no_init_weights

from ..conversion.modeling import CaldStudentConfig, CaldStudentForCausalLM, teacher_geometry
from ..conversion.registry import get_adapter
from ..conversion.weights import check_complete
from ..fileio import atomic_dir, check_replaceable, is_model_folder, model_type_of

logger = logging.getLogger(__name__)

__all__ = ["BambaExportError", "bamba_config", "bamba_state_dict", "check_exportable", "export_bamba", "to_bamba"]


_AUTO_ROUTE = "export it as a cald_scale student instead (save_pretrained; load with `import cald_scale` + AutoModelForCausalLM)"


class BambaExportError(ValueError):
    """The student's layout has no Bamba equivalent: ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"cannot export to Bamba: {reason}; {_AUTO_ROUTE}")


def check_exportable(student: CaldStudentForCausalLM | CaldStudentConfig) -> None:
    """Raise BambaExportError naming every reason Bamba cannot express this student (or its
    config): reads only the config, so it works on a ZeRO-3 partitioned student before
    training, and on a saved student before its weights are loaded."""
    config = getattr(student, "config", student)
    adapter = get_adapter(config.teacher_hf_config())
    if adapter.bamba is None:
        raise BambaExportError(adapter.bamba_refusal)
    if config.mixer != "mamba2":
        raise BambaExportError(f"its mixer is Mamba2, this student has {config.mixer!r} mixers")
    teacher = config.teacher_hf_config()
    mixer = config.conversion_config().mamba2
    reasons = []
    if getattr(teacher, "hidden_act", "silu") not in ("silu", "swish"):
        reasons.append(f"Bamba's convolution uses the MLP activation, which is {teacher.hidden_act!r}, not silu")
    if abs(mixer.norm_eps - teacher.rms_norm_eps) > 0:
        reasons.append(f"Bamba's gated norm uses rms_norm_eps ({teacher.rms_norm_eps}), the mixers use norm_eps {mixer.norm_eps}")
    if config.attention_layers and tuple(mixer.time_step_limit) != (0.0, float("inf")):
        # NOTE: transformers' Bamba clamps dt in its chunked scan but not in its one-token step,
        # so a hybrid export (the only kind that decodes with a cache) would decode differently.
        reasons.append(
            f"its mixers clamp the time step to {tuple(mixer.time_step_limit)}, which Bamba's cached decoding "
            "ignores (transformers' recurrent step has no dt limit)"
        )
    hidden = teacher_geometry(teacher)[0]
    if mixer.inner_size(hidden) % hidden:
        reasons.append(
            f"Bamba's mixer width is an integer mamba_expand x hidden_size ({hidden}); this student's is "
            f"{mixer.inner_size(hidden)} (the teacher attention's heads x head_dim)"
        )
    if "sliding_attention" in config.layer_types:  # a kept layer's own type (Qwen2 keeps full layers below max_window_layers)
        reasons.append(f"its kept attention uses a sliding window ({teacher.sliding_window}), which Bamba's attention does not")
    if reasons:
        raise BambaExportError("; ".join(reasons))


def bamba_config(student: CaldStudentForCausalLM) -> BambaConfig:
    """The BambaConfig with the student's geometry, layout and the teacher's vocabulary and RoPE."""
    check_exportable(student)
    teacher = student.config.teacher_hf_config()
    mixer = student.config.conversion_config().mamba2
    hidden, heads, kv_heads, head_dim = teacher_geometry(teacher)
    attention_layers = student.config.attention_layers
    rope = dict(getattr(teacher, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    # NOTE: Bamba defaults to rotating half of each head; the teacher rotates all of it.
    rope["partial_rotary_factor"] = 1.0
    return BambaConfig(
        vocab_size=teacher.vocab_size,
        tie_word_embeddings=bool(getattr(teacher, "tie_word_embeddings", False)),
        hidden_size=hidden,
        intermediate_size=teacher.intermediate_size,
        num_hidden_layers=teacher.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=teacher.hidden_act,
        rms_norm_eps=teacher.rms_norm_eps,
        max_position_embeddings=teacher.max_position_embeddings,
        attention_bias=student.adapter.bamba.attention_bias(teacher),
        mlp_bias=bool(getattr(teacher, "mlp_bias", False)),
        rope_parameters=rope,
        attn_layer_indices=attention_layers,
        mamba_n_heads=mixer.resolved_num_heads(hidden),
        mamba_d_head=mixer.head_dim,
        mamba_n_groups=mixer.n_groups,
        mamba_d_state=mixer.d_state,
        mamba_d_conv=mixer.d_conv,
        mamba_expand=mixer.inner_size(hidden) // hidden,
        mamba_chunk_size=mixer.chunk_size,
        mamba_conv_bias=mixer.conv_bias,
        mamba_proj_bias=mixer.proj_bias,
        time_step_limit=mixer.time_step_limit,
        pad_token_id=teacher.pad_token_id,
        bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id,
        # NOTE: transformers' Bamba cannot build its cache without an attention layer (its mask
        # needs one); without any, the export runs uncached by default, correct but slower.
        use_cache=bool(attention_layers),
        # An extra key stock transformers keeps and ignores: `cald-scale evaluate` and `generate
        # --teacher` find the teacher to score the export beside, as they do for the student.
        teacher_name_or_path=student.config.teacher_name_or_path,
    )


def bamba_state_dict(student: CaldStudentForCausalLM, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The student's backbone tensors under Bamba's names (``state_dict``: the backbone's, if
    already gathered, e.g. from ZeRO-3 partitions)."""
    check_exportable(student)
    layout = student.adapter.bamba
    rules = [(re.compile(pattern), replacement) for pattern, replacement in layout.key_renames]
    out = {}
    for key, value in (state_dict if state_dict is not None else student.backbone.state_dict()).items():
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


@torch.no_grad()
def to_bamba(student: CaldStudentForCausalLM) -> BambaForCausalLM:
    """The student as a BambaForCausalLM in memory (same tensors, Bamba's names)."""
    config = bamba_config(student)
    tensors = bamba_state_dict(student)
    dtype = next(student.parameters()).dtype
    # NOTE: no random init (every parameter is assigned below); buffers such as RoPE's
    # inverse frequencies are computed as usual.
    with no_init_weights():
        model = BambaForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    for key in list(missing):
        if key.endswith(student.adapter.bamba.zero_filled) or (key == "lm_head.weight" and config.tie_word_embeddings):
            missing.remove(key)
            if key != "lm_head.weight":
                tensors[key] = torch.zeros(expected[key].shape, dtype=dtype)
    if missing or unexpected:
        raise BambaExportError(
            f"the student's tensors do not map onto Bamba's: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BambaExportError(f"{key}: the student has shape {tuple(value.shape)}, Bamba expects {tuple(expected[key].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    # The student's stop tokens and sampling defaults; Bamba's own cache setting (it cannot build
    # a cache without an attention layer).
    generation = copy.deepcopy(student.generation_config)
    generation.use_cache = config.use_cache
    model.generation_config = generation
    return model.to(dtype).eval()


def export_bamba(student: CaldStudentForCausalLM | str | Path, target: str | Path, tokenizer=None) -> Path:
    """Write ``student`` (a model, or an exported student folder) as a Bamba folder: config,
    safetensors, tokenizer. Atomic: ``target`` appears complete or not at all. An existing
    ``target`` is replaced only when empty or an earlier Bamba export (FileExistsError otherwise)."""
    target = Path(target).expanduser().resolve()
    earlier_bamba = lambda old: is_model_folder(old, "bamba")  # noqa: E731
    if not isinstance(student, CaldStudentForCausalLM):
        folder = Path(student).expanduser().resolve()  # NOTE: resolved: a student named through ".." is still seen inside the target
        if folder == target or target in folder.parents:
            raise FileExistsError(f"will not export into {target}: it holds the student being exported ({folder})")
    check_replaceable(target, earlier_bamba)  # before any work
    if not isinstance(student, CaldStudentForCausalLM):
        kind = model_type_of(folder)
        if kind != CaldStudentConfig.model_type:
            raise ValueError(f"{folder} is not a cald_scale student (its config.json has model_type {kind or 'none'!r}, not {CaldStudentConfig.model_type!r})")
        check_exportable(CaldStudentConfig.from_pretrained(folder))  # before the weights are read
        if tokenizer is None and (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(folder)
        check_complete(folder)  # a weight file cut short: named in one line, not the safetensors library's traceback
        student = CaldStudentForCausalLM.from_pretrained(folder)
    model = to_bamba(student)
    if tokenizer is None:
        logger.warning("%s gets no tokenizer (the student has none to copy): `cald-scale generate` needs one; save the teacher's there", target)
    with atomic_dir(target, replace=True, replaceable=earlier_bamba) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target
