"""Resume a ZeRO-3 checkpoint on a different number of ranks (64 -> 32, 2 -> 1) through DeepSpeed's universal format.

A ZeRO-3 tag holds one optimizer shard per rank, cut for the world size it was saved
with; an engine on another world size cannot load it. DeepSpeed's ``ds_to_universal``
rewrites a tag as one file per parameter and state (fp32 weights, Adam moments), which
an engine of any size loads when its config says ``"checkpoint": {"load_universal": true}``
(read when the engine is built, so it must be decided before ``build_models``).

The flow (``plan_resume`` -> ``ResumePlan``):
1. Before the engines exist: read the world size the newest complete tag was saved with
   from DeepSpeed's own shard files, and add the ds_config entry when it differs.
2. When a tag is loaded: ``source(tag)`` converts it once, on rank 0, into ``<tag>/universal/``
   (a temp folder renamed into place, so the folder is complete or absent); the other ranks
   poll the filesystem for it (a conversion of a large model outlasts collective timeouts).
   The copy lives inside its tag, so pruning a tag removes it, and a second resume reuses it.
   Sub-checkpoints saved inside the tag (a trajectory teacher's ``teacher/``) are converted
   beside it, into ``<tag>/universal/teacher/``.
3. After the load: ``finish`` repairs what DeepSpeed's universal loader gets wrong (below)
   and remaps the data cursor to the new micro-batch layout.

NOTE (DeepSpeed 0.19 ZeRO-3 universal load, ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``):
every optimizer param group receives the hyper-parameters of group 0 (name, weight decay,
...), and every sub-group receives the *same* Adam ``step`` tensor object, which torch's
AdamW then increments in place once per sub-group per step (wrong bias correction from the
first step on). ``repair_universal_optimizer`` restores each group's own hyper-parameters
from the converted folder and gives every sub-group its own step counter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..config_loader import ConfigError
from ..fileio import atomic_dir, atomic_write_text, fsync_path, wait_for_file, write_failure_note
from .distributed import barrier, rank
from .ds_files import parse_state_file
from .preemption import raise_if_preempted, run_interruptible
from .safe_load import load_data, refusal, weights_only_loads

__all__ = [
    "ResumePlan", "plan_resume", "saved_world_size", "universal_copy", "remap_cursor", "repair_universal_optimizer", "UNIVERSAL",
]

logger = logging.getLogger("cald_scale.reshard")

UNIVERSAL = "universal"
"""The converted copy of a tag: ``<tag>/universal/``."""
_DONE = "cald_universal.json"  # written last inside the copy: its presence means "complete"
_FAILED = ".universal.failed"  # rank 0's error, for the ranks that wait on it
OPTIMIZER_GROUPS = "optimizer_groups"
"""The client-state key of a checkpoint's optimizer group names (``ResumePlan.outside_groups``)."""


# -- reading a tag ----------------------------------------------------------------------------
def saved_world_size(folder: Path) -> int | None:
    """The data-parallel world size a ZeRO checkpoint folder was saved with (its count of
    optimizer shards), or None when the folder holds no ZeRO optimizer shard."""
    shards = (parse_state_file(p.name) for p in Path(folder).iterdir())
    dp_ranks = {f.data_rank for f in shards if f is not None and f.kind == "optim" and f.data_rank is not None}
    if not dp_ranks:
        return None
    if dp_ranks != set(range(max(dp_ranks) + 1)):
        raise RuntimeError(f"{folder} lacks the optimizer shards of ranks {sorted(set(range(max(dp_ranks) + 1)) - dp_ranks)}")
    return len(dp_ranks)


def _records_groups(tags: Sequence[tuple[int, Path]], newest: dict) -> bool:
    """Whether the run's checkpoints record their optimizer groups (read from the newest readable
    tag: an unreadable one is skipped by the loader too; ``newest``: the newest tag's states,
    already read); True for a fresh run."""
    for i, (_, tag) in enumerate(tags):
        if states := newest if i == 0 else _saved_states(tag):
            return OPTIMIZER_GROUPS in states
    return True


