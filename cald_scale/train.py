"""The CALD training job: teacher -> converted student, distilled phase by phase, under ZeRO-3
engines or in DeepSpeed's pipeline mode (``train.pipeline_stages``; ``engines/pipeline.py``).

``train`` reads as the job's outline: set up, build, evaluate the starting point (``_start``),
the flat step loop (``train_step`` is one optimizer step, ``forward_backward`` one
micro-batch; ``_Run`` logs each step and does what falls due after it), then evaluate the
end point, export and report (``_Run.finish``). Which teacher guides each step is ``distill/guidance.py``;
what trains and at what LR is the phase's (``distill/phases.py``). Rerunning the same
command resumes where the last complete checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .config import OutputConfig, RunConfig, config_differences, flat_keys, with_legacy_defaults
from .config_loader import ConfigError, from_dict, to_dict
from .conversion.teacher import dtype_name, resolve_teacher_source
from .conversion.weights import weights_fingerprint
from .distill.guidance import Guide
from .distill.phases import Phase, PhasePlan, set_decay_and_betas, set_phase_lr
from .distill.progress import NonFiniteLossError, StepState
from .distill.stages import LayerwiseModel
from .distill.step import LossParts, cald_forward, teacher_forced_step
from .engines.checkpoint import complete_tags, load_latest_checkpoint, save_checkpoint
from .engines.deepspeed_version import check_deepspeed_version
from .engines.distributed import (
    DistEnv, all_true, barrier, gather_objects, init_distributed, mean_over_ranks, on_main, refuse_differences_across_ranks, release_distributed,
)
from .engines.host_memory import configure_host_allocator, return_free_memory
from .engines.preemption import Preempted, PreemptionWatch, raise_if_preempted
from .engines.models import DistillationModels, build_models, checkpoint_excludes_frozen
from .engines.reshard import OPTIMIZER_GROUPS, ResumePlan, plan_resume
from .engines.teacher import check_waypoints
from .engines.ds_config import compute_dtype, ds_config_file, load_ds_config, resolve_ds_config
from .engines.zero3 import begin_step
from .eval.report import write_report
from .export.bamba import BambaExportError, check_exportable, export_bamba
from .export.hf import export_model
from .fileio import NO_LOCKS, atomic_write_text, hold_lock, read_json, sha256_of, work_cache_dir
from .metrics import MetricsLogger, peak_memory_bytes
from .tasks import open_task
from .tasks.spec import DATA_SECTIONS, task_spec

__all__ = ["train", "train_step", "forward_backward", "NonFiniteLossError", "Preempted"]

logger = logging.getLogger("cald_scale.train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# What a resumed run may not change: what it learns from and what its checkpoints hold. (Its
# schedule, losses, batch layout and outputs may change; the change is logged and recorded.)
_FIXED_ON_RESUME = ("task", "teacher", "student", "data", "classification", "train.seed", "eval.max_sequences")
# Where files live and how long to wait: free to change. The teacher, student.init_from and the
# corpora may move too (a project copied elsewhere): their content is what a resume compares
# (teacher.json, data.json).
_MOVABLE = (
    "teacher.cache_dir", "data.cache_dir", "data.wait_timeout_s", "classification.cache_dir",
    "teacher.name_or_path", "student.init_from", "data.corpus", "data.eval_corpus",
    "classification.dataset", "classification.train", "classification.validation", "classification.test",
    # How the same weights compute, not what they are: free too (activation checkpointing is the
    # way out of a resumed run's out-of-memory). teacher.dtype is the engines' precision as it
    # resolved (a run moved to a bf16 GPU; runs before 2026-12-06 recorded float32 whatever it was).
    "student.activation_checkpointing", "teacher.attn_implementation", "teacher.dtype",
)


def _fixed_on_resume(key: str, kind: str) -> bool:
    """Whether setting ``key`` of a run of task ``kind`` may not change on resume: a data section
    the task never reads is free (an LM run started with a classification.* setting, which no
    later command may give, resumes without it)."""
    if any(key == s or key.startswith(s + ".") for s in task_spec(kind).unread_sections):
        return False
    return key not in _MOVABLE and any(key == k or key.startswith(k + ".") for k in _FIXED_ON_RESUME)


def _refuse_settings_that_differ_across_ranks(cfg: RunConfig, ds_config_path: str | Path) -> None:
    """Every rank runs the configuration rank 0 runs, with the same folders, before any of them
    claims the run folder. Each rank reads its config and environment itself, and a rank on
    another node may see others: deepspeed passes only some variables to other nodes, so one
    without $CALD_SCALE_CACHE resolves another default data cache, one started in another folder
    another relative run folder or ds_config, one without the teacher's files fails to open it.
    Its ranks would wait for a corpus rank 0 tokenises elsewhere, write their checkpoint shards
    beside another run, or fail while the others wait. Compared: the settings this run's task
    reads (another task's data section is not read), the run folder, the ds_config's content and
    whether the teacher resolves (not where: each node may install it in its own folder)."""
    unread = tuple(f"{section}." for section in task_spec(cfg.task.kind).unread_sections)
    values: dict[str, object] = {f"config {key}": value for key, value in flat_keys(cfg.to_dict()).items() if not key.startswith(unread)}
    values["the run folder"] = os.path.abspath(cfg.output.run_dir)
    values["the ds_config"] = _described(lambda: f"{ds_config_path} with sha256 {sha256_of(ds_config_file(ds_config_path))[:12]}")
    values["the teacher"] = _described(lambda: f"a {resolve_teacher_source(cfg.teacher)[0]} teacher")
    refuse_differences_across_ranks(values, why=(
        "Every rank must read the same caches and files and write the same run folder. On several nodes, deepspeed passes "
        "the other nodes' ranks only NCCL_*, PYTHON*, UCX* and MLFLOW* variables and what .deepspeed_env (in ~ or the "
        "working folder, or $DS_ENV_FILE) lists: list CALD_SCALE_CACHE and the HF_* settings there, start every node in "
        "the same folder on a shared disk, or give absolute paths (launch/slurm's batch scripts do this)"
    ))


def _described(describe: Callable[[], str]) -> str:
    """``describe()``, or the error it raised, named (compared across ranks: one that fails must not leave the others waiting)."""
    try:
        return describe()
    except Exception as err:  # noqa: BLE001 - the error is the value compared
        return f"unreadable ({type(err).__name__}: {err})"


@contextlib.contextmanager
def _claim(out: OutputConfig) -> Iterator[None]:
    """One job at a time in ``out.run_dir``: rank 0 holds its .lock until this run ends (its
    process's end releases it, a kill too). A job started while another still runs there
    waits ``out.lock_wait_s`` for it (e.g. ranks still saving a preemption checkpoint after
    their launcher returned), then stops with an error on every rank."""
    run_dir, held = Path(out.run_dir), []

    def waiting(holder: str) -> None:
        logger.warning("another job holds %s (%s): waiting up to %.0f s for it to end", run_dir, holder, out.lock_wait_s)

    def interrupt() -> None:  # a preemption signal ends the wait (on_main hands the stop to every rank)
        raise_if_preempted(f"waiting for another job to leave {run_dir}")

    def take() -> None:
        refuse_foreign_folder(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            held.append(hold_lock(run_dir / ".lock", owner, wait_s=out.lock_wait_s, on_wait=waiting, interrupt=interrupt))
        except BlockingIOError as err:
            raise BlockingIOError(f"output.run_dir {run_dir} is in use by another job: {err}; wait for it to end or use another output.run_dir") from None
        except OSError as err:
            if err.errno in NO_LOCKS:  # e.g. Lustre mounted without flock
                logger.warning("output.run_dir %s: its file system takes no locks (%s): one job per folder is not enforced", run_dir, err.strerror)
                return
            raise OSError(f"output.run_dir {run_dir}: cannot write there ({err.strerror or err})") from err

    on_main(take)
    try:
        yield
    finally:
        for handle in held:
            handle.close()


def refuse_foreign_folder(run_dir: Path) -> None:
    """A run writes its config.json, checkpoints/, student/ and reports into ``run_dir``: a folder
    whose config.json is not a run's (a model folder: the teacher itself, an export) is refused
    before anything is written there."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # a run's config.json emptied by a crash: _check_run_dir names it on resume
        return
    if isinstance(saved, dict) and {"teacher", "train"} <= saved.keys() and "model_type" not in saved:
        return
    what = f"a {saved['model_type']} model" if isinstance(saved, dict) and "model_type" in saved else "something other than a run"
    raise ValueError(
        f"output.run_dir {run_dir} holds {what} (its config.json is not a cald_scale run's): a run would overwrite it with its "
        "own config, checkpoints and student; use another output.run_dir"
    )


def _keep_recorded_caches(run_dir: Path, cfg: RunConfig, *, resuming: bool) -> RunConfig:
    """``cfg`` with the cache folders its run recorded, where this session has the defaults and
    the recorded ones still hold the caches: the default moves with $CALD_SCALE_CACHE (set since
    the run started, say), and following it would tokenise the corpus again on the first resume
    while every other rank waits. A section the task does not read keeps its record as it is."""
    path = run_dir / "config.json"
    if not resuming or not path.is_file():
        return cfg
    saved = read_json(path)
    unread = task_spec(cfg.task.kind).unread_sections
    for section in DATA_SECTIONS:
        reads = section not in unread
        recorded, current = (saved.get(section) or {}).get("cache_dir"), getattr(cfg, section).cache_dir
        if not recorded or recorded == current or current != work_cache_dir(None, section):
            continue
        if reads and not Path(recorded).is_dir():
            continue
        if reads:
            logger.info("%s.cache_dir: resuming with the run's recorded cache %s (the default is %s now)", section, recorded, current)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), cache_dir=recorded)})
    return cfg


