"""A run's DeepSpeed config (ds_config): read and checked, its "auto" fields filled, ZeRO-3 sized.

The shipped ds_configs hold DeepSpeed's own settings (ZeRO stage, offload) and mark
training hyper-parameters "auto"; those are filled from the run config here, so a value
lives in exactly one place. An explicit ds_config value that contradicts the run config
is an error, not a silent winner. ZeRO-3's buffer and prefetch sizes marked "auto" are
sized from one decoder block (DeepSpeed's defaults assume billions of elements: a 200 MB
gradient bucket and up to 1e9 gathered parameters kept alive whatever the model). Both
modes read it: the ZeRO-3 engines (``engines/zero3.py``) and the pipeline's
(``engines/pipeline.py``, ZeRO stage 0 or 1).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config_loader import ConfigError

__all__ = ["SHIPPED_DS_CONFIGS", "bf16_available", "check_ds_keys", "compute_dtype", "ds_config_file", "load_ds_config", "read_ds_config", "resolve_ds_config", "size_zero_buffers", "teacher_ds_config"]

logger = logging.getLogger("cald_scale.engines")


# Top-level sections DeepSpeed reads that deepspeed.runtime.constants does not name.
_DS_SECTIONS = (
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "compile", "aio", "autotuning", "curriculum_learning", "data_efficiency", "compression_training",
    "elasticity", "nebula", "amp", "pipeline", "sparse_attention", "quantize_training", "eigenvalue",
    "progressive_layer_drop", "weight_quantization", "hybrid_engine", "sequence_parallel_size", "monitor_config",
)


def _misspelled(keys, known: set[str], where: str, *, unknown_is_error: bool) -> list[str]:
    """Problems with ``keys``: a key close to a known one that is not itself known (a typo DeepSpeed
    would ignore), or, with ``unknown_is_error``, any unknown key (DeepSpeed would reject it later)."""
    problems = []
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
        if close or unknown_is_error:
            problems.append(f"{where}{key}" + (f" (did you mean {' or '.join(close)}?)" if close else " is not a DeepSpeed setting"))
    return problems


def _not_deepspeed() -> dict[str, str]:
    """Keys a ds_config may hold by mistake, with where they belong: the run config's training
    settings (TrainConfig's fields) and names of a precision."""
    import dataclasses

    from ..config import TrainConfig

    where = {f.name: f"it is the run config's train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    return where | dict.fromkeys(("precision", "dtype", "fp32", "float32"), 'the precision is the "bf16" or "fp16" section\'s "enabled"')


_NOT_DEEPSPEED = _not_deepspeed()

# What DeepSpeed's AdamW takes, whichever it builds: torch's AdamW (torch_adam), its FusedAdam or
# its CPU Adam (an offloaded optimizer).
_ADAM_PARAMS = {
    "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
    "torch_adam", "adam_w_mode", "bias_correction", "set_grad_none", "fp32_optimizer_states",
}


def _wrong_numbers(params: dict) -> list[str]:
    """The optimizer's numeric settings that are not numbers ("eps": "1e-8" failed inside the
    optimizer's constructor, after both models were built); "auto" is filled from the run config."""
    def number(value) -> bool:
        return value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool))

    problems = [f'optimizer.params.{key} must be a number, got {json.dumps(params[key])}' for key in ("lr", "eps", "weight_decay")
                if key in params and not number(params[key])]
    betas = params.get("betas")
    if betas is not None and not (betas == "auto" or (isinstance(betas, list) and len(betas) == 2 and all(map(number, betas)))):
        problems.append(f"optimizer.params.betas must be two numbers, got {json.dumps(betas)}")
    return problems


