"""The teacher's ZeRO-3 engine over a run: swap in checkpoints, fine-tune it, release it.

Guidance (``distill/guidance.py``) decides *which* teacher guides each step; this module
does it to a partitioned engine:

- ``load``: write another checkpoint of the same architecture (a waypoint) tensor by
  tensor straight into this rank's partitions, as construction does, so no rank ever
  holds the whole model;
- ``train_step``: one next-token CE step of a trajectory teacher in its own engine;
- ``release``: destroy the engine (hooks, optimizer) and drop every reference, so the
  teacher's partitions are freed; returns what was freed, measured.
"""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import torch
from transformers import AutoConfig

from ..conversion.placement import Placement
from ..conversion.weights import WeightsMismatchError, load_weights, open_weights
from ..distill.stages import LayerwiseModel
from ..metrics import current_rss_bytes
from .checkpoint import load_either_precision
from .host_memory import return_free_memory
from .partitioned import is_partitioned
from .zero3 import begin_step

__all__ = ["ManagedTeacher", "check_teacher_checkpoint", "check_waypoints", "geometry_mismatch", "GEOMETRY_KEYS"]

logger = logging.getLogger("cald_scale.engines")

# Config fields that must agree for a checkpoint to fit the teacher's architecture.
GEOMETRY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")


def geometry_mismatch(theirs, ours) -> list[str]:
    """The geometry keys on which two model configs differ, as "key: theirs vs ours" (empty: they match)."""
    theirs, ours = _geometry(theirs), _geometry(ours)
    keys = [*theirs, *(k for k in ours if k not in theirs)]
    if theirs.get("num_labels") != ours.get("num_labels"):
        keys.remove("labels")  # another label count says it: no need to list every name
    return [f"{k}: {theirs.get(k)} vs {ours.get(k)}" for k in keys if theirs.get(k) != ours.get(k)]


def _geometry(config) -> dict:
    # A cald model's (classifier, student) block geometry lives in its family's own config.
    family = (config.teacher_hf_config() if hasattr(config, "teacher_hf_config") else config).to_dict()
    geometry = {k: family.get(k) for k in GEOMETRY_KEYS}
    # NOTE: only a classifier's head counts: every HF config carries a num_labels, an LM's is noise.
    if hasattr(config, "pooling") or any("ForSequenceClassification" in a for a in getattr(config, "architectures", None) or []):
        # The classes by name, in id order: a head of another task with as many classes would
        # pair them up by position.
        labels = [str(config.id2label[k]) for k in sorted(config.id2label, key=int)]
        geometry.update(num_labels=config.num_labels, pooling=getattr(config, "pooling", None), labels=labels)
    return geometry


def check_teacher_checkpoint(folder: str | Path, config, model: torch.nn.Module | None = None, placement: Placement | None = None) -> None:
    """Raise (naming ``folder``) unless it is a HF checkpoint of the teacher's architecture.

    Compares the config's geometry with ``config`` (the teacher's); given the built teacher
    ``model``, also every tensor's name and shape (read from the files' headers, no data):
    cheap enough to check every waypoint before training starts.
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"teacher checkpoint {folder} does not exist or has no config.json")
    differ = geometry_mismatch(AutoConfig.from_pretrained(folder, local_files_only=True), config)
    if differ:
        raise WeightsMismatchError(f"teacher checkpoint {folder} does not match the teacher ({'; '.join(differ)})")
    if model is None:
        return
    try:
        load_weights(model, open_weights(folder), placement.assign, shape_of=placement.shape_of, check_only=True)
    except (WeightsMismatchError, FileNotFoundError, OSError) as err:
        raise WeightsMismatchError(f"teacher checkpoint {folder}: {err}") from err


def check_waypoints(waypoints, config, model: torch.nn.Module | None = None, placement: Placement | None = None) -> None:
    """``check_teacher_checkpoint`` for every waypoint; one error names all the bad ones, so a
    list with several is fixed in one go rather than one launch per checkpoint."""
    problems = []
    for waypoint in waypoints:
        try:
            check_teacher_checkpoint(waypoint, config, model, placement)
        except (FileNotFoundError, WeightsMismatchError) as err:
            problems.append(err)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise WeightsMismatchError(f"{len(problems)} of the {len(waypoints)} waypoints cannot guide this run: " + "; ".join(map(str, problems)))


def _drop_global_references(module: torch.nn.Module) -> None:
    """Drop what DeepSpeed keeps of a destroyed ZeRO-3 engine's model in module-level state.

    NOTE: DeepSpeed 0.19 appends every ZeRO-3 root module to a global list
    (``parameter_offload.FWD_MODULE_STACK``) and never removes it, and caches which
    parameters to release per submodule in an unbounded class-level ``lru_cache`` keyed by
    the submodules; either keeps a destroyed engine's model (and all its partitions) alive
    for the life of the process. The cache is only a cache: the student's coordinator
    recomputes its entries.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    cached = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    # The lru_cache sits under DeepSpeed's nvtx wrapper (a closure), not on the attribute itself.
    for candidate in (cached, *(c.cell_contents for c in getattr(cached, "__closure__", None) or ())):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


