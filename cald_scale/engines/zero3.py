"""DeepSpeed ZeRO-3 engines: a training engine for the student, an inference-only one for the teacher.

The shipped ds_configs hold DeepSpeed's own settings (ZeRO stage, offload, buckets) and
mark training hyper-parameters "auto"; those are filled from the run config here, so a
value lives in exactly one place. An explicit ds_config value that contradicts the run
config is an error, not a silent winner.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration import ConfigError

__all__ = ["load_ds_config", "resolve_ds_config", "teacher_ds_config", "build_student_engine", "build_teacher_engine", "param_groups", "register_mixer_params"]

logger = logging.getLogger("cald_scale.engines")


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 3 (got {stage}); teacher and student are ZeRO-3 engines")
    return config


def _fill(node: dict, key: str, value: Any, where: str) -> None:
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value and not (isinstance(value, (list, tuple)) and list(current) == list(value)):
        raise ConfigError(f"ds_config {where}{key}={current!r} contradicts the run config ({value!r}); set it to \"auto\" or make them agree")


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_ds_config(ds_config: dict, train, world_size: int) -> dict:
    """Fill the "auto" fields from ``train`` (a TrainConfig)."""
    cfg = copy.deepcopy(ds_config)
    micro = train.micro_batch(world_size)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro, "")
    _fill(cfg, "gradient_accumulation_steps", train.grad_accum, "")
    _fill(cfg, "train_batch_size", micro * train.grad_accum * world_size, "")
    _fill(cfg, "gradient_clipping", train.grad_clip, "")
    for section in ("bf16", "fp16"):
        node = cfg.setdefault(section, {"enabled": False})
        if node.get("enabled") == "auto":
            node["enabled"] = section == "bf16" and bf16_available()
    if cfg["bf16"].get("enabled") and not bf16_available():
        raise ConfigError("ds_config enables bf16 but this machine has no bf16-capable accelerator; use \"auto\"")
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", train.lr, "optimizer.params.")
        _fill(params, "weight_decay", train.weight_decay, "optimizer.params.")
        _fill(params, "betas", list(train.betas), "optimizer.params.")
        if params.get("torch_adam") == "auto":
            # Fused/CPU-Adam extensions need a compiler toolchain for the accelerator; torch's
            # AdamW is the safe choice on CPU.
            params["torch_adam"] = not torch.cuda.is_available()
    scheduler = cfg.get("scheduler")
    if scheduler is not None:
        if scheduler.get("type") != "WarmupCosineLR":
            raise ConfigError(f"ds_config scheduler.type {scheduler.get('type')!r}: only WarmupCosineLR is wired to the run config")
        params = scheduler.setdefault("params", {})
        _fill(params, "total_num_steps", train.max_steps, "scheduler.params.")
        _fill(params, "warmup_num_steps", train.warmup_steps, "scheduler.params.")
        _fill(params, "cos_min_ratio", train.min_lr_ratio, "scheduler.params.")
        params.setdefault("warmup_min_ratio", 0.0)
        params.setdefault("warmup_type", "linear")
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


def param_groups(student: nn.Module, lr: float, copied_lr_scale: float, weight_decay: float) -> list[dict]:
    """Mixers at the peak LR, copied teacher weights at a scaled LR; frozen weights left out."""
    mixer_ids = {id(p) for m in student.mixers() for p in m.parameters()}
    mixers = [p for p in student.parameters() if p.requires_grad and id(p) in mixer_ids]
    copied = [p for p in student.parameters() if p.requires_grad and id(p) not in mixer_ids]
    groups = [{"params": mixers, "lr": lr, "weight_decay": weight_decay, "name": "mixers"}]
    if copied:
        groups.append({"params": copied, "lr": lr * copied_lr_scale, "weight_decay": weight_decay, "name": "copied"})
    return groups


def register_mixer_params(model: nn.Module) -> None:
    """Let ZeRO-3 gather the parameters a mixer reads from its children without calling them.

    Mixers hand ``conv1d.weight`` (and Mamba's ``dt_proj``) straight to scan kernels, so the
    child's own pre-forward hook never fires; registering them as external parameters of
    the mixer makes the mixer's hook gather them.
    """
    import deepspeed

    mixers = model.mixers() if hasattr(model, "mixers") else []
    for mixer in mixers:
        own = {id(p) for p in mixer.parameters(recurse=False)}
        for param in mixer.parameters():
            if id(param) not in own:
                deepspeed.zero.register_external_parameter(mixer, param)


def build_student_engine(student: nn.Module, ds_config: dict, groups: list[dict]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=groups, config=ds_config)
    if engine.zero_optimization_partition_weights():
        register_mixer_params(engine.module)
    return engine


def build_teacher_engine(teacher: nn.Module, ds_config: dict):
    import deepspeed

    teacher.eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine
