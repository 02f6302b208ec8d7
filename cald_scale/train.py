"""The CALD training job: teacher -> converted student, distilled under two ZeRO-3 engines.

Read top to bottom: set up, build, evaluate the starting point, the flat step loop,
evaluate the end point, export and report. Rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .configuration import to_dict
from .conversion.teacher import open_teacher
from .data import PackedSequences, ShardedBatches, build_indexed_dataset, check_vocab
from .distill.step import LossParts, cald_forward, teacher_forced_step
from .engines.checkpoint import load_latest_checkpoint, save_checkpoint
from .engines.distributed import DistEnv, all_true, barrier, init_distributed
from .engines.host_memory import configure_host_allocator, return_free_memory
from .engines.models import DistillationModels, build_models
from .engines.zero3 import begin_step, load_ds_config, resolve_ds_config
from .eval.perplexity import eval_indices, perplexity
from .eval.report import write_report
from .export.hf import export_student
from .fileio import atomic_write_text
from .metrics import MetricsLogger, peak_memory_bytes

__all__ = ["train", "train_step", "NonFiniteLossError"]

logger = logging.getLogger("cald_scale.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_run_dir(run_dir: Path, cfg: RunConfig, env: DistEnv) -> None:
    """A run folder belongs to one teacher/student pair; refuse to resume a different one."""
    path = run_dir / "config.json"
    current = cfg.to_dict()
    if path.is_file():
        previous = json.loads(path.read_text())
        for section in ("teacher", "student"):
            if previous.get(section) != current.get(section):
                raise ValueError(
                    f"{run_dir} holds a run with a different {section} config ({previous.get(section)} vs "
                    f"{current.get(section)}); use a new output.run_dir or delete the old one"
                )
    barrier()
    if env.is_main:
        atomic_write_text(path, json.dumps(current, indent=2))
    barrier()


def _baseline(run_dir: Path, env: DistEnv, compute) -> dict:
    """Starting-point evaluations, computed once per run and reused on resume."""
    path = run_dir / "baseline.json"
    if path.is_file():
        return json.loads(path.read_text())
    values = compute()
    if env.is_main:
        atomic_write_text(path, json.dumps(values, indent=2))
    barrier()
    return values


def train_step(models: DistillationModels, input_ids: torch.Tensor, cfg: RunConfig, *, poison: bool = False) -> tuple[LossParts, bool]:
    """Forward and backward of one micro-batch on every rank; returns (loss parts, finite).

    A non-finite end-to-end loss is not back-propagated (the caller skips the micro-batch).
    In the teacher-forced schedule each stage is back-propagated as it is computed, and a
    non-finite stage alone is skipped. ``poison`` makes the loss NaN (fault-injection tests).
    """
    engine = models.student_engine
    agree = lambda flag: all_true(flag, engine.device)  # noqa: E731 - every rank must take the same branch
    begin_step(models.teacher_engine, engine)
    if cfg.train.schedule == "teacher_forced":
        parts = teacher_forced_step(
            models.teacher, models.student, input_ids, cfg.loss,
            backward=engine.backward, stage_size=cfg.train.stage_size, all_agree=agree,
        )
        return parts, agree(bool(torch.isfinite(parts.total)))
    parts = cald_forward(models.teacher, models.student, input_ids, cfg.loss, stage_size=cfg.train.stage_size, schedule=cfg.train.schedule)
    if poison:
        parts.total = parts.total * float("nan")
    if not agree(bool(torch.isfinite(parts.total))):
        return parts, False
    engine.backward(parts.total)
    return parts, True


def train(cfg: RunConfig, ds_config_path: str | Path) -> dict:
    env = init_distributed()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cald_scale").setLevel(logging.INFO if env.is_main else logging.WARNING)
    allocator = configure_host_allocator(cfg.train.malloc_mmap_threshold)
    logger.info("host allocator: %s", allocator)
    run_dir = Path(cfg.output.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ds_config = resolve_ds_config(load_ds_config(ds_config_path), cfg.train, env.world_size)
    _check_run_dir(run_dir, cfg, env)
    started = time.time()

    # 1. Teacher source (config, tokenizer, lazy weights) and data.
    source, tokenizer = open_teacher(cfg.teacher)
    corpus = build_indexed_dataset(cfg.data, tokenizer, is_rank0=env.is_main)
    check_vocab(corpus, source.config.vocab_size, str(source))
    train_set = PackedSequences(corpus, "train", cfg.data.seq_len)
    eval_set = PackedSequences(corpus, "eval", cfg.data.seq_len)
    _seed_everything(cfg.train.seed)

    # 2. Teacher and student, built partitioned, in their ZeRO-3 engines (the student trains).
    models = build_models(cfg, ds_config, source)
    student_engine = models.student_engine
    device = student_engine.device

    # 3. Resume, or evaluate the starting point of a fresh run.
    state = load_latest_checkpoint(student_engine, ckpt_dir, frozen_excluded=models.shares_frozen_weights) or {}
    indices = eval_indices(len(eval_set), cfg.eval.max_sequences, env.rank, env.world_size)

    def evaluate(model) -> dict:
        engines = (models.teacher_engine, student_engine)
        return perplexity(model, eval_set, indices, cfg.eval.micro_batch_size, device, before_batch=lambda: begin_step(*engines))

    baseline = _baseline(
        run_dir,
        env,
        lambda: {"teacher": evaluate(models.teacher), "student_before": evaluate(models.student), "eval_sequences": len(indices) * env.world_size},
    )
    cursor = int(state.get("micro_cursor", 0))
    tokens_seen = int(state.get("tokens_seen", 0))
    nan_skipped = int(state.get("nan_skipped", 0))
    train_seconds = float(state.get("train_seconds", 0.0))
    step = student_engine.global_steps
    logger.info(
        "%s run at step %d/%d on %d rank(s); teacher ppl %.2f, converted student ppl %.2f",
        "resuming" if state else "starting", step, cfg.train.max_steps, env.world_size,
        baseline["teacher"]["ppl"], baseline["student_before"]["ppl"],
    )

    # 4. The step loop: one optimizer step = grad_accum finite micro-batches.
    micro_batch = cfg.train.micro_batch(env.world_size)
    batches = ShardedBatches(len(train_set), micro_batch, env.rank, env.world_size, cfg.train.seed, grad_accum=cfg.train.grad_accum)
    metrics = MetricsLogger(
        run_dir,
        enabled=env.is_main,
        wandb_mode=cfg.output.wandb,
        project=cfg.output.wandb_project,
        config=cfg.to_dict(),
        total_steps=cfg.train.max_steps,
        start_step=step,
        progress_bar=cfg.output.progress_bar,
    )
    tokens_per_micro = micro_batch * cfg.data.seq_len * env.world_size
    consecutive_nan = 0
    last_saved = step
    try:
        while step < cfg.train.max_steps:
            t0 = time.time()
            sums = {"loss": 0.0, "ce": 0.0, "layer": 0.0, "kl": 0.0}
            per_layer = None
            done = 0
            while done < cfg.train.grad_accum:
                ids = torch.stack([train_set[i]["input_ids"] for i in batches.indices(cursor // cfg.train.grad_accum, cursor % cfg.train.grad_accum)]).to(device)
                parts, finite = train_step(models, ids, cfg, poison=cursor in cfg.debug.nan_at_micro_steps)
                cursor += 1
                if not finite:
                    nan_skipped += 1
                    consecutive_nan += 1
                    logger.warning("non-finite loss at step %d (micro-batch %d): skipped (%d in a row, %d in all)", step, cursor - 1, consecutive_nan, nan_skipped)
                    if consecutive_nan >= cfg.train.max_consecutive_nan:
                        raise NonFiniteLossError(
                            f"{consecutive_nan} non-finite losses in a row at step {step} (train.max_consecutive_nan="
                            f"{cfg.train.max_consecutive_nan}); stopped. The last complete checkpoint (step {last_saved}) "
                            f"in {ckpt_dir} is intact; lower train.lr or check the data, then rerun to resume."
                        )
                    if cfg.train.schedule != "teacher_forced":
                        continue  # nothing was back-propagated: draw the next micro-batch
                else:
                    consecutive_nan = 0
                student_engine.step()
                done += 1
                tokens_seen += tokens_per_micro
                for key, value in parts.as_floats().items():
                    sums[key] += value / cfg.train.grad_accum
                per_layer = parts.per_layer
            step = student_engine.global_steps
            return_free_memory()
            elapsed = time.time() - t0
            train_seconds += elapsed
            if cfg.debug.sleep_per_step:
                time.sleep(cfg.debug.sleep_per_step)
            record = {
                **sums,
                "lr": student_engine.get_lr()[0],
                "grad_norm": float(student_engine.get_global_grad_norm() or 0.0),
                "tokens": tokens_seen,
                "tokens_per_s": cfg.train.grad_accum * tokens_per_micro / max(elapsed, 1e-9),
                "nan_skipped": nan_skipped,
            }
            if per_layer is not None:
                record["layer_losses"] = per_layer
            if step % cfg.output.log_every == 0 or step == cfg.train.max_steps:
                metrics.log(step, record)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
                metrics.log(step, {"eval_student_ppl": evaluate(models.student)["ppl"]})
            if step % cfg.output.save_every == 0 or step == cfg.train.max_steps:
                state = {"micro_cursor": cursor, "tokens_seen": tokens_seen, "nan_skipped": nan_skipped, "train_seconds": train_seconds}
                save_checkpoint(student_engine, ckpt_dir, step, state, cfg.output.keep_last, exclude_frozen=models.shares_frozen_weights)
                last_saved = step

        # 5. End point: evaluate, export the student in HF format, report.
        after = evaluate(models.student)
        export_dir = export_student(student_engine, tokenizer, run_dir / "student", is_main=env.is_main)
        report = {
            "teacher": cfg.teacher.name_or_path,
            "teacher_source": str(source),
            "mixer": cfg.student.conversion.mixer,
            "world_size": env.world_size,
            "steps": step,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
            "train_tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
            "nan_skipped": nan_skipped,
            "ppl_teacher": baseline["teacher"]["ppl"],
            "ppl_student_before": baseline["student_before"]["ppl"],
            "ppl_student_after": after["ppl"],
            "ppl_improvement_x": baseline["student_before"]["ppl"] / after["ppl"] if after["ppl"] > 0 else math.inf,
            "eval_tokens": after["tokens"],
            "wall_seconds_this_session": time.time() - started,
            "memory": peak_memory_bytes(),
            "student_dir": str(export_dir),
            "config": to_dict(cfg),
        }
        if env.is_main:
            write_report(run_dir, report)
            metrics.summary({k: v for k, v in report.items() if isinstance(v, (int, float))})
        barrier()
        return report
    finally:
        metrics.close()
