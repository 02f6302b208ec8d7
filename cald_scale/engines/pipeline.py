"""Pipeline mode: a DeepSpeed PipelineModule whose stage k holds teacher and student blocks [a_k, b_k).

Build. Every rank lays out teacher and student on the meta device (no memory) and allocates
only its own stage: blocks [a_k, b_k) of both models, plus the embeddings on the first stage
and the final norm and LM head on the last, each tensor read from the teacher's checkpoint
(mixers get the ZeRO-3 mode's seeded initialisation), so no rank reads or holds a whole
model. With frozen copied weights and a fixed teacher (``student.share_frozen_weights``) the
student's copies are the teacher's own tensors; frozen copies are in no checkpoint either way
(rebuilt on resume). The teacher's pieces are not registered in the module: frozen, in no
optimizer, in no checkpoint.

Run. What a stage hands the next (floating-point tensors first):

  end_to_end      (student_h, layer_losses, teacher_h bits, input_ids)
  teacher_forced  (layer_losses, teacher_h bits, input_ids): each student block takes the
                  teacher's hidden state, so student_h does not travel and no hidden-state
                  gradient crosses a stage; only the L-vector of layer losses carries its own
  eval_*          (hidden, input_ids): one model's held-out perplexity

Each layer loss is computed on the stage that owns the layer (``distill.losses.layer_loss``)
into ``layer_losses``; the last stage adds CE (and KL) and weighs the parts with the phase's
loss config as the ZeRO-3 mode does (``distill.step``). Only the student path is
back-propagated. NOTE: DeepSpeed's PipelineEngine expects a gradient for every
floating-point tensor it passes between stages, so the teacher's hidden state travels as an
integer view of its bits.

Data parallel runs across the world_size / pipeline_stages replicas with ZeRO stage 0 or 1
(the PipelineEngine refuses ZeRO-2 and -3). Selected by ``train.pipeline_stages`` and a
pipeline ds_config (ds_configs/pipeline.json).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Literal

import torch
from accelerate import init_empty_weights
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from ..config import RunConfig
from ..config_loader import ConfigError
from ..conversion.modeling import CaldStudentForCausalLM
from ..conversion.placement import rotary_in_float32
from ..conversion.surgery import attention_prefixes, initial_mixers, share_copied_weights, student_config
from ..conversion.teacher import TeacherSource
from ..conversion.weights import RenamedReader, SafetensorsReader, WeightReader, WeightsMismatchError, open_weights
from ..distill.losses import LossConfig, layer_loss, next_token_nll
from ..distill.phases import Phase, PhasePlan, set_phase_lr
from ..distill.stages import LayerwiseModel, make_stages
from ..distill.step import combine_loss_parts, distill_targets, loss_part_names
from ..fileio import atomic_dir
from ..metrics import current_rss_bytes
from ..eval.perplexity import PAD, perplexity_result
from .distributed import all_true, barrier, gather_objects, on_main
from .host_memory import return_free_memory
from .ds_files import parse_state_file
from .partitioned import whole_row_pieces
from .models import block_numel, checkpoint_excludes_frozen, set_trainable, shares_teacher_weights
from .ds_config import compute_dtype, read_ds_config, resolve_ds_config, size_zero_buffers
from .zero3 import param_groups

__all__ = [
    "load_pipeline_ds_config",
    "stage_bounds",
    "build_pipeline",
    "pipeline_train_step",
    "PipelineModels",
    "PipelineGuide",
    "CaldPipeline",
    "CaldStage",
]

logger = logging.getLogger("cald_scale.engines")


# -- config --------------------------------------------------------------------------------
def load_pipeline_ds_config(path: str | Path, train, world_size: int, *, bf16_here: bool | None = None) -> dict:
    """A pipeline ds_config with its "auto" fields filled from ``train`` (a TrainConfig)."""
    path = Path(path)
    config = read_ds_config(path)
    if "pipeline" not in config:
        raise ConfigError(f"pipeline mode (train.pipeline_stages={train.pipeline_stages}) needs a ds_config with a pipeline section, e.g. ds_configs/pipeline.json; {path} has none")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0 or 1 in pipeline mode (got {json.dumps(stage)}); DeepSpeed's PipelineEngine refuses ZeRO-2 and -3")
    config.setdefault("zero_optimization", {"stage": stage})
    stages = config["pipeline"].get("stages", "auto")
    if stages not in ("auto", train.pipeline_stages):
        raise ConfigError(f"ds_config pipeline.stages={stages!r} contradicts train.pipeline_stages={train.pipeline_stages}; set it to \"auto\"")
    config["pipeline"]["stages"] = train.pipeline_stages
    try:
        dp = train.data_parallel_size(world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    resolved = resolve_ds_config(config, train, dp, bf16_here=bf16_here)
    _check_overflow_guard(resolved, path)
    return resolved


def _check_overflow_guard(config: dict, path: Path) -> None:
    """Pipeline mode skips a step through DeepSpeed's overflow check (non-finite gradients, and a
    step whose every micro-batch was masked): refuse the optimizer set-ups that have none."""
    zero = config.get("zero_optimization", {})
    if config.get("fp16", {}).get("enabled"):
        return  # the loss scaler skips it
    if config.get("bf16", {}).get("enabled"):
        if zero.get("stage", 0) == 1 and not config["bf16"].get("check_grad_overflow", True):
            raise ConfigError(f"DeepSpeed config {path}: pipeline mode needs bf16.check_grad_overflow (it skips a step with non-finite gradients); remove the key")
        return
    if zero.get("stage", 0) == 0:
        raise ConfigError(
            f"DeepSpeed config {path}: in float32, pipeline mode needs zero_optimization.stage 1: without ZeRO, DeepSpeed's "
            "optimizer has no overflow check, and a step with non-finite gradients would write NaN into the weights"
        )
    if not zero.get("compute_grad_norm", True):
        raise ConfigError(f"DeepSpeed config {path}: pipeline mode needs zero_optimization.compute_grad_norm (ZeRO-1 finds non-finite gradients through it); remove the key")


def stage_bounds(num_layers: int, num_stages: int, partition: str | list[int] = "uniform") -> list[int]:
    """Block boundaries [0 = a_0, a_1, ..., a_S = L]: stage k holds blocks [a_k, a_{k+1}).

    "uniform" gives every stage L // S or L // S + 1 blocks, spread evenly (30 over 4: 7, 8, 7,
    8); a list gives the boundaries themselves."""
    if num_stages > num_layers:
        raise ConfigError(f"train.pipeline_stages={num_stages} exceeds the teacher's {num_layers} blocks: every stage needs at least one block")
    if partition == "uniform":
        return [k * num_layers // num_stages for k in range(num_stages + 1)]
    bounds = list(partition) if isinstance(partition, (list, tuple)) else []
    if len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"ds_config pipeline.partition={partition!r}: use \"uniform\" or {num_stages + 1} increasing block boundaries from 0 to {num_layers}"
        )
    return bounds


def _check_supported(cfg: RunConfig, plan: PhasePlan, tied: bool) -> None:
    """Refuse, naming why, what pipeline mode cannot run with this teacher (``tied``: the student's
    head is its embedding); what the config alone rules out (trajectory guidance, init_from,
    classification) is refused when it is loaded (config.py)."""
    for phase in plan.phases:
        if tied and cfg.train.pipeline_stages > 1 and phase.trainable == "all" and phase.mode == "end_to_end":
            raise ConfigError(
                f"phase {phase.name!r} trains the student's tied input/output embedding, which pipeline mode holds as two copies "
                "(first and last stage) that would drift apart; use student.trainable=mixers or the ZeRO-3 mode"
            )


def _check_every_stage_converts(cfg: RunConfig, config, bounds: list[int]) -> None:
    """A stage whose blocks all keep the teacher's attention has no mixer: nothing of it would
    train under student.trainable=mixers, and its optimizer would lack the other stages' groups."""
    conversion = cfg.student.conversion.resolved(config)
    if not conversion.converts:
        return
    kept = set(conversion.attention_layers)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if set(range(a, b)) <= kept:
            raise ConfigError(
                f"pipeline stage {k} holds blocks [{a}, {b}), which all keep the teacher's attention, so it has no mixer to train; "
                f"choose a pipeline partition (ds_config pipeline.partition) or train.pipeline_stages that gives every stage a converted layer"
            )


def _check_same_groups(groups: list[dict], stage: int) -> None:
    """Every stage's optimizer must have the same groups in the same order: ZeRO-1 all-reduces a
    gradient norm per group across a replica's stages, and different groups would hang the first
    step (a collective: every rank calls it)."""
    names = [g["name"] for g in groups]
    seen = {}
    for rank_stage, rank_names in gather_objects((stage, names)):
        seen.setdefault(rank_stage, rank_names)
    if len({tuple(v) for v in seen.values()}) > 1:
        listed = "; ".join(f"stage {k}: {', '.join(v)}" for k, v in sorted(seen.items()))
        raise ConfigError(f"the pipeline stages' optimizer groups differ ({listed}); every stage needs the same groups")


# -- what travels between stages ------------------------------------------------------------
Kind = Literal["end_to_end", "teacher_forced", "eval_student", "eval_teacher"]
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass(frozen=True)
class _Mode:
    """What the stages compute and pass on (the same on every rank)."""

    kind: Kind
    loss: LossConfig | None = None
    """The phase's loss weights (training kinds)."""
    use_teacher: bool = False
    wanted: tuple[int, ...] = ()
    """The distilled layers (their losses travel in ``layer_losses``)."""

    @property
    def carries_student(self) -> bool:
        return self.kind in ("end_to_end", "eval_student")

    @property
    def carries_teacher(self) -> bool:
        return self.use_teacher or self.kind in ("teacher_forced", "eval_teacher")

    def loss_names(self) -> list[str]:
        """The parts the last stage reports, in a fixed order (every stage must agree on it)."""
        if self.kind.startswith("eval"):
            return []
        return loss_part_names(self.loss, self.use_teacher, self.wanted) + [f"layer_{i}" for i in self.wanted]


def _training_mode(phase: Phase, num_layers: int, has_teacher: bool) -> _Mode:
    use_teacher, wanted = distill_targets(phase.loss, num_layers, has_teacher and phase.uses_teacher)
    return _Mode(phase.mode, phase.loss, use_teacher, wanted)


def _bits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.contiguous().view(_BITS[hidden.element_size()])


def _with_loss(losses: torch.Tensor, layer: int, value: torch.Tensor) -> torch.Tensor:
    """``losses`` with entry ``layer`` set to ``value``, out of place (the gradient flows to ``value``)."""
    out = losses.clone()
    out[layer] = value
    return out


# -- one stage's pieces ---------------------------------------------------------------------
def _materialize(model: nn.Module, paths: list[str], reader: WeightReader, device, *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Allocate the submodules at ``paths`` on ``device`` and fill each tensor from the checkpoint
    (a tied tensor from whichever of its names the checkpoint holds); names under ``skip`` are
    left to the caller."""
    aliases = _aliases(model)
    for path in paths:
        module = model.get_submodule(path)
        persistent = module.state_dict(keep_vars=True)
        # Buffers no checkpoint stores (Gemma's embedding scale) were computed at construction,
        # which kept buffers real (StageFactory.build): they move to the device as they are.
        transient = {n: b for n, b in module.named_buffers() if n not in persistent}
        lost = [n for n, b in transient.items() if b.is_meta]
        if lost:
            raise WeightsMismatchError(f"{path} holds buffers that no checkpoint stores ({lost}); a pipeline stage cannot rebuild them")
        module.to_empty(device=device)
        for name, buffer in transient.items():
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = buffer.to(device)
    _fill(model, paths, reader, aliases, skip=skip)
    # Tied tensors allocated in two owned modules (embedding and head on a one-stage pipeline) are one again.
    for names in {tuple(n) for n in aliases.values() if len(n) > 1}:
        real = [n for n in names if not model.get_parameter(n).is_meta]
        for name in real[1:]:
            module_path, _, attr = name.rpartition(".")
            model.get_submodule(module_path)._parameters[attr] = model.get_parameter(real[0])
    return aliases  # as laid out (allocating a tied tensor in one stage unties it from the meta copy)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state-dict name -> all the names of its tensor (tied weights have several)."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    return {name: names for names in names_of.values() for name in names}


def _fill(model: nn.Module, paths: list[str], reader: WeightReader, aliases: dict[str, list[str]] | None = None, *, skip: tuple[str, ...] = ()) -> None:
    """Copy every (allocated) tensor under ``paths`` from the checkpoint, in place."""
    aliases = aliases or _aliases(model)
    available = set(reader.keys())
    for path in paths:
        module = model.get_submodule(path)
        for rel, tensor in module.state_dict(keep_vars=True).items():
            name = f"{path}.{rel}"
            if name.startswith(skip):
                continue
            source = next((n for n in aliases[name] if n in available), None)
            if source is None:
                raise WeightsMismatchError(f"the teacher's checkpoint holds no tensor for {name}")
            value = reader.get(source)
            if tuple(value.shape) != tuple(tensor.shape):
                raise WeightsMismatchError(f"{source}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}")
            with torch.no_grad():
                tensor.copy_(value)


@dataclasses.dataclass
class _StagePieces:
    student: CaldStudentForCausalLM
    """The whole student laid out; only this stage's pieces are allocated (the rest is meta)."""
    teacher: nn.Module | None
    teacher_aliases: dict[str, list[str]]
    """Every teacher tensor name -> all its names as the model ties them (a waypoint may store either)."""
    owned: dict[str, nn.Module]
    """This stage's student pieces by their path in the student's backbone (the teacher's are at the same paths)."""


class StageFactory:
    """Builds one stage's pieces; DeepSpeed calls it (through ``LayerSpec``) only on that stage's ranks."""

    def __init__(
        self, cfg: RunConfig, source: TeacherSource, bounds: list[int], *, with_teacher: bool, share: bool, dtype: torch.dtype, device,
        outside_groups: bool = False,
    ):
        self.cfg, self.source, self.bounds = cfg, source, bounds
        self.with_teacher, self.share, self.dtype, self.device = with_teacher, share, dtype, device
        self.outside_groups = outside_groups
        """The optimizer has ``outside`` groups (``zero3.param_groups``): a stage with nothing outside its blocks gets a stand-in."""

    def __repr__(self) -> str:  # DeepSpeed prints the layer specs
        return f"StageFactory(bounds={self.bounds})"

    def build(self, k: int) -> _StagePieces:
        layers = range(self.bounds[k], self.bounds[k + 1])
        config = self.source.config
        # Parameters on the meta device, buffers real: those computed at construction and never
        # stored (rotary tables, Gemma's embedding scale) are then right as built.
        with init_empty_weights(include_buffers=False), no_init_weights():
            student = CaldStudentForCausalLM(student_config(config, self.cfg.student.conversion, self.source.name))
            teacher = AutoModelForCausalLM.from_config(config, dtype=self.dtype) if self.with_teacher else None
        student.backbone.tie_weights()  # no_init_weights also skips tying
        self.source.carry_generation_config(student)  # the teacher's end-of-turn tokens, exported
        lm, adapter = student.backbone, student.adapter
        pieces = [adapter.layers(lm)[i] for i in layers]
        if k == 0:
            table = adapter.position_embedding_attr  # absolute positions (GPT-2's wpe) join the embedding
            pieces[:0] = [lm.get_input_embeddings()] + ([adapter.base(lm).get_submodule(table)] if table else [])
        if k == len(self.bounds) - 2:
            pieces += [adapter.final_norm(lm), lm.get_output_embeddings()]
        path_of = {id(m): name for name, m in lm.named_modules()}
        paths = [path_of[id(m)] for m in pieces]
        weights = self.source.weights()
        if teacher is not None:
            teacher.tie_weights()
            teacher_aliases = _materialize(teacher, paths, RenamedReader(weights, teacher), self.device)
            rotary_in_float32(teacher, self.device)  # computed at construction, never stored
            teacher.eval().requires_grad_(False)
        mixers = student.mixers(layers)
        if self.share and teacher is not None:
            share_copied_weights(student, teacher)  # owned pieces get the teacher's tensors, the rest stays meta
            for mixer in mixers:
                mixer.to_empty(device=self.device)
        else:
            skip = tuple(p for i, p in enumerate(attention_prefixes(lm, adapter)) if i in layers and i not in set(student.config.attention_layers))
            _materialize(lm, paths, RenamedReader(weights, lm), self.device, skip=skip)
        for mixer, fresh in initial_mixers(student, weights, self.cfg.train.seed, layers):  # as the ZeRO-3 mode does, this stage only
            mixer.load_state_dict(fresh.state_dict())
        rotary_in_float32(lm, self.device)
        gc.collect()
        return _StagePieces(student=student, teacher=teacher, teacher_aliases=teacher_aliases if teacher is not None else {}, owned={p: lm.get_submodule(p) for p in paths})


# -- one stage's compute --------------------------------------------------------------------
class CaldStage(nn.Module):
    """Pipeline stage k: the student's pieces (trained, checkpointed) and the teacher's (frozen,
    outside the module tree), run block by block through ``LayerwiseModel`` as in ZeRO-3 mode."""

    def __init__(self, factory: StageFactory, index: int):
        super().__init__()
        built = factory.build(index)
        self.index = index
        self.layers = range(factory.bounds[index], factory.bounds[index + 1])
        self.is_first, self.is_last = index == 0, index == len(factory.bounds) - 2
        self.num_layers = factory.bounds[-1]
        self.stage_size = factory.cfg.train.stage_size
        # NOTE: module paths hold dots, which module names may not.
        self.owned = nn.ModuleDict({path.replace(".", "/"): module for path, module in built.owned.items()})
        self.paths, self.teacher_aliases = list(built.owned), built.teacher_aliases
        # NOTE: the whole (mostly meta) student is reached only through this LayerwiseModel, which
        # is no nn.Module: registering it would put every meta tensor into the stage.
        chunk = factory.cfg.loss.head_chunk_tokens
        self.student = LayerwiseModel(built.student, activation_checkpointing=factory.cfg.student.activation_checkpointing, head_chunk_tokens=chunk)
        # A LayerwiseModel is no nn.Module: the teacher is in no optimizer, state dict or checkpoint.
        self.teacher = LayerwiseModel(built.teacher, head_chunk_tokens=chunk) if built.teacher is not None else None
        self.teacher_dtype = factory.dtype
        self.mode = _Mode("eval_student")
        self.poisoned: frozenset[int] = frozenset()
        self._masked: list[bool] = []  # this step's micro-batches (last stage): was the loss masked
        self._micro_batches = 0
        self.replica_group = None
        """The last stages of every replica (set once the engine exists, with 2 or more replicas)."""
        self._parts: OrderedDict[str, torch.Tensor] = OrderedDict()
        # NOTE: ZeRO-1 all-reduces one gradient norm per optimizer group across a replica's stages,
        # so every stage needs the same groups: a middle stage, with no embedding or head, gets a
        # one-element stand-in for the "outside" group (never used, no gradient, never exported).
        if factory.outside_groups and not (self.is_first or self.is_last):
            self.outside_stand_in = nn.Parameter(torch.zeros(1, dtype=factory.dtype, device=factory.device))

    @property
    def student_model(self) -> CaldStudentForCausalLM:
        return self.student.model

    def train(self, mode: bool = True) -> "CaldStage":
        """The engine's train()/eval() reaches every student module the stage runs, also those
        outside its owned pieces (the base model's embedding dropout, GPT-NeoX's emb_dropout):
        evaluation has no dropout. The teacher stays in eval mode."""
        super().train(mode)
        self.student.model.train(mode)
        return self

    # -- what trains --------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList(self.student.blocks[i] for i in self.layers)

    def mixer_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.student_model.mixers(self.layers) for p in m.parameters()]

    def named_student_tensors(self, *, keep_vars: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's student tensors under their names in the student's HF state dict."""
        for path, module in self.owned.items():
            for rel, tensor in module.state_dict(keep_vars=keep_vars).items():
                yield f"backbone.{path.replace('/', '.')}.{rel}", tensor

    def load_teacher(self, folder: str | Path) -> None:
        """Swap this stage's teacher pieces for those of another checkpoint of the same teacher
        (a waypoint), read tensor by tensor: no rank reads more than its own stage."""
        teacher = self.teacher.model
        _fill(teacher, self.paths, RenamedReader(open_weights(folder), teacher), self.teacher_aliases)

    def release_teacher(self) -> tuple[int, int]:
        """Drop the teacher's pieces; returns (bytes freed, teacher-only tensors still alive
        after: 0 when nothing leaks), as ``ManagedTeacher.release`` counts them in ZeRO-3 mode.
        The tensors the student shares stay and count in neither; a tied one counts once."""
        if self.teacher is None:
            return 0, 0
        mine = {id(p) for p in self.parameters()}
        own = {id(t): t for t in self.teacher.model.state_dict(keep_vars=True).values() if not t.is_meta and id(t) not in mine}
        freed = sum(t.numel() * t.element_size() for t in own.values())
        refs = [weakref.ref(t) for t in own.values()]
        del own
        self.teacher = None
        gc.collect()
        return freed, sum(ref() is not None for ref in refs)

    def begin_batch(self, micro_batches: int, poisoned: set[int]) -> None:
        """Before ``train_batch`` of ``micro_batches``: those (0-based) whose loss is made NaN
        (fault-injection tests)."""
        self.poisoned, self._micro_batches, self._masked = frozenset(poisoned), micro_batches, []

    def masked_micro_batches(self, device: torch.device) -> torch.Tensor:
        """After ``train_batch``: 1 for each of this step's micro-batches whose loss was masked
        (the last stage's view; zeros elsewhere, to be summed over the ranks)."""
        if self.is_last:
            return torch.tensor(self._masked, dtype=torch.float32, device=device)
        return torch.zeros(self._micro_batches, device=device)

    def _every_micro_batch_masked(self, device: torch.device) -> bool:
        """At the step's last micro-batch: was every loss of the step, on every replica, masked."""
        local = all(self._masked)
        if self.replica_group is None:
            return local
        import torch.distributed as dist

        # NOTE: every replica's last stage comes here once a step, at the same point of the schedule.
        agreed = torch.tensor(float(local), device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.replica_group)
        return bool(agreed)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x):
        mode = self.mode
        if self.is_first:
            ids = x
            s_h = t_h = losses = None
            if mode.carries_student:
                s_h = self.student.embed(ids)
            if mode.carries_teacher:
                with torch.no_grad():
                    t_h = self.teacher.embed(ids)
            if mode.wanted:
                # NOTE: a leaf that requires grad, so the engine can back-propagate it even when
                # this stage distils no layer.
                losses = torch.zeros(self.num_layers, dtype=torch.float32, device=ids.device, requires_grad=True)
        else:
            s_h, losses, t_h, ids = self._unpack(x)
        if mode.kind.startswith("eval"):
            return self._evaluate(s_h if mode.kind == "eval_student" else t_h, ids)
        s_h, losses, t_h = self._distill(s_h, losses, t_h, ids)
        if self.is_last:
            return self._loss(s_h, losses, t_h, ids)
        for t in (s_h, losses):
            if t is not None and not t.requires_grad:
                t.requires_grad_()  # every float the engine passes must carry a gradient back
        return tuple(t for t in (s_h, losses, _bits(t_h) if t_h is not None else None, ids) if t is not None)

    def _unpack(self, x: tuple) -> tuple:
        mode, items = self.mode, list(x)
        s_h = items.pop(0) if mode.carries_student else None
        losses = items.pop(0) if mode.wanted else None
        t_h = items.pop(0).view(self.teacher_dtype) if mode.carries_teacher else None
        (ids,) = items
        return s_h, losses, t_h, ids

    def _student_dtype(self) -> torch.dtype:
        return next(self.owned.parameters()).dtype

    def _distill(self, s_h, losses, t_h, ids):
        """This stage's blocks: teacher sub-stage, then the student's, each distilled layer's loss into ``losses``."""
        mode = self.mode
        forced = mode.kind == "teacher_forced"
        dtype = self._student_dtype()
        s_ctx = self.student.context(t_h.to(dtype) if forced else s_h, ids)
        t_ctx = None
        if t_h is not None:
            t_ctx = s_ctx if self.teacher_dtype == dtype else self.teacher.context(t_h, ids)
        wanted = set(mode.wanted)
        a = self.layers.start
        for sub in (range(a + r.start, a + r.stop) for r in make_stages(len(self.layers), self.stage_size)):
            t_in, t_outs = t_h, []
            if t_h is not None:
                with torch.no_grad():
                    for i, out in zip(sub, self.teacher.blocks_iter(t_h, t_ctx, sub)):
                        t_outs.append(out if forced or i in wanted or i == sub[-1] else None)
            for j, i in enumerate(sub):
                # Teacher-forced: every block starts from the teacher's input to it (as
                # teacher_forced_step), so no backward crosses blocks whatever the sub-stages.
                if forced:
                    s_h = t_in if j == 0 else t_outs[j - 1]
                s_h = self.student.block(i, s_h, s_ctx)
                if i in wanted:
                    losses = _with_loss(losses, i, layer_loss(s_h, t_outs[j]))
            if t_outs:
                t_h = t_outs[-1]
            del t_outs  # NOTE: this sub-stage's teacher activations go before the next runs
        return (None if forced else s_h), losses, t_h

    def _loss(self, s_h, losses, t_h, ids) -> torch.Tensor:
        """The last stage: CE (and KL) and the phase-weighted total; the parts are kept for reporting."""
        mode = self.mode
        cfg = mode.loss
        terms = [losses[i] for i in mode.wanted]
        ce = kl = None
        if mode.kind == "end_to_end":
            # The ZeRO-3 mode's head losses; a frozen head here is whole, read a slice of rows at a time.
            head = self.student.head_weight
            self.student.head_pieces = whole_row_pieces(head) if head is not None and not head.requires_grad else None
            teacher = self.teacher if mode.use_teacher else None
            ce, kl = self.student.head_losses(s_h, {"input_ids": ids}, cfg, teacher=teacher, teacher_h=t_h if teacher is not None else None)
        parts = combine_loss_parts(cfg, ce, terms, kl, ids.device)
        total = parts.total
        if len(self._masked) in self.poisoned:  # a NaN loss over finite activations
            total = total + torch.full_like(total, float("nan"))
        finite = torch.isfinite(total)
        values = {**parts.terms, **{f"layer_{i}": t for i, t in zip(mode.wanted, terms)}}
        zero = total.new_zeros(())
        self._parts = OrderedDict((n, values[n].detach().float() if finite else zero) for n in mode.loss_names())
        self._masked.append(not bool(finite))
        # NOTE: a micro-batch cannot be dropped from a pipeline schedule: a non-finite loss is
        # masked so it adds no gradient. Non-finite activations still give non-finite gradients,
        # and then ZeRO's overflow check skips the whole optimizer step.
        if len(self._masked) == self._micro_batches and self._every_micro_batch_masked(total.device):
            # Nothing of the step is left to learn from: a deliberately non-finite gradient makes
            # that same overflow check skip the step on every stage and replica, where zero
            # gradients would still move the weights (AdamW's momentum and weight decay).
            return total * float("nan")
        return torch.where(finite, total, zero)

    def _evaluate(self, hidden: torch.Tensor, ids: torch.Tensor):
        """Held-out scoring of one model: blocks, then (last stage) the summed next-token NLL."""
        model = self.student if self.mode.kind == "eval_student" else self.teacher
        ctx = model.context(hidden, ids)
        for i in self.layers:
            hidden = model.block(i, hidden, ctx)
        if not self.is_last:
            return (hidden, ids) if self.mode.kind == "eval_student" else (_bits(hidden), ids)
        # Summed in float64 from the logits a chunk at a time, as eval.perplexity does.
        return next_token_nll(hidden, ids, model.head, chunk_tokens=model.chunk_tokens).double().sum()


