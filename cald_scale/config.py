"""The run config: one dataclass composing every component's config.

The dataclass defaults ARE the embedded default job (SmolLM2-135M -> its 25% attention
hybrid, Mamba2 in 22 of 30 layers, on the Brown corpus; sized to finish in minutes on 2 CPU
cores). Recipes (YAML) and ``key.path=value`` overrides change it; unknown keys are errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import yaml

from .config_loader import INFINITE_OK, ConfigError, ConfigLoader, apply_overrides, from_dict, to_dict
from .conversion.modeling import ConversionConfig
from .conversion.teacher import BUILTIN_TEACHERS, TeacherConfig
from .data.classification import ClassificationDataConfig
from .data.config import DataConfig
from .fileio import absolute_if_local
from .tasks.spec import task_spec
from .distill.losses import LossConfig
from .distill.phases import PhaseConfig, PhasePlan, plan_phases

__all__ = ["RunConfig", "StudentConfig", "TrainConfig", "EvalConfig", "OutputConfig", "DebugConfig", "PhaseConfig", "load_run_config", "default_phases", "config_differences", "LEGACY_DEFAULTS", "with_legacy_defaults", "without_legacy_defaults", "RENAMED_KEYS", "RESULT_NEUTRAL_KEYS", "without_result_neutral", "flat_keys"]


@dataclasses.dataclass(kw_only=True)
class StudentConfig:
    """The student: how it is converted and which of its weights train."""

    conversion: ConversionConfig = dataclasses.field(default_factory=ConversionConfig)
    """Mixer choice and geometry, attention-informed init."""
    trainable: Literal["all", "mixers"] = "mixers"
    """Train only the new mixers (copied weights frozen: the default; on the all-Mamba2
    Shakespeare recipe it matched training everything, 74.2 vs 74.4 held-out ppl, in less time
    and with the frozen weights stored once; benchmarks/results/recovery.md), or every weight."""
    share_frozen_weights: bool = True
    """With trainable=mixers, the student uses the teacher's own tensors for its frozen copied
    weights (one copy in memory, not two)."""
    activation_checkpointing: bool = False
    """Recompute student blocks in backward instead of keeping their activations."""
    init_from: str | None = None
    """Where the student's copied weights (and its attention-informed mixer init) come from:
    a model of the teacher's family and geometry (a built-in name, local HF folder or hub id;
    for classification a pretrained encoder, which gets the seeded new head). null: the
    teacher itself. The paper's encoder runs convert the *pretrained* encoder while a
    fine-tuned teacher guides it (target, waypoint, hybrid): set this to the pretrained one."""

    def __post_init__(self):
        if self.init_from:
            self.init_from = absolute_if_local(self.init_from, names=BUILTIN_TEACHERS)


def _is_signal_name(name) -> bool:
    import signal

    return isinstance(getattr(signal, str(name), None), signal.Signals)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and schedule (filled into the DeepSpeed config's "auto" fields)."""

    global_batch_size: int | None = 4
    """Sequences per optimizer step over all ranks; the micro-batch per rank is derived from
    it (global / (ranks x grad_accum)), so the same job does the same work on any number of
    ranks. Set it to null to give micro_batch_size instead."""
    micro_batch_size: int | None = None
    """Sequences per rank per micro-step (when given, global_batch_size must agree or be null)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int | None = 50
    """Optimizer steps of the whole run, shared out among the phases (null: the sum of the phases' own lengths)."""
    lr: float = 1e-3
    """Peak learning rate of the mixers, for phases that set none (on the one-phase end-to-end job
    1e-3 beat 3e-3 under ZeRO-3: ppl 201 vs 324)."""
    copied_lr_scale: float = 0.1
    """LR multiplier of the weights copied from the teacher (they start trained)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 5
    """Linear warmup steps at the start of each phase (clamped to half of a shorter phase)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay of the trained weights."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's moment decay rates (beta1, beta2)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    stage_size: int = 1
    """Blocks per aligned teacher/student stage (teacher activations alive at once)."""
    schedule: Literal["streamed", "naive"] = "streamed"
    """How end-to-end phases run: streamed, stage by stage (default); naive, the whole
    teacher first (the reference). Teacher-forced phases are a phase mode (phases[].mode)."""
    zero3_leaves: Literal["blocks", "frozen", "none"] = "blocks"
    """ZeRO-3: which modules DeepSpeed gathers and releases in one hook pair instead of one per
    submodule (each hook pair also wraps the module's outputs in autograd functions). blocks
    (default): every decoder block, trainable or not; a trainable block whose input needs no
    grad (block 0 behind a frozen embedding, any block in a teacher-forced phase) gets an input
    that does, since DeepSpeed reduces a leaf's gradients in its full backward hook, which
    PyTorch fires only after an input's gradient. frozen: only the parts of a block that never
    train (the frozen teacher's blocks, a student's copied MLP). A trajectory teacher (it trains)
    gets the same mode as the student. none: a hook pair on every submodule. frozen and none
    train bit for bit alike; blocks to the same values up to the order of float sums. The hooks
    were most of the distillation step's host time on a GPU (benchmarks/train_speed.py
    --compare-leaves; --narrow measures that host work on a CPU)."""
    seed: int = 0
    """Seeds the new mixers' initialisation, the batch order and dropout (the held-out split has data.seed)."""
    malloc_mmap_threshold: int | None = 16 << 20
    """glibc: allocations of at least this many bytes are mmap-ed and returned to the OS when
    freed; null keeps glibc's adaptive default. 16 MB (the default) keeps activations of a
    few MB on the fast heap: on the default job of 2026-11-30 (all-Mamba2 on Shakespeare, 1
    rank) a teacher-forced step took 10.7 s and an end-to-end one 14.6 s at 7.15 GB peak,
    against 17.0 s / 18.8 s at 5.90 GB with 1 MB. Use 1 MB (1048576) when host memory, not time, is what limits a large model
    (benchmarks/scale_memory.py measures with it). Ignored when jemalloc/tcmalloc is
    preloaded (see cald_scale/engines/host_memory.py)."""
    trim_heap_every: int = 0
    """glibc: give free heap pages back to the OS (malloc_trim) every N optimizer steps; 0:
    only when a teacher is released. Per step it cost 0.7-0.9 s of a 7.6 s distillation step
    (the next step faults the pages back in) for the same peak memory (3.58 vs 3.59 GB,
    benchmarks/train_speed.py); it lowers only the resident memory between steps."""
    max_consecutive_nan: int = 3
    """Stop with an error after this many non-finite losses in a row (each is skipped and counted)."""
    pipeline_stages: int = 0
    """Pipeline mode (engines/pipeline.py, with ds_configs/pipeline.json): a DeepSpeed
    PipelineModule of this many stages, stage k holding teacher and student blocks
    [a_k, b_k); data parallel across the world_size / pipeline_stages replicas, ZeRO-1.
    0: the ZeRO-3 mode (every rank holds a partition of every block)."""
    preemption_signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")
    """Signals that stop the run at the next step boundary with a complete checkpoint and exit
    code 75 (SLURM's warning signal and SIGTERM; launch/slurm/ requeues on that code)."""

    def __post_init__(self):
        for name in self.preemption_signals:
            if not _is_signal_name(name):
                raise ValueError(f"train.preemption_signals: {name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)")
            if name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"train.preemption_signals: {name} cannot be caught, so no run can act on it (e.g. SIGUSR1, SIGTERM)")
        if self.pipeline_stages < 0:
            raise ValueError(f"train.pipeline_stages must be >= 0 (0: ZeRO-3 mode), got {self.pipeline_stages}")
        if self.trim_heap_every < 0:
            raise ValueError(f"train.trim_heap_every must be >= 0, got {self.trim_heap_every}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.global_batch_size is None and self.micro_batch_size is None:
            raise ValueError("set train.global_batch_size or train.micro_batch_size")
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("grad_accum", "stage_size", "max_consecutive_nan"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.copied_lr_scale < 0:
            raise ValueError(f"train.copied_lr_scale must be >= 0 (0 freezes the copied weights), got {self.copied_lr_scale}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"train.betas must each be in [0, 1) (AdamW's decay rates), got {list(self.betas)}")

    def data_parallel_size(self, world_size: int) -> int:
        """Model replicas on ``world_size`` ranks: every rank in ZeRO-3 mode, one per pipeline otherwise."""
        if not self.pipeline_stages:
            return world_size
        if world_size % self.pipeline_stages:
            raise ValueError(f"train.pipeline_stages={self.pipeline_stages} does not divide the {world_size} ranks")
        return world_size // self.pipeline_stages

    def micro_batch(self, world_size: int) -> int:
        """Sequences per rank per micro-step on ``world_size`` ranks."""
        if self.global_batch_size is None:
            return self.micro_batch_size
        per_micro_step = world_size * self.grad_accum
        if self.micro_batch_size is not None:
            if self.micro_batch_size * per_micro_step != self.global_batch_size:
                raise ValueError(
                    f"train.micro_batch_size={self.micro_batch_size} x {world_size} ranks x grad_accum={self.grad_accum} "
                    f"!= train.global_batch_size={self.global_batch_size}; set one of them to null"
                )
            return self.micro_batch_size
        if self.global_batch_size % per_micro_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} does not split over {world_size} ranks x "
                f"grad_accum={self.grad_accum}; choose a multiple of {per_micro_step}"
            )
        return self.global_batch_size // per_micro_step


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """Held-out perplexity."""

    max_sequences: int = 32
    """Held-out sequences scored (teacher, student before and after training): the same ones,
    and the same score, on any number of ranks (shards padded to equal length with forwards
    that count for nothing; before 2026-12-05 a world size that did not divide this scored
    fewer, and more ranks than sequences was an error)."""
    every: int = 0
    """Also evaluate the student every N steps (0: only before and after)."""
    micro_batch_size: int = 4
    """Held-out sequences per forward while scoring (memory, not the score)."""
    other_corpora: list[str] = dataclasses.field(default_factory=lambda: ["wiki"])
    """Held-out sets from other domains that the run never trains on (any value data.corpus
    accepts), scored like the corpus's own held-out split: the default trains on the Brown
    corpus and is also scored on Wikipedia leads. Kept as written (unlike data.corpus): each
    names its scores in the metrics, the baseline and the report."""

    def __post_init__(self):
        if self.max_sequences < 1 or self.micro_batch_size < 1:
            raise ValueError("eval.max_sequences and eval.micro_batch_size must be >= 1")
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0 (0: only before and after training), got {self.every}")


@dataclasses.dataclass(kw_only=True)
class OutputConfig:
    """Run folder, checkpoints and logging."""

    run_dir: str = "runs/default"
    """Everything of the run lives here; rerunning the same command resumes from it."""
    lock_wait_s: float = dataclasses.field(default=120.0, metadata=INFINITE_OK)
    """One job at a time in run_dir (rank 0 holds run_dir/.lock until its process ends): a
    job started while another still runs there (e.g. its ranks still saving a preemption
    checkpoint after the launcher returned) waits this long for it, then stops (.inf: waits on)."""
    save_every: int = 25
    """Checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted only after a newer one is complete)."""
    log_every: int = 1
    """Write the training metrics (metrics.jsonl, wandb) every N steps."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline needs no account (sync later with `wandb sync`)."""
    wandb_project: str = "cald_scale"
    """The wandb project the run logs to."""
    progress_bar: bool = True
    """A progress bar with loss and tokens/s on rank 0 (off: log lines only, e.g. in batch logs)."""
    export_teacher_every: int = 0
    """In trajectory-guided phases, save the teacher as a HF folder every N steps under
    run_dir/teacher_waypoints/ (0: never): the teacher's checkpoints along its own
    fine-tuning, i.e. the waypoints of a waypoint-guided run."""
    export_student_every: int = 0
    """Also save the student as a HF folder every N steps under run_dir/student_waypoints/
    (0: never). In a "Std." run (student.conversion.mixer=none) these are the fine-tuning
    teacher's checkpoints: the waypoints of a waypoint-guided run."""
    export_bamba: bool = False
    """Also export the trained student as a native transformers Bamba folder (run_dir/bamba/,
    loads without cald_scale). Checked before training: a layout Bamba cannot express
    (gpt_neox, Mamba-1 mixers, a mixer width no multiple of hidden_size) stops the run at once."""

    def __post_init__(self):
        if not str(self.run_dir).strip():  # an unset "$RUN": the run would fill the working directory
            raise ValueError(f"output.run_dir must be a non-empty path, got {self.run_dir!r}")
        self.run_dir = os.path.expanduser(self.run_dir)  # "~/runs/x": one folder for every file of the run
        if self.save_every < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ValueError("output.save_every, output.keep_last and output.log_every must be >= 1")
        if self.export_teacher_every < 0 or self.export_student_every < 0:
            raise ValueError("output.export_teacher_every and output.export_student_every must be >= 0 (0: never)")
        if self.lock_wait_s < 0:
            raise ValueError(f"output.lock_wait_s must be >= 0, got {self.lock_wait_s}")


@dataclasses.dataclass(kw_only=True)
class DebugConfig:
    """Fault injection for tests of the failure paths (never set in real runs)."""

    nan_at_micro_steps: list[int] = dataclasses.field(default_factory=list)
    """Micro-step indices (global count) whose loss is replaced by NaN (in a teacher-forced
    phase: its first stage's)."""
    nan_ranks: list[int] = dataclasses.field(default_factory=list)
    """The ranks whose losses ``nan_at_micro_steps`` poisons (empty: every rank; in pipeline
    mode a loss is the last stage's)."""
    sleep_per_step: float = 0.0
    """Seconds slept after each optimizer step (gives kill tests a window)."""
    signal_after_build: str | None = None
    """A signal (e.g. SIGUSR1) rank 0 sends itself once the engines are built and the checkpoint
    loaded: a preemption that comes while the run starts, at a known point."""

    def __post_init__(self):
        if self.signal_after_build is not None and not _is_signal_name(self.signal_after_build):
            raise ValueError(f"debug.signal_after_build: {self.signal_after_build!r} is not a signal name (e.g. SIGUSR1)")

    def poisons(self, micro_step: int, rank: int) -> bool:
        """Is the loss of ``micro_step`` on ``rank`` made NaN."""
        return micro_step in self.nan_at_micro_steps and (not self.nan_ranks or rank in self.nan_ranks)


def default_phases() -> list[PhaseConfig]:
    """The default recipe: teacher-forced alignment of the new mixers, then end to end.

    Each block's mixer first learns alone to reproduce its attention block's output from
    the teacher's own input (cheap: no backward across blocks, no LM head), then the
    student trains end to end with the CALD loss (benchmarks/results/recovery.md).
    """
    return [
        PhaseConfig(name="align", fraction=0.7, mode="teacher_forced", trainable="mixers", lr=5e-3),
        PhaseConfig(name="end_to_end", mode="end_to_end"),
    ]


@dataclasses.dataclass(kw_only=True)
class TaskConfig:
    """What the teacher and student are trained to do (``cald_scale/tasks/``)."""

    kind: Literal["causal_lm", "classification"] = "causal_lm"
    """causal_lm: next-token prediction on ``data`` (scored by perplexity); classification:
    sequence classification of ``classification`` with an encoder teacher (BERT, RoBERTa)
    and a new pooled head (scored by accuracy and macro-F1)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Classification head: mean over real tokens, or the first token (CLS / <s>)."""


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The corpus of the causal LM task."""
    classification: ClassificationDataConfig = dataclasses.field(default_factory=ClassificationDataConfig)
    """The labelled data of the classification task."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    phases: list[PhaseConfig] = dataclasses.field(default_factory=default_phases)
    """The run as an ordered list of phases (distill/phases.py); the paper's guidance modes
    are recipes of phases (recipes/guidance/)."""

    def __post_init__(self):
        conversion = self.student.conversion
        if conversion.attention_every is None:
            # A causal LM keeps a quarter of its attention unless told otherwise: on general
            # English that hybrid reached 1.73x the teacher's perplexity on its own held-out text
            # and 2.68x on Wikipedia in 51k tokens, the all-Mamba2 student 2.34x and 5.55x
            # (benchmarks/results/recovery.md, layouts). The encoder track's table converts every layer.
            keeps = conversion.converts and not conversion.attention_layers
            conversion.attention_every = task_spec(self.task.kind).attention_every if keeps else 0  # (explicit values are checked by ConversionConfig)
        if not self.student.conversion.converts and self.student.trainable != "all":
            raise ValueError("student.conversion.mixer=none trains the teacher as it is: set student.trainable=all (there are no mixers to train)")
        if self.student.trainable != "all" and self.train.copied_lr_scale != TrainConfig().copied_lr_scale:
            raise ValueError(
                f"train.copied_lr_scale={self.train.copied_lr_scale} sets the copied weights' LR, but student.trainable="
                f"{self.student.trainable} freezes them for the whole run: set student.trainable=all, or leave it out"
            )
        if self.student.trainable == "all" and not self.student.share_frozen_weights:
            raise ValueError(
                "student.share_frozen_weights=false unshares the frozen copied weights, but student.trainable=all trains "
                "every copied weight (none is shared with the teacher): set student.trainable=mixers, or leave it out"
            )
        if self.train.pipeline_stages and self.train.schedule != "streamed":
            raise ValueError(
                f"train.schedule={self.train.schedule} is a ZeRO-3 mode schedule: pipeline mode (train.pipeline_stages) streams "
                "each teacher stage into its student stage by construction; leave train.schedule out"
            )
        spec = task_spec(self.task.kind)
        if spec.padded and any(p.tokens is not None for p in self.phases):
            raise ValueError(f"{spec.kind} batches are padded to their longest example: give phase lengths in steps or fractions, not tokens")
        if self.train.pipeline_stages and not spec.pipeline:
            raise ValueError(f"pipeline mode (train.pipeline_stages) runs causal LMs; {spec.kind} runs under ZeRO-3 (train.pipeline_stages=0)")
        ppl_only = [f"eval.{key}" for key in ("max_sequences", "other_corpora") if getattr(self.eval, key) != getattr(EvalConfig(), key)]
        if ppl_only and not spec.perplexity:
            raise ValueError(
                f"{' and '.join(ppl_only)} set what perplexity scores (causal LMs); a {spec.kind} run scores its whole "
                f"held-out splits ({spec.data_section}.max_eval_examples caps them)"
            )
        if conversion.mixer == "linformer" and conversion.linformer.sharing == "layer":
            forced = [p.name for p in self.phases if p.mode == "teacher_forced"]
            if forced:
                # NOTE: a teacher-forced phase back-propagates block by block, and ZeRO-3 reduces a
                # parameter at each backward with copy semantics: the one projection every block
                # shares would keep only the last block's part of its gradient.
                raise ValueError(
                    f"student.conversion.linformer.sharing=layer shares one length projection across the blocks, which "
                    f"teacher-forced phases ({forced}) cannot train under ZeRO-3: use sharing none or kv, or end_to_end phases"
                )
        if self.student.init_from and self.train.pipeline_stages:
            raise ValueError("student.init_from is not supported in pipeline mode (train.pipeline_stages): each stage converts the teacher's own blocks")
        trajectory = [p.name for p in self.phases if p.guidance == "trajectory"]
        if trajectory and self.train.pipeline_stages:
            raise ValueError(
                f"phase {trajectory[0]!r}: trajectory guidance trains the teacher in a training engine of its own, but pipeline "
                "mode keeps the teacher's blocks frozen inside the stages; use the ZeRO-3 mode (train.pipeline_stages=0)"
            )
        # Phase errors surface when the config is loaded. NOTE: a phase given in tokens, with the
        # global batch left to the micro-batch times the ranks, has a length only the run knows:
        # its plan is checked at the start, on the real number of ranks, before any engine is built.
        if self.train.global_batch_size is not None or not any(p.tokens is not None for p in self.phases):
            self.plan(world_size=1)

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens per optimizer step (classification: an upper bound, every example at max_length)."""
        sequences = self.train.global_batch_size or self.train.micro_batch_size * self.train.grad_accum * world_size
        return sequences * task_spec(self.task.kind).seq_len(self)

    def plan(self, world_size: int) -> PhasePlan:
        """The phases resolved to concrete step ranges."""
        return plan_phases(
            self.phases, self.train, self.loss, tokens_per_step=self.tokens_per_step(world_size), student_trainable=self.student.trainable
        )

    def to_dict(self) -> dict:
        return to_dict(self)


class _UniqueKeyLoader(ConfigLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently: a recipe's second `train:` section would replace its first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_run_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Embedded defaults <- YAML recipe <- ``key.path=value`` overrides, validated strictly."""
    data: dict = {}
    if recipe is not None:
        path = Path(recipe).expanduser()
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder: name a YAML file in it ({', '.join(sorted(p.name for p in [*path.glob('*.yaml'), *path.glob('*.yml')])[:6]) or 'it holds none'})")
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)  # one line: where, and what (not PyYAML's quoted context)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    overrides = list(overrides or [])
    if "phases" not in data and any(o.startswith("phases.") for o in overrides):
        # NOTE: "phases.0.lr=..." edits the default phases, so they must be spelled out first.
        data["phases"] = to_dict(default_phases())
    data = apply_overrides(data, overrides)
    for old, (key, values) in RENAMED_KEYS.items():
        node, leaf = _parent(data, old)
        if node is not None and leaf in node:
            spelled = ", ".join(f"{json.dumps(a)} is {json.dumps(b)}" for a, b in values.items())
            raise ConfigError(f"{old} was renamed to {key} ({spelled})")
    cfg = from_dict(RunConfig, data)
    _refuse_unused(cfg)
    return cfg


def _refuse_unused(cfg: RunConfig) -> None:
    """Settings this run would never read, refused in what a user asks for now (a recipe and
    overrides), not in a run's saved config.json: a run recorded with one still resumes and is
    still scored (helper-81: each passed --print_config and silently did nothing)."""
    if cfg.data.eval_corpus is not None and cfg.data.eval_fraction != DataConfig.eval_fraction:
        raise ConfigError(
            f"data.eval_fraction={cfg.data.eval_fraction} holds out part of data.corpus, but data.eval_corpus scores another "
            "corpus and the whole of data.corpus trains: leave one out"
        )
    spec = task_spec(cfg.task.kind)
    for section in spec.unread_sections:
        # NOTE: not data.corpus, which the recorded classification runs were stamped with (the LM default's old value).
        fields, default = dataclasses.fields(getattr(cfg, section)), type(getattr(cfg, section))()
        unread = [f"{section}.{f.name}" for f in fields if f.name != "corpus" and getattr(getattr(cfg, section), f.name) != getattr(default, f.name)]
        if unread:
            raise ConfigError(
                f"{', '.join(unread)}: a {spec.kind} run reads its data from the {spec.data_section} section "
                f"({spec.data_section}.{spec.seq_len_key}, ...), never from {section}"
            )
    if not spec.pooled_head and cfg.task.pooling != TaskConfig().pooling:
        raise ConfigError(f"task.pooling={cfg.task.pooling} pools a classification head; a causal LM ({cfg.task.kind}) has none: leave it out")


# Keys added after run folders were first written, with the value that reproduces what a run
# saved without them did (not necessarily today's default). A saved config that lacks one
# is read with this value.
LEGACY_DEFAULTS: dict[str, object] = {
    "student.conversion.attention_every": 0,  # before it, a causal LM converted every layer
    "debug.nan_ranks": [],  # before it, debug.nan_at_micro_steps poisoned every rank
    "phases[].lr_schedule": "own",  # before it, every phase had its own schedule ("[]": each list item)
    # before them, a Mamba2 mixer's width was expand x hidden_size, and no signal was injected
    "student.conversion.mamba2.intermediate_size": None,
    "student.conversion.bimamba2.mamba2.intermediate_size": None,
    "debug.signal_after_build": None,
}

# Keys renamed since run folders were first written: old dotted key -> (new key, {old value: new value}).
RENAMED_KEYS: dict[str, tuple[str, dict]] = {
    "train.frozen_leaf_modules": ("train.zero3_leaves", {True: "frozen", False: "none"}),
}

# Keys that choose how a run executes, never what it computes (each tested to train to the same
# values whatever it holds): digests that identify a run's results leave them out.
RESULT_NEUTRAL_KEYS: tuple[str, ...] = ("train.zero3_leaves",)


def _parent(config: dict, key: str) -> tuple[dict | None, str]:
    """The mapping that holds dotted ``key`` in ``config`` (None if a section is missing), and the leaf name."""
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def _nodes(config: dict, key: str) -> list[tuple[dict, str]]:
    """Every mapping that holds dotted ``key`` in ``config``, and the leaf name; ``a[].b`` is ``b``
    in each mapping of the list ``a``."""
    if "[]." not in key:
        node, leaf = _parent(config, key)
        return [(node, leaf)] if node is not None else []
    head, rest = key.split("[].", 1)
    items, name = _parent(config, head)
    found = items.get(name) if items is not None else None
    return [pair for item in (found if isinstance(found, list) else []) if isinstance(item, dict) for pair in _nodes(item, rest)]


def with_legacy_defaults(saved: dict) -> dict:
    """``saved`` (a run's config.json) with each ``RENAMED_KEYS`` key under its new name and every
    key of ``LEGACY_DEFAULTS`` it lacks filled in."""
    out = copy.deepcopy(saved)
    for old, (key, values) in RENAMED_KEYS.items():
        node, leaf = _parent(out, old)
        if node is not None and leaf in node:
            value = node.pop(leaf)
            new_node, new_leaf = _parent(out, key)
            if new_node is not None:
                new_node.setdefault(new_leaf, values.get(value, value))
    for key, value in LEGACY_DEFAULTS.items():
        for node, leaf in _nodes(out, key):
            node.setdefault(leaf, value)
    return out


def without_legacy_defaults(config: dict) -> dict:
    """``config`` with each key of ``LEGACY_DEFAULTS`` that holds its legacy value removed: the
    config as written before those keys existed (so a digest of it matches one taken then)."""
    out = copy.deepcopy(config)
    for key, value in LEGACY_DEFAULTS.items():
        for node, leaf in _nodes(out, key):
            if leaf in node and node[leaf] == value:
                del node[leaf]
    return out


def without_result_neutral(config: dict) -> dict:
    """``config`` (a plain dict) without the ``RESULT_NEUTRAL_KEYS``: what identifies its results."""
    out = copy.deepcopy(config)
    for key in RESULT_NEUTRAL_KEYS:
        node, leaf = _parent(out, key)
        if node is not None:
            node.pop(leaf, None)
    return out


def config_differences(saved: dict, wanted: RunConfig, *, sections: tuple[str, ...] | None = None, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys where a run folder's saved ``config.json`` and ``wanted`` differ, as
    "key: saved X, wanted Y", within ``sections`` (all when None), leaving out ``ignore``.

    The saved side is loaded through the current dataclasses first, so a field added since
    the run was written compares as its default rather than as missing.
    """
    def kept(key: str) -> bool:
        in_sections = sections is None or key.split(".", 1)[0] in sections
        return in_sections and not any(key == i or key.startswith(i + ".") for i in ignore)

    try:
        ours, theirs = flat_keys(from_dict(RunConfig, with_legacy_defaults(saved)).to_dict()), flat_keys(wanted.to_dict())
        head, keys = [], set(ours) | set(theirs)
    except (ConfigError, ValueError, TypeError) as err:
        # Still compare the keys both name, so that a changed teacher, student or data is seen
        # (as JSON has them: the saved side's tuples are lists).
        ours, theirs = flat_keys(with_legacy_defaults(saved)), flat_keys(json.loads(json.dumps(wanted.to_dict())))
        head, keys = [f"the saved config no longer loads ({err})"], set(ours) & set(theirs)
    return [*head, *(f"{k}: saved {ours.get(k)!r}, wanted {theirs.get(k)!r}" for k in sorted(filter(kept, keys)) if ours.get(k) != theirs.get(k))]


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested dict as {dotted key: leaf value}."""
    out = {}
    for key, value in d.items():
        out.update(flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