def _check_run_dir(run_dir: Path, cfg: RunConfig, *, resuming_at: int | None, replicas: int = 1) -> list[str]:
    """The settings this run changes from the run whose checkpoint it resumes (``resuming_at``:
    its step; None: none, the folder is taken over, unless it holds what a finished run made).
    Raises ValueError when it would change what the checkpoints hold (another teacher, student
    or data) or rewrite the steps already run (their phases). Reads only; ``_record`` writes
    once the checkpoint has loaded."""
    path = run_dir / "config.json"
    if resuming_at is None:
        # No complete checkpoint: a start that failed is taken over; a run whose checkpoints were
        # deleted after it finished (to save disk) would lose its student and report to a new one.
        made = [name for name in ("student", "report.json") if (run_dir / name).exists()]
        if made:
            raise ValueError(
                f"{run_dir} holds what a finished run made ({', '.join(made)}) but no checkpoint to resume: starting over there "
                "would replace it; use another output.run_dir, or move those away to train from the start again"
            )
        return []
    if not path.is_file():
        return []
    saved = read_json(path)
    changed = config_differences(saved, cfg, ignore=("output.run_dir",))
    fixed = [d for d in changed if _fixed_on_resume(d.split(":")[0], cfg.task.kind)]
    if fixed:
        raise ValueError(
            f"{run_dir} holds a run of another teacher, student or data ({'; '.join(fixed[:4])}); "
            "resume it with its own settings, or use a new output.run_dir"
        )
    try:
        saved_cfg = from_dict(RunConfig, with_legacy_defaults(saved))
        before = saved_cfg.plan(replicas)
    except (ConfigError, ValueError, TypeError):  # a config of an older version: `changed` says so
        return changed
    if changed:
        after = cfg.plan(replicas)
        excluded = (checkpoint_excludes_frozen(saved_cfg, before), checkpoint_excludes_frozen(cfg, after))
        if excluded[0] != excluded[1] and saved_cfg.student.init_from != cfg.student.init_from:
            raise ValueError(
                f"{run_dir} was trained from student.init_from={saved_cfg.student.init_from!r} and this run converts from "
                f"{cfg.student.init_from!r}: a mixers-only student shares its teacher's frozen weights only when it is converted "
                "from the teacher itself, and its checkpoints leave those weights out, so one kind does not load as the other; "
                "resume with the run's own student.init_from, or use a new output.run_dir"
            )
        _check_plan_change(run_dir, before, after, resuming_at, excluded=excluded)
    return changed