def check_ds_keys(config: dict, path: str | Path) -> None:
    """Refuse misspelled keys now, in one line, not after the teacher is built: DeepSpeed
    ignores an unknown top-level key (a typo silently does nothing) and rejects one inside
    zero_optimization only when the engine is built, in a long validation traceback."""
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    top = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | set(_DS_SECTIONS)
    fields = DeepSpeedZeroConfig.model_fields
    zero = set(fields) | {f.alias for f in fields.values() if f.alias}
    problems = _misspelled(config, top, "", unknown_is_error=False)
    # NOTE: DeepSpeed ignores an unknown top-level key, so a run-config setting put here did nothing.
    problems += [f"{key} is not a DeepSpeed setting ({_NOT_DEEPSPEED[key]})" for key in config if key not in top and key in _NOT_DEEPSPEED]
    if isinstance(config.get("zero_optimization"), dict):
        problems += _misspelled(config["zero_optimization"], zero, "zero_optimization.", unknown_is_error=True)
    params = (config.get("optimizer") or {}).get("params") if isinstance(config.get("optimizer"), dict) else None
    if isinstance(params, dict):  # NOTE: passed to the optimizer's constructor: a typo failed there, in a traceback after the models were built
        problems += _misspelled(params, _ADAM_PARAMS, "optimizer.params.", unknown_is_error=True)
        problems += _wrong_numbers(params)
    for section in ("offload_param", "offload_optimizer"):  # NOTE: DeepSpeed asserts this only when the engine is built
        offload = (config.get("zero_optimization") or {}).get(section) if isinstance(config.get("zero_optimization"), dict) else None
        if isinstance(offload, dict) and offload.get("device") == "nvme" and not offload.get("nvme_path"):
            problems.append(f"zero_optimization.{section} offloads to nvme but names no nvme_path (a folder on the NVMe drive)")
    # NOTE: DeepSpeed's own wandb and comet monitors start their runs online, whatever output.wandb says.
    problems += [
        f"{name}.enabled starts DeepSpeed's own {name} monitor, which logs online whatever output.wandb says; "
        + ("log through output.wandb (offline, online or disabled) instead" if name == "wandb" else "cald_scale logs through output.wandb")
        for name in ("wandb", "comet") if isinstance(config.get(name), dict) and config[name].get("enabled")
    ]
    if problems:
        raise ConfigError(f"DeepSpeed config {path}: {'; '.join(problems)}")


# The shipped configs (the repository's ds_configs/, package data of an installed cald_scale).
SHIPPED_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def ds_config_file(path: str | Path) -> Path:
    """``path``, or where it is not a file, the shipped config of that name: ``zero3``,
    ``zero3.json`` or ``ds_configs/zero3.json`` (the default, from a folder that is no checkout)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED_DS_CONFIGS / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if path.parent in (Path("."), Path("ds_configs")) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_DS_CONFIGS.glob("*.json")))
    raise FileNotFoundError(f"DeepSpeed config {path} does not exist (the shipped ones, by name: {names})")


def read_ds_config(path: str | Path) -> dict:
    """A DeepSpeed JSON config (a file, or a shipped one by name: ``ds_config_file``), or an error
    that names the file (or its misspelled key)."""
    path = ds_config_file(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object of settings, got {type(config).__name__}")
    for section, value in config.items():
        if section in ("zero_optimization", "bf16", "bfloat16", "fp16", "torch_autocast", "optimizer", "pipeline") and not isinstance(value, dict):  # the ones read here
            raise ConfigError(f"DeepSpeed config {path}: {section} must be an object of settings, got {json.dumps(value)}")
    check_ds_keys(config, path)
    return config


def load_ds_config(path: str | Path) -> dict:
    """A ZeRO-3 ds_config (the ZeRO-3 mode's)."""
    config = read_ds_config(path)
    stage = config.get("zero_optimization", {}).get("stage")
    if "pipeline" in config:
        raise ConfigError(f"DeepSpeed config {path} is a pipeline config: set train.pipeline_stages to the number of stages to run pipeline mode")
    if stage != 3:
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 3 (got {json.dumps(stage)}); teacher and student are ZeRO-3 engines")
    zero = config.get("zero_optimization", {})
    if isinstance(zero.get("zero_hpz_partition_size"), int) and zero["zero_hpz_partition_size"] > 1:
        # NOTE: DeepSpeed makes hpZ's intra-node group once per process and asserts when the second
        # model (the student, after the teacher) is built under zero.Init with it.
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.zero_hpz_partition_size={zero['zero_hpz_partition_size']} (ZeRO++'s "
            "secondary partition) cannot build two models, and teacher and student are two: leave it at 1"
        )
    if zero.get("zero_quantized_nontrainable_weights"):
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.zero_quantized_nontrainable_weights stores frozen weights quantized, "
            "and the teacher's and the copied weights are written into their partitions as they are: leave it out"
        )
    return config