class CaldPipeline(PipelineModule):
    """The PipelineModule of stage-aligned teacher + student blocks: one layer per stage."""

    @property
    def stage(self) -> CaldStage:
        return self.forward_funcs[0]

    def mixer_parameters(self) -> list[nn.Parameter]:
        return self.stage.mixer_parameters()

    def get_additional_losses(self):
        """The loss parts of the current micro-batch (the last stage's; zeros elsewhere, same names)."""
        stage = self.stage
        names = stage.mode.loss_names()
        if not names:
            return None
        if stage.is_last:
            return OrderedDict(stage._parts)
        return OrderedDict((n, torch.zeros(())) for n in names)


# -- the engine and the run ----------------------------------------------------------------
@dataclasses.dataclass
class PipelineModels:
    """The pipeline engine and what train() needs of it (the ZeRO-3 mode's ``DistillationModels``)."""

    student_engine: object
    """DeepSpeed's PipelineEngine."""
    module: CaldPipeline
    bounds: list[int]
    checkpoint_excludes_frozen: bool
    """The student's frozen copied weights never change: checkpoints leave them out (they are rebuilt)."""

    @property
    def stage(self) -> CaldStage:
        return self.module.stage

    def checkpoint_owner(self, relative: str) -> int | None:
        """The rank that wrote a checkpoint file: DeepSpeed names the pipeline's files by stage
        (``layer_SS-``, ``mp_rank_SS_``; one layer per stage here) and data-parallel rank
        (``zero_pp_rank_D_``); None for the rest (the default rule)."""
        if (state := parse_state_file(Path(relative).name)) is not None:
            return self.module.topology().get_rank(pipe=state.model_rank, data=state.data_rank or 0)
        return None

    @property
    def student_model(self) -> CaldStudentForCausalLM:
        """The student's HF model (this stage's pieces allocated, the rest meta): config and layout."""
        return self.stage.student_model

    @property
    def data_parallel_rank(self) -> int:
        return self.student_engine.grid.data_parallel_id

    @property
    def data_parallel_size(self) -> int:
        return self.student_engine.grid.data_parallel_size

    def set_mode(self, mode: _Mode) -> None:
        if mode != self.stage.mode:
            self.stage.mode = mode
            # NOTE: what travels changed; the engine reuses its receive buffers by position
            # whatever their dtype, so they must be dropped.
            self.student_engine.reset_activation_shape()

    def apply_phase(self, phase: Phase, base_trainable: str) -> None:
        """``train.apply_phase`` for the pipeline: what trains, and what the stages compute and pass."""
        if base_trainable == "all":
            set_trainable(self.module, copied=phase.trainable == "all", only_blocks=self.stage.blocks() if phase.mode == "teacher_forced" else None)
        self.set_mode(_training_mode(phase, self.bounds[-1], self.stage.teacher is not None))

    def perplexity(self, which: Literal["student", "teacher"], datasets: dict, indices: dict, micro_batch_size: int) -> dict:
        """Held-out perplexity of each dataset through the pipeline (``eval.perplexity``'s result)."""
        previous = self.stage.mode
        self.set_mode(_Mode(f"eval_{which}"))
        try:
            return {name: self._perplexity(ds, indices[name], micro_batch_size) for name, ds in datasets.items()}
        finally:
            self.set_mode(previous)

    def _perplexity(self, dataset, indices: list[int], micro_batch_size: int) -> dict:
        import torch.distributed as dist

        engine = self.student_engine
        # NOTE: no padding here: replicas are independent pipelines (no collective per forward), so
        # each runs only its real rows, as many micro-batches as it has.
        rows = [i for i in indices if i != PAD]
        fewest = torch.tensor(len(rows), device=engine.device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)  # every rank refuses, or none: eval_batch starts with a barrier
        if not int(fewest):
            raise ValueError(f"eval.max_sequences is fewer than the {self.data_parallel_size} pipeline replicas: each needs a held-out sequence")
        batches = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]

        def data():
            for batch in batches:
                ids = torch.stack([dataset[i]["input_ids"] for i in batch]).to(engine.device)
                yield ids, ids

        # The NLL sum of each micro-batch (last stage), added up here and over the replicas.
        out = engine.eval_batch(data(), compute_loss=True, reduce_output=None, bcast_loss=False, num_micro_batches=len(batches))
        nll = torch.zeros((), dtype=torch.float64, device=engine.device)
        if engine.is_last_stage():
            nll = torch.stack(out).double().sum()
            if self.data_parallel_size > 1:
                dist.all_reduce(nll, group=engine.grid.get_data_parallel_group())
        dist.broadcast(nll, src=engine.grid.stage_to_global(engine.num_stages - 1), group=engine.grid.get_pipe_parallel_group())
        # Packed sequences all have the same length: every one predicts len - 1 tokens.
        scored = torch.tensor(len(rows), device=engine.device)
        if self.data_parallel_size > 1:
            dist.all_reduce(scored, group=engine.grid.get_data_parallel_group())
        return perplexity_result(nll.item(), int(scored) * (len(dataset[rows[0]]["input_ids"]) - 1))

    def export(self, tokenizer, target: Path, *, is_main: bool) -> Path:
        """The student as a HF folder: every stage writes its own safetensors shard; rank 0 adds
        the index, the config and the tokenizer. No rank holds the whole student."""
        from safetensors.torch import save_file

        target = Path(target)
        engine, stage = self.student_engine, self.stage
        shards = target.parent / f".{target.name}.shards"
        if is_main:
            shutil.rmtree(shards, ignore_errors=True)
            shards.mkdir(parents=True)
        barrier()
        written: OSError | None = None
        if self.data_parallel_rank == 0:
            student = stage.student_model
            head = next(f"{n}.weight" for n, m in student.named_modules() if m is student.get_output_embeddings())
            tensors = {
                name: t.detach().to("cpu").contiguous().clone()
                for name, t in stage.named_student_tensors()
                if not (student.config.tie_word_embeddings and name == head)  # a tied head is the embedding
            }
            try:
                save_file(tensors, str(shards / f"model-{stage.index + 1:05d}-of-{engine.num_stages:05d}.safetensors"), metadata={"format": "pt"})
            except OSError as err:  # e.g. another node, where rank 0's shard folder does not exist
                written = err
        # NOTE: a stage that could not write fails every rank, not itself alone (the others would
        # wait for it in the next collective until the process group's timeout).
        if not all_true(written is None, engine.device):
            raise RuntimeError(
                f"a stage could not write its shard of the export into {shards}"
                + (f" ({written})" if written else "") + ": output.run_dir must be on storage every node shares"
            )
        on_main(lambda: self._assemble(target, shards, tokenizer))
        return target

    def _assemble(self, target: Path, shards: Path, tokenizer) -> None:
        """Rank 0: the stages' shards, an index, the config and the tokenizer into ``target``."""
        engine, stage = self.student_engine, self.stage
        with atomic_dir(target, replace=True) as tmp:
            weight_map, total = {}, 0
            for shard in sorted(shards.glob("*.safetensors")):
                os.replace(shard, tmp / shard.name)
                weight_map.update(dict.fromkeys(SafetensorsReader([tmp / shard.name]).keys(), shard.name))
                total += (tmp / shard.name).stat().st_size
            shards_written = len(list(tmp.glob("*.safetensors")))
            if shards_written != engine.num_stages:  # every stage's shard, or no export (a folder every rank shares)
                raise RuntimeError(
                    f"the export found {shards_written} of {engine.num_stages} stage shards in {shards}: output.run_dir must be on storage every node shares"
                )
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            config = stage.student_model.config
            config.architectures = [type(stage.student_model).__name__]  # as save_pretrained writes it in ZeRO-3 mode
            config.save_pretrained(tmp)
            if stage.student_model.can_generate():
                stage.student_model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(shards, ignore_errors=True)