def _check_plan_change(run_dir: Path, before: PhasePlan, after: PhasePlan, at: int, *, excluded: tuple[bool, bool]) -> None:
    """A resume may change the phases of the steps still to come, not of those already run,
    nor what its checkpoints hold (``excluded``: whether they leave the frozen copied weights
    out, before and after: under ZeRO-3, whether the student shares a fixed teacher's)."""
    fix = "resume with the run's own phases and train.max_steps, or use a new output.run_dir"
    if at > after.total_steps:
        raise ValueError(f"{run_dir}'s checkpoint is at step {at}, past this run's {after.total_steps} steps (train.max_steps, phases): {fix}")
    for step in range(at):
        was, now = before.at(step), after.at(step)
        if (was.name, was.guidance, was.mode, was.trainable) != (now.name, now.guidance, now.mode, now.trainable):
            raise ValueError(
                f"step {step + 1} of {run_dir} already ran in phase {was.name!r} ({was.guidance}, {was.mode}, trains {was.trainable}); "
                f"this run's phases put it in {now.name!r} ({now.guidance}, {now.mode}, trains {now.trainable}) (a phase given as a "
                f"fraction of train.max_steps moves with it: give the phases that ran their steps to train longer), {fix}"
            )
    if 0 < at < after.total_steps:
        was, now = before.at(at - 1), after.at(at)
        lr_was, lr_now = was.lr * was.lr_factor(at - 1), now.lr * now.lr_factor(at)
        # NOTE: a resume onto the LR its run had planned for that step (inside a warmup, at the
        # next phase's start) is no jump: only a changed schedule makes one.
        planned = before.at(at) if at < before.total_steps else None
        as_planned = planned is not None and math.isclose(planned.lr * planned.lr_factor(at), lr_now, rel_tol=1e-9)
        if lr_now > 1.5 * lr_was and not as_planned:
            logger.warning(
                "resuming at step %d: the LR jumps from %.3g (step %d) to %.3g (step %d), with no warmup, because phase %r's "
                "schedule now spans steps %d-%d: give the added steps a phase of their own (it warms up) to avoid the jump",
                at, lr_was, at, lr_now, at + 1, now.name, now.schedule_start + 1, now.schedule_end,
            )
    if excluded[0] != excluded[1]:  # the student settings are fixed on resume: the phases changed the teacher
        was, now = ("a fixed teacher", "a trajectory or waypoint phase") if before.fixed_teacher else ("a trajectory or waypoint phase", "a fixed teacher only")
        raise ValueError(
            f"{run_dir} was trained with {was} and this run's phases have {now}: a mixers-only student shares a fixed "
            f"teacher's frozen weights, and its checkpoints leave them out, so one kind does not load as the other; {fix}"
        )


PHASES_RUN = "phases_run"
"""Client-state key: [name, start, end] of the phases of the steps a checkpoint holds."""


def _check_phases_run(run_dir: Path, saved: dict, plan: PhasePlan, at: int) -> None:
    """The steps a checkpoint holds ran in the phases it records; this code's plan must put them
    in the same ones. ``_check_plan_change`` compares plans of the two configs, both resolved
    by this code, so a change to how the code resolves them (e.g. rounding) shows only here."""
    for name, start, end in saved.get(PHASES_RUN, []):
        for step in range(start, min(end, at)):
            if (now := plan.at(step).name) != name:
                raise ValueError(
                    f"step {step + 1} of {run_dir} ran in phase {name!r} (steps {start + 1}-{end}), and this version puts it in "
                    f"{now!r} (steps {plan.at(step).start + 1}-{plan.at(step).end}): give the phases as steps (phases.N.steps) that "
                    "end where they ended, or use a new output.run_dir"
                )


def _warn_joined_groups(resume: ResumePlan, plan: PhasePlan, trainable: str) -> None:
    """A checkpoint saved before the parts outside the blocks had optimizer groups of their own
    resumes with its layout, and a teacher-forced phase that trains everything then moves them."""
    phases = [p.name for p in plan.phases if p.mode == "teacher_forced" and p.trainable == "all"]
    if not resume.outside_groups and trainable == "all" and phases:
        logger.warning(
            "%s predates separate optimizer groups for the embedding, final norm and head, and resumes with its own layout: "
            "in phase(s) %s they move by weight decay and momentum as when it was saved; a new output.run_dir holds them still",
            resume.tag, ", ".join(map(repr, phases)),
        )


def _record(run_dir: Path, cfg: RunConfig, env: DistEnv, *, resumed_at: int | None, changed: list[str], finished: bool = False) -> None:
    """Claim ``run_dir`` for this run (its config.json). Settings changed on a resume are logged
    and appended to config_changes.jsonl, so the folder still says what every step ran with.
    ``finished``: the checkpoint is at the run's last step (a finished run rerun): no step runs
    with the changes, which the log says."""
    if env.is_main:
        if changed and resumed_at is not None:
            logger.warning("resuming at step %d with changed settings: %s", resumed_at, "; ".join(changed))
            if finished:
                logger.warning(
                    "the run is finished (its checkpoint is at its last step, %d): no training step runs with the changed "
                    "settings, only the evaluation, export and report do; raise train.max_steps (or add a phase) to train on",
                    resumed_at,
                )
            with open(run_dir / "config_changes.jsonl", "a") as handle:
                handle.write(json.dumps({"from_step": resumed_at, "time": time.time(), "changes": changed}) + "\n")
        # NOTE: durable, as the checkpoints are: a node crash must not leave them beside an empty config.
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2), durable=True)
    barrier()


def _check_same_data(run_dir: Path, env: DistEnv, identity: dict, *, resumed_at: int | None) -> None:
    """A resumed run reads the data its first session read (data.json): the train/held-out split
    and the batch order come from the corpus as it was, so a corpus that has changed since
    (a line appended, a file dropped into its folder) would re-split it silently, and the
    held-out score would count documents the run trained on."""
    _check_unchanged(
        run_dir / "data.json", f"the data of run {run_dir}", env, identity, resumed_at=resumed_at,
        why="Its splits and batch order come from the data as it was",
    )


def _check_same_teacher(run_dir: Path, env: DistEnv, identity: dict, *, resumed_at: int | None) -> None:
    """A resumed run distils from the teacher its first session did, and converts the student
    from the same student.init_from (teacher.json, the weights' content): teacher weights saved
    anew at the same path (fine-tuned further, another seed) would go on silently from mixers
    trained on the old one, the frozen copied weights (the teacher's own tensors) and the
    recorded baseline from the new one. A path that changed with the same content resumes."""
    _check_unchanged(
        run_dir / "teacher.json", f"the teacher or student.init_from of run {run_dir}", env, identity, resumed_at=resumed_at,
        why="Its student was trained against the models as they were, and shares or copied their weights",
    )


def _check_unchanged(path: Path, what: str, env: DistEnv, identity: dict, *, resumed_at: int | None, why: str) -> None:
    """``identity`` recorded at ``path`` by the run's first session (a run from before the record
    writes it now), compared on resume; a change is refused in one line naming it."""
    recorded = _once(path, env, lambda: identity, resuming=resumed_at is not None)
    if recorded != identity:
        changed = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
        raise ValueError(
            f"{what} changed since it started (its newest checkpoint is at step {resumed_at}): {', '.join(changed)} "
            f"was {recorded.get(changed[0])}, now {identity.get(changed[0])}. {why}: restore it, or start a new run "
            "(another output.run_dir)"
        )