def _fill_auto(node: dict, key: str, value: Any, where: str, source: str) -> None:
    """``node[key]`` filled with the run config's ``value`` (from its key ``source``) where "auto";
    an explicit value that differs is refused, naming both keys."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value and not (isinstance(value, (list, tuple)) and list(current) == list(value)):
        raise ConfigError(f"ds_config {where}{key}={current!r} contradicts the run config's {source} ({value!r}); set it to \"auto\" or make them agree")


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The precision a resolved ds_config's engines compute in: its bf16 or fp16 section
    (``zero.Init`` casts the models to it, the pipeline builds its stages in it), else float32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def resolve_ds_config(ds_config: dict, train, data_parallel_size: int, *, bf16_here: bool | None = None) -> dict:
    """Fill the "auto" fields from ``train`` (a TrainConfig), for ``data_parallel_size`` model
    replicas (every rank under ZeRO-3; the pipelines in pipeline mode). ``bf16_here``: whether
    the run's accelerator computes in bf16 (None: this machine's; given where the run will not
    run here, as ``--print_config`` on a login node)."""
    bf16_here = bf16_available() if bf16_here is None else bf16_here
    cfg = copy.deepcopy(ds_config)
    micro = train.micro_batch(data_parallel_size)
    _fill_auto(cfg, "train_micro_batch_size_per_gpu", micro, "", "train.global_batch_size / (train.grad_accum x replicas)")
    _fill_auto(cfg, "gradient_accumulation_steps", train.grad_accum, "", "train.grad_accum")
    _fill_auto(cfg, "train_batch_size", micro * train.grad_accum * data_parallel_size, "", "train.global_batch_size")
    _fill_auto(cfg, "gradient_clipping", train.grad_clip, "", "train.grad_clip")
    if "bfloat16" in cfg:  # DeepSpeed's older name of the bf16 section, which it reads only when "bf16" is absent
        if "bf16" in cfg:
            raise ConfigError('ds_config has both "bf16" and "bfloat16" (its older name): keep "bf16"')
        cfg["bf16"] = cfg.pop("bfloat16")
    if cfg.get("torch_autocast", {}).get("enabled"):
        # NOTE: DeepSpeed autocasts inside engine.forward only, which the stage-by-stage schedule
        # never calls: the compute would stay fp32 while gradients were reduced in bf16.
        raise ConfigError('ds_config enables torch_autocast, which the layerwise schedule cannot apply: use "bf16": {"enabled": "auto"} (or true)')
    bf16, fp16 = (cfg.setdefault(section, {"enabled": False}) for section in ("bf16", "fp16"))
    # "auto": bf16 where the accelerator has it, unless fp16 is asked for; fp16 only when asked.
    if fp16.get("enabled") == "auto":
        fp16["enabled"] = False
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_here and not fp16.get("enabled")
    if bf16.get("enabled") and fp16.get("enabled"):  # DeepSpeed asserts this only when the engine is built
        raise ConfigError('ds_config enables both bf16 and fp16: the engines compute in one of them, keep one "enabled": true')
    if bf16.get("enabled") and not bf16_here:
        raise ConfigError("ds_config enables bf16 but this machine has no bf16-capable accelerator; use \"auto\"")
    optimizer = cfg.get("optimizer")
    if optimizer is None:
        raise ConfigError('ds_config has no "optimizer" section: the student trains with AdamW (as ds_configs/zero3.json: {"type": "AdamW", "params": {"lr": "auto", ...}})')
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(
            f'ds_config optimizer type {optimizer.get("type")!r}: the run\'s optimizer settings (train.lr, train.betas, '
            'train.weight_decay) are AdamW\'s; use "AdamW"'
        )
    params = optimizer.setdefault("params", {})
    _fill_auto(params, "lr", train.lr, "optimizer.params.", "train.lr")
    _fill_auto(params, "weight_decay", train.weight_decay, "optimizer.params.", "train.weight_decay")
    _fill_auto(params, "betas", list(train.betas), "optimizer.params.", "train.betas")
    offloaded = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if params.get("torch_adam") == "auto":
        # torch's AdamW needs no extension build on any device; an offloaded optimizer must be
        # DeepSpeed's CPU Adam (its own fused C++ kernel).
        params["torch_adam"] = not offloaded
    if offloaded and not params["torch_adam"]:
        logger.info("optimizer offloaded to the CPU: DeepSpeed's CPU Adam extension is compiled on its first use on a machine (1-2 min, silent)")
    if params.get("fused") == "auto":
        # NOTE: torch's fused AdamW updates in place: the multi-tensor path allocated ~10 bytes
        # per trainable parameter of temporaries at every step (5.3 GB at 0.5B), and is ~10x slower on CPU.
        if params["torch_adam"]:
            params["fused"] = True
        else:
            del params["fused"]
    if cfg.get("scheduler") is not None:
        # NOTE: the run's phases own the LR schedule (each phase warms up and decays on its
        # own); a DeepSpeed scheduler would overwrite it at every step.
        raise ConfigError("ds_config has a scheduler section: the LR schedule is declared per phase in the run config (phases[].lr, train.warmup_steps); remove it")
    zero = cfg["zero_optimization"]
    if zero.get("overlap_comm") == "auto":
        # NOTE: overlap needs a side stream; on CPU (gloo) there is none to overlap with.
        zero["overlap_comm"] = torch.cuda.is_available()
    if zero.get("reduce_scatter") == "auto":
        # NOTE: one rank has nothing to scatter to. DeepSpeed's reduce-scatter path first copies each
        # gradient bucket into a new interleaved tensor; its all-reduce path reduces the bucket in place.
        zero["reduce_scatter"] = data_parallel_size > 1
    return cfg


def _sized_by_block(prefetch: bool) -> dict[str, int]:
    """Blocks' worth of elements for each "auto" ZeRO-3 size."""
    return {
        # Gather stage k+1 while stage k computes. NOTE: off on CPU, where ranks share the
        # cores and gloo, so nothing overlaps; and a prefetch coalesces parameters into one
        # buffer that stays alive until all of them are released, which at Llama-3.2-1B held
        # a second 1 GB copy of the embedding (benchmarks/results/scale_memory.json).
        "stage3_prefetch_bucket_size": 1 if prefetch else 0,
        "stage3_max_live_parameters": 2 if prefetch else 1,  # the stage running (and the one prefetched)
        "stage3_max_reuse_distance": 1,  # keep a parameter gathered only if reused within a block
        "reduce_bucket_size": 1,  # gradient bucket: one block's gradients
    }


def size_zero_buffers(ds_config: dict, block_numel: int, stage_size: int = 1, *, prefetch: bool | None = None) -> dict:
    """Fill ZeRO-3's "auto" buffer and prefetch sizes from one decoder block's parameter count.

    ``prefetch`` defaults to whether an accelerator is present.
    """
    cfg = copy.deepcopy(ds_config)
    zero = cfg["zero_optimization"]
    prefetch = torch.cuda.is_available() if prefetch is None else prefetch
    for key, blocks in _sized_by_block(prefetch).items():
        if zero.get(key) == "auto":
            scale = stage_size if key != "stage3_max_reuse_distance" else 1
            zero[key] = int(max(blocks * scale * block_numel, 1_000_000)) if blocks else 0
    leftover = _find_auto(cfg)
    if leftover:
        raise ConfigError(f"ds_config fields {leftover} are \"auto\" but nothing fills them")
    return cfg


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def teacher_ds_config(student_cfg: dict) -> dict:
    """Inference-only ZeRO-3 config for the teacher: same partitioning, no optimizer."""
    cfg = {k: copy.deepcopy(v) for k, v in student_cfg.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    zero = cfg["zero_optimization"]
    zero.pop("offload_optimizer", None)
    return cfg