def _saved_states(folder: Path) -> dict:
    """Rank 0's model states of a checkpoint folder: DeepSpeed's records (its config under
    ``ds_config``) and the client state; {} when there are none or they cannot be read."""
    files = sorted(Path(folder).glob("*zero_pp_rank_0_mp_rank_00_model_states.pt")) or sorted(Path(folder).glob("mp_rank_00_model_states.pt"))
    if not files:
        return {}
    try:  # mmap: the file may hold rank 0's share of the frozen weights; only small records are read
        return load_data(files[0], map_location="cpu", mmap=True)
    except Exception as err:  # noqa: BLE001 - unreadable: the loader reports it and falls back to an older tag
        logger.warning("cannot read the model states saved in %s (%s)", files[0], refusal(err) or f"{type(err).__name__}: {err}")
        return {}


# -- conversion ------------------------------------------------------------------------------
def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


# The converter's module run with our records allowed: its loads are weights-only (safe_load), and
# safe_load.py is loaded by path, not through the package (whose import costs seconds). Its worker
# pool forks, so the workers inherit the allowed records (forkserver, Python 3.14's default, or
# spawn would start them without).
_CONVERTER = (
    "import importlib.util, multiprocessing, runpy, sys; multiprocessing.set_start_method('fork', force=True); "
    "spec = importlib.util.spec_from_file_location('cald_safe_load', sys.argv.pop(1)); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.allow_records(); "
    "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)"
)


def _convert(source: Path, output: Path) -> None:
    """DeepSpeed's own converter, in a child process (its memory goes back to the OS when it ends)."""
    from . import safe_load

    workers = str(_workers())
    cmd = [
        sys.executable, "-c", _CONVERTER, safe_load.__file__, "--input_folder", str(source), "--output_folder", str(output),
        "--num_extract_workers", workers, "--num_merge_workers", workers,
    ]
    with weights_only_loads():
        returncode, output_text = run_interruptible(cmd, f"converting {source.name} to the universal format")
    if returncode != 0:
        lines = [line for line in output_text.splitlines() if line.strip()]
        reason = refusal("\n".join(lines[-12:])) or " | ".join(lines[-3:])
        raise RuntimeError(f"ds_to_universal failed on {source} (exit {returncode}): {reason}")
    # The converter points a "latest_universal" file in the output's parent at the temp name; we load by explicit tag.
    (output.parent / "latest_universal").unlink(missing_ok=True)


def _convert_tag(tag: Path, output: Path) -> dict:
    """Convert ``tag`` and every ZeRO checkpoint saved inside it (e.g. ``teacher/``) into ``output``."""
    started = time.time()
    world = saved_world_size(tag)
    if world is None:
        raise RuntimeError(f"{tag} holds no ZeRO optimizer shard: nothing to convert")
    _convert(tag, output)
    nested = sorted(p.name for p in tag.iterdir() if p.is_dir() and p.name != UNIVERSAL and not p.name.startswith(".") and saved_world_size(p))
    for name in nested:
        _convert(tag / name, output / name)
    return {"source": tag.name, "source_world_size": world, "nested": nested, "seconds": round(time.time() - started, 2)}


def universal_copy(tag: Path, *, poll_seconds: float = 1.0, timeout_seconds: float = 6 * 3600) -> Path:
    """``<tag>/universal/``, converting it first if needed: rank 0 converts while the
    other ranks poll the filesystem for its completion marker (or rank 0's failure)."""
    tag = Path(tag)
    target = tag / UNIVERSAL
    failed = tag / _FAILED
    if (target / _DONE).is_file():
        return target
    if rank() == 0:
        # Leftovers of an interrupted attempt: cleared before the others start to wait.
        failed.unlink(missing_ok=True)
        for stale in tag.glob(f".{UNIVERSAL}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)  # renamed into place but no marker: never complete
    barrier()  # short; the conversion itself runs outside any collective
    if rank() == 0:
        logger.info("converting %s to DeepSpeed's universal format (saved on %s ranks)", tag, saved_world_size(tag))
        try:
            with atomic_dir(target) as tmp:
                info = _convert_tag(tag, tmp)
                for path in sorted(tmp.rglob("*"), reverse=True):  # durable before the rename makes it visible
                    fsync_path(path)
                atomic_write_text(tmp / _DONE, json.dumps(info, indent=1), durable=True)
        except Exception as err:
            write_failure_note(failed, err)  # cleared by the next start's rank 0 before anyone waits
            raise
        logger.info("universal copy of %s ready in %.1f s", tag.name, info["seconds"])
        return target
    wait_for_file(
        target / _DONE, failure_note=failed,
        what=f"convert {tag} to the universal format", timeout_s=timeout_seconds, poll_s=poll_seconds, interrupt=raise_if_preempted,
    )
    return target


# -- after the load --------------------------------------------------------------------------
def repair_universal_optimizer(engine, folder: Path) -> None:
    """Undo the two flaws of DeepSpeed's ZeRO-3 universal load (module docstring): give each
    param group back its own hyper-parameters and each sub-group its own Adam step counter."""
    zero = engine.optimizer
    base = getattr(zero, "optimizer", None)
    if base is None or not hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    saved = load_data(Path(folder) / "zero" / "optimizer_state.pt", map_location="cpu", mmap=True)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise RuntimeError(f"{folder} has {len(saved_groups)} optimizer param groups, the engine {len(base.param_groups)}: a different model or trainable set")
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    seen: set[int] = set()
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat, {})
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _check_global_batch(saved: int, current: int, world_size: int) -> None:
    """The data order is a function of the optimizer step for one global batch size (data/sampler.py)."""
    if saved != current:
        raise ConfigError(
            f"the checkpoint was trained with a global batch of {saved} sequences, this run with {world_size} data-parallel rank(s) uses {current}; "
            f"set train.global_batch_size={saved} (and train.micro_batch_size=null) to continue its data order"
        )