def _finite_teacher_scores(scores: dict, source) -> dict:
    """The teacher's held-out scores, refused when one is NaN or infinite: a teacher whose outputs
    are not finite (a damaged checkpoint, a float16 overflow) gives no target to learn, and the run
    would stop steps later on non-finite losses, blaming the learning rate."""
    bad = [(path, value) for path, value in flat_keys(scores).items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        overflow = "" if source.dtype == torch.float32 else f", or an overflow in {dtype_name(source.dtype)}: try float32, the ds_config's bf16 and fp16 off"
        raise ValueError(
            f"teacher {source.name!r} scores {', '.join(f'{p}={v}' for p, v in bad[:4])} on held-out data: its outputs are not "
            f"finite (a damaged or wrongly converted checkpoint in {source.folder}{overflow}), so it gives no target to distil"
        )
    return scores


def _once(path: Path, env: DistEnv, compute, *, resuming: bool) -> dict:
    """A value computed once per run (on every rank) and reused on resume; a start from
    scratch computes it again (a folder's earlier start may have had other settings)."""
    if resuming and path.is_file():
        # NOTE: a record damaged by hand or by a crash is named, with the way out: it is rebuilt
        # when deleted (the baseline scored again; data.json and teacher.json from what is there now).
        try:
            recorded = read_json(path)
        except ValueError as err:
            raise ValueError(f"{err}: delete it to have this run record it again") from None
        if not isinstance(recorded, dict):
            raise ValueError(f"{path} is not this run's record (it holds {type(recorded).__name__}, not an object): delete it to have it recorded again")
        return recorded
    values = compute()
    if env.is_main:
        atomic_write_text(path, json.dumps(values, indent=2), durable=True)
    barrier()
    return values


def _warn_if_scored_otherwise(baseline: dict, dtype: str, path: Path) -> None:
    """A run resumed in another precision (a bf16 GPU after CPU sessions) keeps its starting
    point's scores: the converted student is gone once trained, so they cannot be scored again.
    Its report then compares scores computed in two precisions (1% apart on a freshly converted
    SmolLM2 student), which is said here and in the report (``scored_in``)."""
    if baseline.get("dtype", dtype) != dtype:  # NOTE: a baseline of a run before stop 54 names none
        logger.warning(
            "the starting point was scored in %s (%s) and this session computes in %s: the report's scores before and "
            "after training compare across the two precisions", baseline["dtype"], path, dtype,
        )


# -- the step ------------------------------------------------------------------------------
def forward_backward(
    models: DistillationModels, teacher: LayerwiseModel | None, phase: Phase, batch: dict, cfg: RunConfig, *, poison: bool = False,
    layer_tokens: float | None = None,
) -> tuple[LossParts, bool]:
    """Forward and backward of one micro-batch on every rank; returns (loss parts, finite).
    ``layer_tokens``: what a padded batch's layer losses divide by (``cald_forward``).

    A non-finite end-to-end loss is not back-propagated (the caller skips the micro-batch).
    In a teacher-forced phase each stage is back-propagated as it is computed, and a
    non-finite stage alone is skipped. ``poison`` makes the loss NaN (fault-injection tests).
    """
    engine = models.student_engine
    agree = lambda flag: all_true(flag, engine.device)  # noqa: E731 - every rank must take the same branch
    begin_step(models.teacher_engine if teacher is not None else None, engine)
    if phase.mode == "teacher_forced":
        parts = teacher_forced_step(
            teacher, models.student, batch, phase.loss, backward=engine.backward, stage_size=cfg.train.stage_size, all_agree=agree,
            poison_stage=0 if poison else None, layer_tokens=layer_tokens,
        )
        return parts, parts.skipped_stages == 0  # every rank skipped the same stages
    parts = cald_forward(
        teacher, models.student, batch, phase.loss, stage_size=cfg.train.stage_size, schedule=cfg.train.schedule, layer_tokens=layer_tokens,
    )
    if poison:
        parts.total = parts.total * float("nan")
    if not agree(bool(torch.isfinite(parts.total))):
        return parts.detached(), False  # its graph goes now, not after the next micro-batch's forward
    engine.backward(parts.total)
    return parts, True


def padded_layer_tokens(batches: list[dict], device: torch.device, token_mask: Callable[[dict], torch.Tensor]) -> float:
    """What a step's padded micro-batches divide their layer losses by: the real tokens of the
    whole global batch (these micro-batches on every rank) per micro-batch, counted by the
    student view's ``token_mask`` as the layer losses count them. DeepSpeed averages gradients
    over micro-batches and ranks, so every real token then weighs 1 / (its count)."""
    local = sum(float(token_mask(b).sum()) for b in batches)
    return mean_over_ranks({"tokens": local}, device)["tokens"] / len(batches)


class StepMetrics:
    """One step's figures: the loss parts summed over its micro-batches, then averaged over the
    ranks in one all-reduce, so the record is the whole global batch's on any number of ranks."""

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self.sums: dict[str, float] = {}
        self.layers = 0
        self.teacher_ce: list[float] = []

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def add(self, parts: LossParts, *, token_mask: torch.Tensor | None, teacher_ce: float | None) -> None:
        """A micro-batch that was applied. ``token_mask``: a padded batch's, the view's (1 at a
        real token), counted here; None: a packed batch, whose count is known ahead."""
        if teacher_ce is not None:
            self.teacher_ce.append(teacher_ce)
        if token_mask is not None:
            self._add("_tokens", float(token_mask.sum()))
        for key, value in parts.as_floats().items():
            self._add(key, value / self.grad_accum)
        # Per-layer losses averaged like the total (over the micro-batches, then the ranks), of
        # the values that are finite: a teacher-forced stage skipped in one micro-batch leaves
        # its layers the other micro-batches' figures (none at all: null), not NaN.
        for i, value in enumerate(parts.per_layer):
            finite = math.isfinite(value)
            self._add(f"_layer_{i}", value if finite else 0.0)
            self._add(f"_layer_{i}_n", float(finite))
        self.layers = len(parts.per_layer)

    def finish(self, device: torch.device, data_parallel_size: int) -> tuple[dict, int]:
        """The step's record (mean parts, ``layer_losses``, ``teacher_ce``) and the real tokens
        counted over every replica (0 unless ``count_tokens``)."""
        sums = dict(self.sums)
        if self.teacher_ce:
            sums["teacher_ce"] = sum(self.teacher_ce) / len(self.teacher_ce)
        record = mean_over_ranks(sums, device)
        tokens = round(record.pop("_tokens") * data_parallel_size) if "_tokens" in record else 0
        if self.layers:
            per_layer = [(record.pop(f"_layer_{i}"), record.pop(f"_layer_{i}_n")) for i in range(self.layers)]
            record["layer_losses"] = [total / count if count else None for total, count in per_layer]
        return record, tokens


def train_step(models, guide: Guide, phase: Phase, step: int, next_batch, state: StepState, cfg: RunConfig, *, tokens_per_micro: int) -> dict:
    """One optimizer step = grad_accum finite micro-batches (non-finite ones are skipped and
    counted); returns the step's mean loss parts and the trajectory teacher's task loss if it learned.
    ``tokens_per_micro``: tokens in one micro-batch over all replicas (0: count the real,
    unpadded tokens of each batch)."""
    engine = models.student_engine
    teacher = guide.enter(step)
    set_phase_lr(engine, phase, step)
    metrics = StepMetrics(cfg.train.grad_accum)
    done = 0
    pending, layer_tokens = [], None
    if not tokens_per_micro and teacher is not None and phase.loss.a_layer > 0:
        # Padded batches: the layer loss divides by the global batch's mean real tokens per
        # micro-batch, not each micro-batch's own, so every real token of the step weighs the
        # same (micro-batches and ranks with more padding weighed more). A micro-batch drawn
        # again after a non-finite one keeps this step's figure.
        pending = [next_batch(state.cursor + j) for j in range(cfg.train.grad_accum)]
        layer_tokens = padded_layer_tokens(pending, engine.device, models.student.token_mask)
    while done < cfg.train.grad_accum:
        batch = pending.pop(0) if pending else next_batch(state.cursor)
        parts, finite = forward_backward(
            models, teacher, phase, batch, cfg, poison=cfg.debug.poisons(state.cursor, engine.global_rank), layer_tokens=layer_tokens,
        )
        state.cursor += 1
        if not finite:
            # ``step`` counts the steps done: this is step + 1, as the metrics and progress bar number it.
            logger.warning("non-finite loss at step %d (micro-batch %d): skipped (%d in a row, %d in all)", step + 1, state.cursor - 1, state.consecutive_nan + 1, state.nan_skipped + 1)
            state.nonfinite(step=step + 1)
            if phase.mode != "teacher_forced":
                continue  # nothing was back-propagated: draw the next micro-batch
        else:
            state.finite()
        engine.step()
        mask = None  # a packed batch: its tokens are counted ahead
        if not tokens_per_micro:
            mask = models.student.token_mask(batch)
            if mask is None:
                raise ValueError("a padded batch without a token mask: its real tokens cannot be counted (the task's batches need one)")
        metrics.add(parts, token_mask=mask, teacher_ce=guide.after_micro_batch(phase, step, batch))
        done += 1
        state.tokens_seen += tokens_per_micro
    record, counted = metrics.finish(engine.device, models.data_parallel_size)
    state.tokens_seen += counted
    return record


# -- the job -------------------------------------------------------------------------------
def train(cfg: RunConfig, ds_config_path: str | Path, *, early_signals: Sequence[str] = ()) -> dict:
    """The run ``cfg`` describes, from its last complete checkpoint in output.run_dir. A
    preemption signal stops it at a step boundary with a checkpoint (``Preempted``);
    ``early_signals`` are those the process got before this call (launch/train.py records
    them while it imports)."""
    env = init_distributed()
    try:
        return _train(cfg, ds_config_path, env, early_signals)
    finally:
        release_distributed(env)  # a world of one made here (a plain process): as it was


def _train(cfg: RunConfig, ds_config_path: str | Path, env: DistEnv, early_signals: Sequence[str]) -> dict:
    logging.getLogger("cald_scale").setLevel(logging.INFO if env.is_main else logging.WARNING)
    _refuse_settings_that_differ_across_ranks(cfg, ds_config_path)
    run = None
    # NOTE: the run folder's lock is released last, after wandb's finish has written its offline
    # run there (a job waiting on the folder started while it still wrote). It is taken inside the
    # watch, so a preemption signal ends the wait for it.
    with contextlib.ExitStack() as folder_lock:
        try:
            # From here on a preemption signal is recorded, not fatal: the run stops at the first step boundary with a checkpoint.
            with PreemptionWatch(tuple(cfg.train.preemption_signals), received_before=early_signals) as watch:
                folder_lock.enter_context(_claim(cfg.output))
                if signal_name := watch.requested(env.device):  # before minutes of building: nothing to save yet
                    raise Preempted(None, signal_name)
                run = _start(cfg, ds_config_path, env, stop_requested=watch.requested)  # 1-3. task and data, teacher and student in their engines, the starting point
                if signal_name := watch.requested(run.device):  # during the build: nothing trained since the last checkpoint
                    run.stop_preempted(run.first_step, signal_name)
                # 4. The step loop.
                watch.stage = "training"
                step = run.first_step
                while step < run.plan.total_steps:
                    phase = run.enter_phase(step)
                    step = run.step(phase, step)
                    run.after_step(phase, step)  # evaluation, exports, checkpoint, as they fall due
                    if step < run.plan.total_steps and (signal_name := watch.requested(run.device)):
                        run.stop_preempted(step, signal_name)
                # 5. End point: evaluate, export the student, report.
                watch.stage = "finishing"
                return run.finish(step, preempted=lambda: watch.requested(run.device))
        finally:
            # NOTE: after the watch is restored, so a signal during wandb's finish ends the process.
            if run is not None:
                run.metrics.close()


@dataclasses.dataclass
class _Run:
    """One session of a run, between its steps: what the loop, the checkpoints and the end
    point share. Built by ``_start``; the loop in ``train`` drives it step by step."""

    cfg: RunConfig
    env: DistEnv
    plan: PhasePlan
    task: Any
    models: Any  # DistillationModels, or pipeline mode's PipelineModels (the same calls)
    guide: Any  # Guide or PipelineGuide
    step_fn: Callable[..., dict]  # train_step or pipeline_train_step
    evaluate: Callable[[str], dict]  # "student" | "teacher" -> scores per eval set
    baseline: dict
    state: StepState
    metrics: MetricsLogger
    next_batch: Callable[[int], dict]
    tokens_per_micro: int  # over all replicas; 0: padded batches count their real tokens
    first_step: int
    started: float
    current: Phase | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.run_dir)

    @property
    def device(self):
        return self.models.student_engine.device

    def enter_phase(self, step: int) -> Phase:
        phase = self.plan.at(step)
        if phase is not self.current:
            self.models.apply_phase(phase, self.cfg.student.trainable)
            self.current = phase
            logger.info("entering %s", phase.describe())
        return phase

    def step(self, phase: Phase, step: int) -> int:
        """One optimizer step, logged; returns the number of steps done."""
        cfg, state, engine = self.cfg, self.state, self.models.student_engine
        t0, tokens_before = time.time(), state.tokens_seen
        record = self.step_fn(self.models, self.guide, phase, step, self.next_batch, state, cfg, tokens_per_micro=self.tokens_per_micro)
        step = engine.global_steps
        applied = engine.was_step_applied()  # False: DeepSpeed skipped it (non-finite gradients)
        state.optimizer_step(applied=applied, step=step, loss_scaling=engine.fp16_enabled() and engine.dynamic_loss_scale())
        if cfg.train.trim_heap_every and step % cfg.train.trim_heap_every == 0:
            return_free_memory()
        elapsed = time.time() - t0
        state.train_seconds += elapsed
        if cfg.debug.sleep_per_step:
            time.sleep(cfg.debug.sleep_per_step)
        record.update(
            phase=phase.index,
            phase_name=phase.name,
            lr=engine.get_lr()[0],
            lr_groups={g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)},
            grad_norm=float(engine.get_global_grad_norm() or 0.0),
            step_applied=applied,
            tokens=state.tokens_seen,
            tokens_per_s=(state.tokens_seen - tokens_before) / max(elapsed, 1e-9),
            nan_skipped=state.nan_skipped,
            steps_skipped=state.steps_skipped,
        )
        release = self.guide.release_stats
        if release is not None and release.get("step") == step - 1:
            rows = gather_objects(release)  # the teacher release as every rank saw it
            record["teacher_release"] = {k: [int(r[k]) for r in rows] for k in ("freed_partition_bytes", "teacher_params_alive", "rss_before", "rss_after")}
        if step % cfg.output.log_every == 0 or step == self.plan.total_steps or "teacher_release" in record:  # the release: logged once, whatever log_every
            self.metrics.log(step, record)
        return step

    def after_step(self, phase: Phase, step: int) -> None:
        """What falls due at ``step``: an evaluation, waypoint exports, a checkpoint."""
        cfg, out = self.cfg, self.cfg.output
        if cfg.eval.every and step % cfg.eval.every == 0 and step < self.plan.total_steps:
            scores = self.evaluate("student")
            self.metrics.log(step, {"tokens": self.state.tokens_seen, **self.task.step_metrics(scores)})
        if phase.guidance == "trajectory" and out.export_teacher_every and step % out.export_teacher_every == 0:
            # The trajectory teacher's checkpoints: the waypoints of a later waypoint-guided run.
            export_model(self.models.teacher_engine, self.task.tokenizer, self.run_dir / "teacher_waypoints" / f"step_{step:08d}", is_main=self.env.is_main)
        if out.export_student_every and step % out.export_student_every == 0:
            self.models.export(self.task.tokenizer, self.run_dir / "student_waypoints" / f"step_{step:08d}", is_main=self.env.is_main)
        if step % out.save_every == 0 or step == self.plan.total_steps:
            self.save(step)

    def save(self, at: int) -> None:
        self.state.record_peak(gather_objects(peak_memory_bytes()))  # the checkpoint carries the run's peak so far
        save_checkpoint(
            self.models.student_engine, self.run_dir / "checkpoints", at,
            {
                **self.state.as_dict(), "guide": self.guide.state(), OPTIMIZER_GROUPS: [g.get("name") for g in self.models.student_engine.optimizer.param_groups],
                PHASES_RUN: [[p.name, p.start, min(p.end, at)] for p in self.plan.phases if p.start < at],
            },
            self.cfg.output.keep_last,
            exclude_frozen=self.models.checkpoint_excludes_frozen, also_save=self.guide.save, owner=self.models.checkpoint_owner,
        )
        self.metrics.sync()
        self.state.last_saved = at

    def stop_preempted(self, step: int, signal_name: str) -> None:
        """Preempted (SLURM's warning signal, SIGTERM): a complete checkpoint at this step, then out.
        At step 0 nothing has trained: nothing to save, and nothing claimed saved."""
        if step == 0:
            raise Preempted(None, signal_name)
        if self.state.last_saved != step:
            self.save(step)
        if self.env.is_main:
            atomic_write_text(self.run_dir / "preempted.json", json.dumps({"step": step, "signal": signal_name}))
        raise Preempted(step, signal_name)

    def finish(self, step: int, preempted: Callable[[], str | None] | None = None) -> dict:
        """5. End point: evaluate, export the student in HF format, report. ``preempted()`` (a
        collective) names a preemption signal that came during the evaluation: the run then stops
        with the checkpoint of its last step, and the requeued job evaluates and exports."""
        cfg, env, models = self.cfg, self.env, self.models
        after = self.evaluate("student")
        # A trajectory teacher has moved: score where it ended (its drift is part of the result).
        teacher_after = self.evaluate("teacher") if self.plan.trains_teacher and models.teacher is not None else None
        if preempted is not None and (signal_name := preempted()):
            self.stop_preempted(step, signal_name)
        export_dir = models.export(self.task.tokenizer, self.run_dir / "student", is_main=env.is_main)  # pipeline: every stage its own shard
        if cfg.output.export_bamba and env.is_main:
            export_bamba(export_dir, self.run_dir / "bamba")
        summary = self.task.summary(self.baseline["teacher"], self.baseline["student_before"], after, teacher_after)
        report = self.report(step, summary, export_dir)
        if env.is_main:
            write_report(self.run_dir, report)
            self.metrics.log(step, {"tokens": self.state.tokens_seen, **self.task.step_metrics(after)})
            self.metrics.summary({k: v for k, v in report.items() if isinstance(v, (int, float))})
        barrier()
        return report

    def _earlier_end_peak(self) -> list[dict]:
        """The peak an earlier session of this run reported at its end (its final evaluation and
        export came after its last checkpoint, which carries the peak only up to then)."""
        previous = self.run_dir / "report.json"
        if not (self.first_step and previous.is_file()):  # a run started afresh: an older report is another run's
            return []
        try:
            return [read_json(previous).get("peak_memory") or {}]
        except (OSError, ValueError):
            return []

    def report(self, step: int, summary: dict, export_dir: Path) -> dict:
        """The run's report: what ran and what it cost, and the task's scores (``summary``)."""
        cfg, state = self.cfg, self.state
        return {
            "teacher": cfg.teacher.name_or_path,
            "teacher_source": str(self.task.source),
            "mixer": cfg.student.conversion.mixer,
            "phases": [p.describe() for p in self.plan.phases],
            "world_size": self.env.world_size,
            "steps": step,
            "tokens_seen": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
            "nan_skipped": state.nan_skipped,
            "steps_skipped": state.steps_skipped,
            "task": cfg.task.kind,
            **summary,
            "scored_in": {"starting_point": self.baseline.get("dtype"), "end": cfg.teacher.dtype},
            "teacher_release": self.guide.release_stats,
            "wall_seconds_this_session": time.time() - self.started,
            "session_started_at_step": self.first_step,  # > 0: the run was resumed, and its wall time spans sessions
            "memory": peak_memory_bytes(),
            "memory_per_rank": (per_rank := gather_objects(peak_memory_bytes())),  # this session's
            "peak_memory": state.record_peak(per_rank + self._earlier_end_peak()),  # the largest rank's, over every session of the run
            "student_dir": str(export_dir),
            "config": to_dict(cfg),
        }