class ManagedTeacher:
    """A teacher engine and its block-by-block view, with the weights it currently holds."""

    def __init__(self, engine, layerwise: LayerwiseModel, placement: Placement, loaded: str):
        self.engine = engine
        self.layerwise = layerwise
        self.placement = placement
        self.loaded: str | None = loaded
        """Folder of the weights now in the engine (the base teacher's, or a waypoint's); None
        once a trajectory phase has trained them in place."""

    def load(self, folder: str | Path) -> None:
        """Swap in the weights of ``folder`` (same architecture), partition by partition."""
        folder = str(folder)
        if folder == self.loaded:
            return
        load_weights(self.engine.module, open_weights(folder), self.placement.assign, shape_of=self.placement.shape_of)
        # NOTE: a trained (trajectory) teacher's optimizer keeps fp32 master weights apart from the
        # bf16/fp16 partitions just written: its next step would copy the old ones back over them.
        # (A frozen teacher has no such optimizer; NVMe-swapped groups are not in memory to copy.)
        flats = getattr(self.engine.optimizer, "fp16_partitioned_groups_flat", None)
        if flats is not None and all(flat is not None for flat in flats):
            self.engine.optimizer.refresh_fp32_params()
        logger.info("teacher weights now from %s", folder)
        self.loaded = folder

    def set_lr(self, lr: float, weight_decay: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = weight_decay

    def train_step(self, batch: dict) -> float:
        """Forward and backward of the teacher's own task loss (next-token or class CE) on one
        micro-batch, then ``engine.step()`` (DeepSpeed applies the update at the accumulation boundary).
        Dropout is on for this forward, as in any fine-tuning (the Std. run's), and off again for
        the forwards that guide the student."""
        begin_step(self.engine)
        module = self.engine.module
        module.train()
        try:
            loss = self.layerwise.task_loss(batch)
            self.engine.backward(loss)
        finally:
            module.eval()
        self.engine.step()
        self.loaded = None  # no folder holds these weights any more
        return loss.item()

    def release(self, keep: set[int] = frozenset()) -> dict:
        """Destroy the engine and free the teacher's parameters on this rank.

        ``keep``: ids of parameters another model still uses (the student's shared frozen
        weights); they stay. Returns the partition bytes freed, the teacher-only parameters
        still alive afterwards (0 when nothing leaks) and the resident memory before and after.
        """
        module = self.engine.module
        own = [p for p in module.parameters() if id(p) not in keep]
        freed = sum((p.ds_tensor if is_partitioned(p) else p).numel() * p.element_size() for p in own)
        refs = [weakref.ref(p) for p in own]
        rss_before = current_rss_bytes()
        self.engine.destroy()
        _drop_global_references(module)
        # NOTE: the engine, its module and the layerwise view all hold the parameters; the
        # DeepSpeed hooks were removed by destroy(), so dropping these frees them.
        del own, module
        self.engine = self.layerwise = None
        gc.collect()
        return_free_memory()
        alive = sum(ref() is not None for ref in refs)
        return {"freed_partition_bytes": int(freed), "teacher_params_alive": int(alive), "rss_before": rss_before, "rss_after": current_rss_bytes()}

    def save(self, tag_dir: Path) -> None:
        """The trajectory teacher's engine state (weights and optimizer) inside the student's checkpoint tag."""
        self.engine.save_checkpoint(str(tag_dir), tag="teacher", save_latest=False)

    def resume(self, tag_dir: Path) -> None:
        load_either_precision(self.engine)  # a tag saved in another precision (a run moved between machines)
        load_path, _ = self.engine.load_checkpoint(str(tag_dir), tag="teacher")
        if load_path is None:
            raise RuntimeError(f"checkpoint {tag_dir} has no trajectory teacher state (teacher/); it cannot resume a trajectory-guided run")
        self.loaded = None  # its own trained state