def remap_cursor(saved: dict, *, micro_batch: int, grad_accum: int, world_size: int) -> dict:
    """The client state with ``micro_cursor`` in units of this run's micro-step.

    One micro-step reads ``micro_batch x world_size`` consecutive samples of the step-indexed
    data order (``data/sampler.py``), so the cursor is a position in that order; its unit
    changes with the world size (and grad_accum) even when the global batch does not. The
    layout it was saved with is DeepSpeed's own record (``ds_config`` in the checkpoint).
    """
    old = saved.get("ds_config") or {}
    if "micro_cursor" not in saved or "train_batch_size" not in old:
        return dict(saved)
    old_global, old_accum = int(old["train_batch_size"]), int(old["gradient_accumulation_steps"])
    _check_global_batch(old_global, micro_batch * grad_accum * world_size, world_size)
    old_unit, new_unit = old_global // old_accum, micro_batch * world_size
    samples = int(saved["micro_cursor"]) * old_unit
    cursor = math.ceil(samples / new_unit)
    if cursor * new_unit != samples:
        # Only after skipped (non-finite) micro-batches: never read a sample twice.
        logger.warning("data cursor at sample %d falls inside a micro-step of %d: skipping %d samples", samples, new_unit, cursor * new_unit - samples)
    if old_unit != new_unit:
        logger.info("data cursor remapped: %d micro-steps of %d samples -> %d of %d", saved["micro_cursor"], old_unit, cursor, new_unit)
    return {**saved, "micro_cursor": cursor}


# -- the plan --------------------------------------------------------------------------------
@dataclasses.dataclass
class ResumePlan:
    """What a resume on ``world_size`` ranks must change, decided before the engines exist."""

    world_size: int
    tag: Path | None
    """The newest complete tag (None: a fresh run)."""
    saved_world_size: int | None
    universal: bool
    """Load through DeepSpeed's universal format (the newest tag was saved on another world size)."""
    outside_groups: bool = True
    """The student's optimizer holds the copied weights outside the blocks in groups of their own
    (``zero3.param_groups``), as a fresh run's does. A checkpoint that did not record its groups
    (``OPTIMIZER_GROUPS``; saved before 2026-12-05) joined them with the other copied weights,
    and resumes so: its optimizer state has that layout."""
    loaded: list[Path] = dataclasses.field(default_factory=list)
    """The folders handed to DeepSpeed, in order (the last one loaded)."""

    def ds_config(self, ds_config: dict) -> dict:
        """``ds_config`` with ``"checkpoint": {"load_universal": true}`` when the load is universal."""
        if not self.universal:
            return ds_config
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload == "nvme":
            raise ConfigError(
                f"{self.tag} was saved on {self.saved_world_size} ranks and this run has {self.world_size}: DeepSpeed cannot "
                "reshard an NVMe-offloaded optimizer; resume on the same number of ranks or use a config without NVMe optimizer offload"
            )
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def source(self, tag: Path) -> Path:
        """The folder to load for ``tag``: the tag itself, or its universal copy (converted on first use)."""
        folder = universal_copy(tag) if self.universal else Path(tag)
        if not self.universal and (saved := saved_world_size(folder)) not in (None, self.world_size):
            raise RuntimeError(f"{tag.name} was saved on {saved} ranks but this run (built for {self.world_size}-rank tags) cannot reshard it")
        self.loaded.append(folder)
        return folder

    def finish(self, engine, saved: dict, *, micro_batch: int, grad_accum: int, teacher_engine=None) -> dict:
        """After the load: repair the optimizers of a universal load (the student's, and a
        trajectory teacher's saved in ``teacher/``); the client state with its data cursor in
        this run's micro-step unit."""
        if saved and self.universal and self.loaded:
            folder = self.loaded[-1]
            repair_universal_optimizer(engine, folder)
            if teacher_engine is not None and (folder / "teacher" / "zero").is_dir():
                repair_universal_optimizer(teacher_engine, folder / "teacher")
        return remap_cursor(saved, micro_batch=micro_batch, grad_accum=grad_accum, world_size=self.world_size)