def _ds_config(cfg: RunConfig, path: str | Path, world_size: int, *, bf16_here: bool | None = None) -> dict:
    """The run's ds_config, read and filled from the run config: the pipeline's (ZeRO 0/1) in
    pipeline mode, else ZeRO-3's. ``bf16_here``: as ``resolve_ds_config``."""
    if cfg.train.pipeline_stages > 0:  # NOTE: imported only when used (DeepSpeed's pipeline engine)
        from .engines.pipeline import load_pipeline_ds_config

        return load_pipeline_ds_config(path, cfg.train, world_size, bf16_here=bf16_here)
    return resolve_ds_config(load_ds_config(path), cfg.train, world_size, bf16_here=bf16_here)


def as_recorded(cfg: RunConfig, ds_config_path: str | Path, world_size: int) -> RunConfig:
    """``cfg`` as a run on this machine records it in its config.json (teacher.dtype resolved):
    what a benchmark compares a finished run folder with before it reuses it."""
    return with_compute_dtype(cfg, _ds_config(cfg, ds_config_path, world_size))


def check_ds_config(cfg: RunConfig, path: str | Path) -> None:
    """The ds_config read and filled as the run will (``--print_config``, which the SLURM scripts
    call before they launch): a missing file, a typo, the other mode's config, a contradiction
    or a teacher.dtype the engines will not compute in stops the job there, in one line. Checked
    for the fewest ranks the run takes (a batch that does not split over them splits over no
    more), and for both kinds of accelerator: the run's is not known here (a login node). The
    installed DeepSpeed must be the tested release, as the job's start checks it."""
    check_deepspeed_version()
    world = max(1, cfg.train.pipeline_stages)
    possible = {compute_dtype(_ds_config(cfg, path, world, bf16_here=True))}
    try:
        possible.add(compute_dtype(_ds_config(cfg, path, world, bf16_here=False)))
    except ConfigError:  # bf16 asked for explicitly: the run needs a bf16 accelerator (refused elsewhere)
        pass
    names = sorted(dtype_name(dtype) for dtype in possible)
    if cfg.teacher.dtype not in ("auto", *names):
        raise ConfigError(
            f"teacher.dtype={cfg.teacher.dtype}, but the engines compute in {' or '.join(names)} (the ds_config's bf16/fp16 "
            "sections decide): set teacher.dtype=auto, or change the ds_config's bf16/fp16 \"enabled\""
        )