class PipelineGuide:
    """Guidance in pipeline mode: the teacher lives in the stages; each stage swaps in its own
    pieces of the waypoint a step needs, and releases them once no later step needs a teacher
    (the hybrid switch). Same surface as ``distill.guidance.Guide``."""

    def __init__(self, plan: PhasePlan, models: PipelineModels, *, base_weights: str):
        self.plan, self.models = plan, models
        self.base_weights = self.loaded = base_weights
        self.release_stats: dict | None = None

    def enter(self, step: int) -> None:
        if self.plan.at(step).uses_teacher:
            self._load(self.plan.teacher_weights_at(step, self.base_weights))
        if self.models.stage.teacher is not None and not self.plan.teacher_needed_from(step):
            rss_before = current_rss_bytes()
            freed, alive = self.models.stage.release_teacher()
            return_free_memory()
            self.release_stats = {"step": step, "freed_partition_bytes": freed, "teacher_params_alive": alive, "rss_before": rss_before, "rss_after": current_rss_bytes()}
            logger.info("teacher released before step %d: %.1f MB freed on this stage", step + 1, freed / 1e6)

    def _load(self, folder: str) -> None:
        if folder != self.loaded:
            self.models.stage.load_teacher(folder)
            self.loaded = folder
            logger.info("teacher weights now from %s", folder)

    def state(self) -> dict:
        return {"teacher_saved": False}

    def save(self, tag_dir: Path) -> None:
        pass

    def restore(self, tag_dir: Path, client_state: dict) -> None:
        pass