def _check_mode(tag: Path, saved_config: dict, pipeline_stages: int, partition) -> None:
    """A checkpoint resumes only in the mode and pipeline layout it was saved in: their
    parameter and optimizer shards are cut differently (DeepSpeed fails deep in its loader,
    blaming its parameter alignment)."""
    saved = int((saved_config.get("pipeline") or {}).get("stages") or 0)
    if saved_config and saved == pipeline_stages and pipeline_stages:
        was = saved_config["pipeline"].get("partition", "uniform")
        if was != partition:
            raise ConfigError(
                f"{tag} was saved with pipeline.partition {was!r} and this run's ds_config has {partition!r}: each stage's "
                f"shards hold its own blocks, so resume it with partition {was!r}, or use a new output.run_dir"
            )
    if not saved_config or saved == pipeline_stages:
        return
    now = f"a {pipeline_stages}-stage pipeline (train.pipeline_stages={pipeline_stages})" if pipeline_stages else "ZeRO-3 mode (train.pipeline_stages=0)"
    keep = (
        f"train.pipeline_stages={saved} with a pipeline ds_config (ds_configs/pipeline.json)" if saved
        else "train.pipeline_stages=0 with a ZeRO-3 ds_config (ds_configs/zero3.json)"
    )
    was = f"a {saved}-stage pipeline" if saved else "ZeRO-3 mode"
    raise ConfigError(f"{tag} was saved by {was} and this run is {now}: resume it with {keep}, or use a new output.run_dir")


def plan_resume(
    tags: Sequence[tuple[int, Path]], world_size: int, *, global_batch: int | None = None, pipeline_stages: int = 0, partition="uniform",
) -> ResumePlan:
    """Decide whether this run loads through the universal format: the newest of the complete
    ``tags`` (``checkpoint.complete_tags``, newest first) was saved on another world size
    (``world_size``: the data-parallel size, every rank in ZeRO-3 mode). Call before the
    engines are built (the decision is part of their ds_config). Refused now, before any
    engine is built or tag converted: a checkpoint of another mode or pipeline layout, of
    another number of pipeline replicas (DeepSpeed reshards ZeRO-3 checkpoints only) or stage
    ``partition`` (the ds_config's pipeline.partition) and, with ``global_batch``, of another
    global batch size."""
    tag = Path(tags[0][1]) if tags else None
    saved = saved_world_size(tag) if tag is not None else None
    states = _saved_states(tag) if tag is not None else {}
    old = states.get("ds_config") or {}
    if tag is not None:
        _check_mode(tag, old, pipeline_stages, partition)
    if pipeline_stages and saved is not None and saved != world_size:
        raise ConfigError(
            f"{tag} was saved by {saved} pipeline replica(s) and this run has {world_size}: a pipeline checkpoint resumes on "
            f"as many replicas, {saved * pipeline_stages} ranks for {pipeline_stages} stages"
        )
    universal = not pipeline_stages and saved is not None and saved != world_size
    if tag is not None and global_batch is not None and "train_batch_size" in old:
        _check_global_batch(int(old["train_batch_size"]), global_batch, world_size)
    if universal:
        logger.info("%s was saved on %d ranks; resuming on %d through DeepSpeed's universal checkpoint", tag, saved, world_size)
    return ResumePlan(world_size=world_size, tag=tag, saved_world_size=saved, universal=universal, outside_groups=_records_groups(tags, states))