def with_compute_dtype(cfg: RunConfig, ds_config: dict) -> RunConfig:
    """``cfg`` with teacher.dtype resolved to the precision the engines compute in (the resolved
    ds_config's): config.json then says what the run computed in, and ``cald-scale evaluate``
    scores its student in it. Another explicit teacher.dtype would have no effect: refused."""
    engines = dtype_name(compute_dtype(ds_config))
    if cfg.teacher.dtype not in ("auto", engines):
        sections = "its bf16 and fp16 sections are off" if engines == "float32" else f"its {'bf16' if engines == 'bfloat16' else 'fp16'} section is on"
        raise ConfigError(
            f"teacher.dtype={cfg.teacher.dtype}, but the engines compute in {engines} ({sections}; the ds_config's precision decides): "
            f"set teacher.dtype=auto (or {engines}), or change the ds_config's bf16/fp16 \"enabled\""
        )
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dtype=engines))


def _check_same_inputs(run_dir: Path, env: DistEnv, task, plan: PhasePlan, *, resumed_at: int | None) -> None:
    """A resume reads the data, teacher, student.init_from and waypoints its first session read."""
    _check_same_data(run_dir, env, task.data_identity(), resumed_at=resumed_at)
    models_read = {
        "teacher": task.source.identity(),
        **({"init_from": task.student_source.identity()} if task.student_source else {}),
        **({"waypoints": [weights_fingerprint(w) for w in plan.waypoints]} if plan.waypoints else {}),
    }
    _check_same_teacher(run_dir, env, models_read, resumed_at=resumed_at)


