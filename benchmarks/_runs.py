"""Benchmarks made of whole training runs: launch ``launch/train.py``, reuse finished runs, read their curves.

A run is a name, the recipe/overrides that define it, and a run folder under
``benchmarks/runs/<benchmark>/`` (git-ignored). A folder whose report.json exists is a
finished run and is reused as long as its config is the same, so a long benchmark can be
stopped and rerun, and extended recipe by recipe.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import free_port

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "benchmarks" / "runs"
LAUNCH_FILE = "launch.json"
"""What a run folder was launched with beyond its config.json: ranks and DeepSpeed config."""


@dataclasses.dataclass
class Run:
    name: str
    overrides: list[str]
    recipe: str | None = None
    seed: int = 0
    ds_config: str = "ds_configs/zero3.json"

    def folder(self, benchmark: str) -> Path:
        return RUNS / benchmark / f"{self.name}_seed{self.seed}"


def launch(run: Run, benchmark: str, *, ranks: int = 1) -> dict:
    """Run (or reuse) one causal-LM training run; returns its curve (see ``curve``)."""
    return curve(launch_run(run, benchmark, ranks=ranks))


def launch_run(run: Run, benchmark: str, *, ranks: int = 1) -> Path:
    """Run (or reuse) one training run of any task; returns its finished run folder."""
    folder = run.folder(benchmark)
    args = [*run.overrides, f"train.seed={run.seed}", f"output.run_dir={folder}", "output.progress_bar=false"]
    if (folder / "config.json").is_file():
        # NOTE: an unfinished folder too: the job would resume it under whatever config it is given.
        _check_same_config(folder, run.recipe, args, run.ds_config, ranks)
        _check_same_launch(folder, run.ds_config, ranks)
    if (folder / "report.json").is_file():
        print(f"[{benchmark}] reusing {folder}", flush=True)
        _drop_checkpoints(folder)
        return folder
    launcher = str(Path(sys.executable).parent / "deepspeed")
    # A port of our own: two benchmarks (or a test run) may launch side by side.
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py", "--ds_config", run.ds_config]
    if run.recipe:
        cmd += ["--recipe", run.recipe]
    cmd += args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LAUNCH_FILE).write_text(json.dumps({"ranks": ranks, "ds_config": run.ds_config}))
    started = time.time()
    print(f"[{benchmark}] {run.name} seed {run.seed}: {' '.join(cmd[6:])}", flush=True)
    with open(folder / "launch.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name} (seed {run.seed}) failed with exit code {proc.returncode}; see {folder / 'launch.log'}")
    print(f"[{benchmark}] {run.name} seed {run.seed} done in {time.time() - started:.0f} s", flush=True)
    _drop_checkpoints(folder)
    return folder


def _drop_checkpoints(folder: Path) -> None:
    """A finished run is reused through its report, metrics and exports; its training checkpoints
    (~1.2 GB for the 135M student) are never read again. Kept, they filled the disk: 44 GB
    of them under benchmarks/runs/ after a week of benchmarks, measured."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def _check_same_config(folder: Path, recipe: str | None, args: list[str], ds_config: str, ranks: int) -> None:
    """A run folder (finished or not) is reused only for the config this benchmark asks for now,
    as the run records it (teacher.dtype resolved to the engines' precision)."""
    from cald_scale.config import config_differences, load_run_config
    from cald_scale.train import as_recorded

    wanted = as_recorded(load_run_config(REPO / recipe if recipe else None, args), REPO / ds_config, ranks)
    # Where the caches live changes no result (a folder from before stop 56 recorded them relative).
    ignore = ("output.run_dir", "output.progress_bar", "data.cache_dir", "classification.cache_dir", "teacher.cache_dir")
    differ = config_differences(json.loads((folder / "config.json").read_text()), wanted, ignore=ignore)
    if differ:
        raise RuntimeError(f"{folder} holds a run of another config ({'; '.join(differ[:5])}); move it away to rerun it")


def _check_same_launch(folder: Path, ds_config: str, ranks: int) -> None:
    """Nor is it reused for another number of ranks or another DeepSpeed config, which its
    config.json does not hold (a 2-rank run's speed and memory reported as a 1-rank one's)."""
    if (folder / LAUNCH_FILE).is_file():
        launched = json.loads((folder / LAUNCH_FILE).read_text())
    else:  # a folder from before launch.json: its report says the ranks, the ds_config is unknown
        report = folder / "report.json"
        launched = {"ranks": json.loads(report.read_text()).get("world_size", ranks) if report.is_file() else ranks, "ds_config": ds_config}
    wanted = {"ranks": ranks, "ds_config": ds_config}
    differ = [f"{k}: {launched.get(k)!r} -> {v!r}" for k, v in wanted.items() if launched.get(k) != v]
    if differ:
        raise RuntimeError(f"{folder} holds a run launched otherwise ({'; '.join(differ)}); move it away to rerun it")


def finished_on(folder: Path) -> str:
    """The day (UTC) a run folder's report was written: which sitting measured a reused run."""
    return datetime.datetime.fromtimestamp((folder / "report.json").stat().st_mtime, datetime.timezone.utc).date().isoformat()


def curve(folder: Path) -> dict:
    """Held-out perplexity against training tokens for every eval set, plus the teacher's and the run's totals."""
    report = json.loads((folder / "report.json").read_text())
    baseline = json.loads((folder / "baseline.json").read_text())
    points: dict[str, list[tuple[int, float]]] = {name: [(0, s["ppl"])] for name, s in baseline["student_before"].items()}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith("/ppl"):
                name = key.split("/")[1]
                points.setdefault(name, [])
                # a resumed run may log a step twice: keep the last value per token count
                points[name] = [p for p in points[name] if p[0] != record["tokens"]] + [(record["tokens"], value)]
    return {
        "folder": str(folder.relative_to(REPO)),
        "date": finished_on(folder),
        "tokens": report["tokens_seen"],
        "train_seconds": report["train_seconds"],
        # From the job's start (after imports, ~20 s) to its report: conversion, evaluations, training, export.
        "wall_seconds": report["wall_seconds_this_session"],
        # None in reports from before it was recorded
        "session_started_at_step": report.get("session_started_at_step"),
        "phases": report["phases"],
        "teacher": {name: s["teacher"] for name, s in report["eval_sets"].items()},
        "final": {name: s["student_after"] for name, s in report["eval_sets"].items()},
        # A teacher that trained alongside (trajectory guidance), scored at the end of the run.
        "teacher_after": {name: s["teacher_after"] for name, s in report["eval_sets"].items() if s.get("teacher_after") is not None},
        "curve": {name: sorted(p) for name, p in points.items()},
    }