def build_pipeline(
    cfg: RunConfig, ds_config: dict, source: TeacherSource, plan: PhasePlan, *, outside_groups: bool = True, first_step: int = 0,
) -> PipelineModels:
    """The PipelineModule of ``train.pipeline_stages`` stages in its PipelineEngine (ZeRO-1);
    the stages hold teacher pieces when a step from ``first_step`` on needs them."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    config = source.config
    _check_supported(cfg, plan, tied=bool(getattr(config, "tie_word_embeddings", False)))
    num_stages = cfg.train.pipeline_stages
    bounds = stage_bounds(config.num_hidden_layers, num_stages, ds_config["pipeline"].get("partition", "uniform"))
    _check_every_stage_converts(cfg, config, bounds)
    frozen_copies = checkpoint_excludes_frozen(cfg, plan)  # only the mixers train
    # NOTE: the engine's precision decides, as ZeRO-3's engines do (train.with_compute_dtype
    # refuses a teacher.dtype that differs): both models' stages are built in it.
    dtype = compute_dtype(ds_config)
    factory = StageFactory(
        cfg, source, bounds, with_teacher=plan.teacher_needed_from(first_step), share=shares_teacher_weights(cfg, plan),
        dtype=dtype, device=torch.device(get_accelerator().current_device_name()), outside_groups=outside_groups and not frozen_copies,
    )
    # NOTE: dynamic_shape: the evaluation's last micro-batch may be short, and what travels changes with the phase.
    module = CaldPipeline([LayerSpec(CaldStage, factory, k) for k in range(num_stages)], num_stages=num_stages, partition_method="uniform", dynamic_shape=True)
    if frozen_copies:
        set_trainable(module, copied=False)
    sized = size_zero_buffers(ds_config, block_numel(module, module.stage.blocks()))
    groups = param_groups(module, cfg.train.lr, cfg.train.copied_lr_scale, cfg.train.weight_decay, blocks=module.stage.blocks() if outside_groups else None)
    _check_same_groups(groups, module.stage.index)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, config=sized)
    rotary_in_float32(engine.module)  # DeepSpeed 0.19.0-0.19.1 cast a bf16 engine's buffers too
    if engine.grid.data_parallel_size > 1:
        module.stage.replica_group = engine.grid.get_data_parallel_group()
    logger.info("pipeline of %d stages x %d replicas: blocks %s", num_stages, engine.grid.data_parallel_size, [f"[{a}, {b})" for a, b in zip(bounds, bounds[1:])])
    return PipelineModels(student_engine=engine, module=module, bounds=bounds, checkpoint_excludes_frozen=frozen_copies)


def pipeline_train_step(models: PipelineModels, guide: PipelineGuide, phase: Phase, step: int, next_batch, state, cfg: RunConfig, *, tokens_per_micro: int) -> dict:
    """``train.train_step`` in pipeline mode: one ``engine.train_batch`` over grad_accum micro-batches.

    Unlike ZeRO-3 mode, a non-finite micro-batch cannot be replaced by another: its loss is
    masked (no gradient) and the step runs on the rest; if its gradients are non-finite all
    the same, DeepSpeed skips the whole step (logged), as it does when every micro-batch of the
    step, on every replica, was masked (``CaldStage._loss``).
    """
    import torch.distributed as dist

    engine = models.student_engine
    guide.enter(step)
    set_phase_lr(engine, phase, step)
    accum = cfg.train.grad_accum
    start = state.cursor
    models.stage.begin_batch(accum, {j for j in range(accum) if cfg.debug.poisons(start + j, engine.global_rank)})

    def micro_batches():  # pulled only by the first stage (inputs) and the last (labels)
        for j in range(accum):
            ids = next_batch(start + j)["input_ids"]
            yield ids, ids

    loss = float(engine.train_batch(micro_batches()))
    state.cursor += accum
    parts = {name: float(value) for name, value in (engine.agg_additional_losses or {}).items()}
    # How many replicas masked each micro-batch of the step, on every rank.
    masked = models.stage.masked_micro_batches(engine.device)
    dist.all_reduce(masked)
    masked = [int(round(float(m))) for m in masked]
    micro_total = accum * models.data_parallel_size
    bad = sum(masked)
    good = micro_total - bad
    # The engine averaged the masked micro-batches in as zeros: the mean of the others is scaled
    # back up (NaN when none was finite: no loss to report).
    scale = micro_total / good if good else float("nan")
    state.tokens_seen += tokens_per_micro * accum * good // micro_total
    if bad:
        hit = sum(1 for m in masked if m)
        logger.warning(
            "non-finite loss in %d of %d micro-batches at step %d (%d of its %d micro-steps): masked (%d micro-steps in all)",
            bad, micro_total, step + 1, hit, accum, state.nan_skipped + hit,
        )
    # The streak and the count are in ZeRO-3 mode's unit, the micro-step over all replicas:
    # one with a non-finite loss on any replica counts once, as ZeRO-3 mode skips it on every rank.
    for m in masked:
        if m:
            state.nonfinite(step=step + 1)
        else:
            state.finite()
    if not engine.was_step_applied():
        why = "every micro-batch was non-finite" if not good else "non-finite gradients"
        logger.warning("step %d: the optimizer step was skipped (%s)", step + 1, why)
    wanted = models.stage.mode.wanted
    per_layer = [parts.pop(f"layer_{i}") * scale for i in wanted]
    record = {"loss": loss * scale, **{name: value * scale for name, value in parts.items()}}
    if per_layer:
        record["layer_losses"] = per_layer
    return record