def _build_mode(cfg: RunConfig, ds_config: dict, task, plan: PhasePlan, *, outside_groups: bool, first_step: int):
    """(models, guide, step function) of the run's mode. Both modes answer the same calls
    (apply_phase, perplexity, export): ZeRO-3's engines (``engines/models.py``) or the pipeline's
    stages (``engines/pipeline.py``). ``first_step``: the first step a teacher may guide."""
    if cfg.train.pipeline_stages > 0:
        from .engines.pipeline import PipelineGuide, build_pipeline, pipeline_train_step

        models = build_pipeline(cfg, ds_config, task.source, plan, outside_groups=outside_groups, first_step=first_step)
        return models, PipelineGuide(plan, models, base_weights=str(task.source.folder)), pipeline_train_step
    models = build_models(
        cfg, ds_config, task.source, plan, student_source=task.student_source, outside_groups=outside_groups, first_step=first_step,
    )
    guide = Guide(plan, models.managed_teacher, base_weights=str(task.source.folder), shared_param_ids=models.shared_param_ids, first_step=first_step)
    return models, guide, train_step


def _start(
    cfg: RunConfig, ds_config_path: str | Path, env: DistEnv, *, stop_requested: Callable[[torch.device], str | None] = lambda device: None,
) -> _Run:
    """Steps 1-3 of a run: the task and its data, both models in their engines, and the
    starting point (the last complete checkpoint, or the converted student evaluated).
    ``stop_requested`` (collective): a preemption signal received so far, checked before the baselines."""
    allocator = configure_host_allocator(cfg.train.malloc_mmap_threshold)
    logger.info("host allocator: %s", allocator)
    run_dir = Path(cfg.output.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ds_config = _ds_config(cfg, ds_config_path, env.world_size)
    cfg = with_compute_dtype(cfg, ds_config)
    logger.info("teacher and student compute in %s (the ds_config's bf16/fp16 sections)", cfg.teacher.dtype)
    # Before the engines: a ZeRO-3 checkpoint saved on another number of ranks loads through DeepSpeed's
    # universal format; one of another mode, pipeline layout or global batch is refused.
    tags = complete_tags(ckpt_dir)
    dp = cfg.train.data_parallel_size(env.world_size)
    resume = plan_resume(
        tags, dp, global_batch=ds_config["train_batch_size"], pipeline_stages=cfg.train.pipeline_stages,
        partition=(ds_config.get("pipeline") or {}).get("partition", "uniform"),
    )
    ds_config = resume.ds_config(ds_config)
    plan = cfg.plan(dp)
    if env.is_main:
        _warn_joined_groups(resume, plan, cfg.student.trainable)
    # NOTE: the newest complete checkpoint, which the resume loads unless it is damaged (then an older one).
    newest = tags[0][0] if tags else None
    cfg = _keep_recorded_caches(run_dir, cfg, resuming=newest is not None)
    changed = _check_run_dir(run_dir, cfg, resuming_at=newest, replicas=dp)
    started = time.time()
    for phase in plan.phases:
        logger.info("%s", phase.describe())

    # 1. The task: teacher source (config, tokenizer, lazy weights) and data; held-out sets.
    task = open_task(cfg, is_main=env.is_main)
    check_waypoints(plan.waypoints, task.source.config)  # a missing or foreign waypoint fails now, not mid-run
    task.open_data()
    _check_same_inputs(run_dir, env, task, plan, resumed_at=newest)  # before the engines: a refusal costs seconds
    task.train_batches(cfg.train.micro_batch(dp), 0, dp, torch.device("cpu"))  # a train split under one global batch: refused now too
    _seed_everything(cfg.train.seed)

    # 2. Teacher (when a phase needs one) and student, built partitioned, in their ZeRO-3 engines
    #    (pipeline mode: stage k builds blocks [a_k, b_k) of both, in one PipelineEngine).
    #    Both modes answer the same calls (apply_phase, perplexity, export) and have a step function.
    # A resume past the last guided step (a hybrid after its switch) builds no teacher: decided from
    # the oldest checkpoint kept (a damaged newer one falls back to it), the baseline scored.
    # NOTE: every rank decides alike (a shared file system may show the file to some ranks first):
    # one that scored the baseline again alone would wait in its collectives for the others.
    scored = bool(tags) and all_true((run_dir / "baseline.json").is_file(), env.device)
    teacher_from = min(s for s, _ in tags) if scored else 0
    if plan.uses_teacher and not plan.teacher_needed_from(teacher_from):
        logger.info("resuming at step %d or later, past the last step a teacher guides: no teacher is built", teacher_from)
    models, guide, step_fn = _build_mode(cfg, ds_config, task, plan, outside_groups=resume.outside_groups, first_step=teacher_from)
    student_engine = models.student_engine
    if cfg.output.export_bamba:
        try:
            check_exportable(models.student_model)  # before any training, not after it
        except BambaExportError as err:
            raise ConfigError(
                f"output.export_bamba=true, but Bamba cannot express this student: {err.reason}. Leave it false: the run's "
                "student/ folder is the student's export (load it with `import cald_scale` + AutoModelForCausalLM)"
            ) from None
    # Data is sharded over model replicas: every rank under ZeRO-3, every pipeline otherwise.
    replica, replicas = models.data_parallel_rank, models.data_parallel_size

    # 3. Resume, or evaluate the starting point of a fresh run.
    saved = load_latest_checkpoint(
        student_engine, ckpt_dir, frozen_excluded=models.checkpoint_excludes_frozen, also_load=guide.restore, tags=tags, source=resume.source,
    ) or {}
    saved = resume.finish(student_engine, saved, micro_batch=cfg.train.micro_batch(replicas), grad_accum=cfg.train.grad_accum, teacher_engine=getattr(models, "teacher_engine", None))
    _check_phases_run(run_dir, saved, plan, student_engine.global_steps)
    # NOTE: a checkpoint's optimizer groups carry the weight decay and betas they were saved with;
    # a resume that changes them (recorded as changed) applies them from here on.
    set_decay_and_betas(student_engine, cfg.train.weight_decay, cfg.train.betas)
    # Only now, with the checkpoint loaded, does the folder say this run's settings: a resume that fails to load changes nothing.
    resumed_at = student_engine.global_steps if saved else None
    _record(run_dir, cfg, env, resumed_at=resumed_at, changed=changed, finished=resumed_at is not None and resumed_at >= plan.total_steps)
    evaluate = task.evaluator(models, replica, replicas)
    if cfg.debug.signal_after_build and env.is_main:
        os.kill(os.getpid(), getattr(signal, cfg.debug.signal_after_build))
    # A signal that came while the engines were built stops the run here, not after both models are
    # scored (minutes on a large one, past SLURM's KillWait): nothing has trained in this session.
    if signal_name := stop_requested(student_engine.device):
        raise Preempted(None, signal_name, resumed_at=resumed_at)

    def score_starting_point() -> dict:
        teacher = _finite_teacher_scores(evaluate("teacher"), task.source) if plan.uses_teacher else None
        return {"teacher": teacher, "student_before": evaluate("student"), "dtype": cfg.teacher.dtype}

    baseline = _once(run_dir / "baseline.json", env, score_starting_point, resuming=bool(saved) and scored)
    _warn_if_scored_otherwise(baseline, cfg.teacher.dtype, run_dir / "baseline.json")
    step = student_engine.global_steps
    state = StepState(saved, last_saved=step, max_consecutive_nan=cfg.train.max_consecutive_nan, ckpt_dir=ckpt_dir)
    logger.info(
        "%s run at step %d/%d on %d rank(s); teacher: %s; converted student: %s",
        "resuming" if saved else "starting", step, plan.total_steps, env.world_size,
        task.headline(baseline["teacher"]) if baseline["teacher"] else "n/a (unguided)", task.headline(baseline["student_before"]),
    )
    micro_batch = cfg.train.micro_batch(replicas)
    next_batch = task.train_batches(micro_batch, replica, replicas, student_engine.device)
    metrics = MetricsLogger(
        run_dir, enabled=env.is_main, wandb_mode=cfg.output.wandb, project=cfg.output.wandb_project, config=cfg.to_dict(),
        total_steps=plan.total_steps, start_step=step, progress_bar=cfg.output.progress_bar,
    )
    return _Run(
        cfg=cfg, env=env, plan=plan, task=task, models=models, guide=guide, step_fn=step_fn, evaluate=evaluate,
        baseline=baseline, state=state, metrics=metrics, next_batch=next_batch,
        tokens_per_micro=task.tokens_per_micro_batch(micro_batch) * replicas, first_step=step, started=started,
    )


if __name__ == "__main__":  # NOTE: `deepspeed --module cald_scale.train` would "succeed" on every rank having done nothing
    raise SystemExit("cald_scale.train is the training library; run the job with `python -m cald_scale.launch` (or `cald-scale train`, `deepspeed --module cald_scale.launch`)")
