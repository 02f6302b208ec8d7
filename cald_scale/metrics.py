"""Rank-0 metrics: JSON lines file, offline wandb run, tqdm progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

__all__ = ["MetricsLogger", "json_safe", "peak_memory_bytes", "current_rss_bytes"]

logger = logging.getLogger("cald_scale.metrics")


def peak_memory_bytes() -> dict[str, int]:
    """Peak accelerator allocation (if any) and peak resident memory of this process."""
    import resource

    import torch

    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def current_rss_bytes() -> int:
    """Resident memory of this process now (not the peak)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_PRIVACY = {"online": 0, "offline": 1, "disabled": 2}


def _wandb_mode(configured: str) -> str:
    """``output.wandb``, or ``WANDB_MODE`` where it keeps more to this machine (offline,
    disabled). A shell's ``WANDB_MODE=online`` never sends a run configured offline."""
    raw = os.environ.get("WANDB_MODE")
    if raw is None:
        return configured
    env = {"dryrun": "offline"}.get(raw.strip().lower(), raw.strip().lower())  # wandb's own synonym
    if env == configured:
        return configured
    if env not in _PRIVACY:
        # NOTE: whatever it meant, it did not ask to send more: at most offline.
        kept = max(configured, "offline", key=_PRIVACY.get)
        logger.warning("WANDB_MODE=%r is no wandb mode (%s): wandb runs %s", os.environ["WANDB_MODE"], "/".join(_PRIVACY), kept)
        return kept
    if _PRIVACY[env] > _PRIVACY[configured]:
        logger.info("wandb %s: WANDB_MODE=%s keeps more on this machine than output.wandb=%s", env, env, configured)
        return env
    logger.warning("WANDB_MODE=%s is ignored: output.wandb=%s holds (set output.wandb to send runs online)", env, configured)
    return configured


class MetricsLogger:
    """Writes on rank 0 only; every other rank gets a no-op logger."""

    def __init__(self, run_dir: Path, *, enabled: bool, wandb_mode: str, project: str, config: dict, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        relogged = self._drop_steps_after(start_step, final=start_step >= total_steps)
        wandb_mode = _wandb_mode(wandb_mode)
        if wandb_mode != "disabled":
            run_id = _wandb_id(Path(run_dir))
            # NOTE: wandb ignores a step below the run's last one, so steps logged again after a
            # resume would keep the abandoned session's values there: rewind the run to the
            # checkpoint's step instead (plain resume where nothing is logged again, or as a fallback).
            attempts = ([{"resume_from": f"{run_id}?_step={start_step}"}] if relogged else []) + [{"resume": "allow", "id": run_id}]
            for attempt in attempts:
                try:
                    import wandb

                    os.environ.setdefault("WANDB_SILENT", "true")
                    # NOTE: wandb validates WANDB_MODE itself, whatever mode= says: an empty or unknown
                    # value (chosen over above) would turn the run off. The shell's value comes back after.
                    shell_mode = os.environ.get("WANDB_MODE")
                    os.environ["WANDB_MODE"] = wandb_mode
                    try:
                        self._wandb = wandb.init(
                            project=project, dir=str(run_dir), mode=wandb_mode, config=config, **attempt,
                        )
                    finally:
                        if shell_mode is None:
                            os.environ.pop("WANDB_MODE", None)
                        else:
                            os.environ["WANDB_MODE"] = shell_mode
                    break
                except Exception as err:  # noqa: BLE001 - logging must never kill a training run
                    logger.warning("wandb %s: %s", "disabled" if attempt is attempts[-1] else f"could not rewind ({attempt})", err)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="distill", dynamic_ncols=True, mininterval=1.0)

    def _drop_steps_after(self, step: int, *, final: bool = False) -> bool:
        """A resumed run logs again the steps after its checkpoint: the lines it wrote for them
        before it stopped go, so each step has one line (the one of the run that goes on).
        ``final``: the checkpoint is the run's last step, whose end-point evaluation is logged
        again (a finished run rerun, or one stopped during that evaluation): its line goes too.
        Returns whether any went (those steps are logged again)."""
        if not self.path.is_file():
            return False
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) < step or (_step_of(line) == step and not (final and _is_evaluation(line)))]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(kept))
            why = "logged again from the checkpoint" if step else "the run starts over: no complete checkpoint"
            logger.info("metrics.jsonl: dropped %d lines after step %d (%s)", len(lines) - len(kept), step, why)
        return len(kept) < len(lines)

    def _call_wandb(self, what: str, call) -> None:
        """wandb's service is a child process: a preemption signal sent to the whole job (SLURM)
        can stop it first. Its failure then stops wandb for the run, never the run itself."""
        if self._wandb is None:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - logging must never kill a training run
            logger.warning("wandb disabled (%s failed: %s: %s); metrics.jsonl keeps every step", what, type(err).__name__, err)
            self._wandb = None
            try:  # NOTE: now, or wandb's own exit hook meets the lost service again and prints its traceback
                import wandb

                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._call_wandb("log", lambda: self._wandb.log(metrics, step=step))
        if self._bar is not None:
            self._bar.n = step
            shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "ce", "layer", "kl", "tokens_per_s") if k in metrics}
            if "phase_name" in metrics:
                shown = {"phase": metrics["phase_name"], **shown}
            self._bar.set_postfix(shown, refresh=True)

    def sync(self) -> None:
        """Put the lines logged so far on disk (called at each checkpoint): a node that loses
        power after a checkpoint keeps the metrics of every step the checkpoint holds."""
        if self.enabled and self.path.is_file():
            with open(self.path, "rb+") as handle:
                os.fsync(handle.fileno())

    def summary(self, values: dict[str, Any]) -> None:
        self._call_wandb("summary", lambda: self._wandb.summary.update(values))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._call_wandb("finish", lambda: self._wandb.finish())
        self._wandb = None


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null: strict JSON, which jq, JavaScript and
    pandas' strict readers take (Python's json writes them as the non-standard NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _step_of(line: str) -> float:
    """A metrics line's step (an unreadable line, e.g. cut by a kill, sorts last and goes)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _is_evaluation(line: str) -> bool:
    """A metrics line of scores alone (an evaluation), not of a training step."""
    return "loss" not in json.loads(line)


def _wandb_id(run_dir: Path) -> str:
    """Stable wandb run id per run folder, so a resumed job continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file() and (recorded := path.read_text().strip()).isalnum():
        return recorded
    # NOTE: none yet, or one a crash left empty (written before atomically: wandb then refused
    # every later session's empty id and logged nothing): a new run id, written whole.
    import uuid

    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id, durable=True)
    return run_id
