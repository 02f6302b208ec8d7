"""Run launch/train.py under the real deepspeed launcher with CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ports import free_port

REPO = Path(__file__).resolve().parents[2]


def deepspeed_command(overrides: list[str], ranks: int = 2, ds_config: str = "ds_configs/zero3.json") -> list[str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [
        launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
        "launch/train.py", "--ds_config", ds_config, *overrides,
    ]


def launcher_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",  # two ranks share two cores
        CALD_SCALE_CACHE=env.get("CALD_SCALE_CACHE", str(Path.home() / ".cache" / "cald_scale")),
        PYTHONPATH=str(REPO),
    )
    return env


def run(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> dict[int, dict]:
    """The metrics record of each step (the last, should a step appear twice)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record
    return out


def killed_copy(reference: Path, target: Path, k: int, *, kept: int | None = None) -> None:
    """``reference``'s run folder as a job killed while saving step k + 1 would have left it:
    complete checkpoints up to k (the last ``kept`` of them, as output.keep_last leaves them;
    None: all), a half-written tag k + 1, metrics up to k + 1, no report."""
    import shutil

    shutil.copytree(reference, target)
    complete = sorted(int(tag.name.split("_")[1]) for tag in (target / "checkpoints").glob("step_*") if int(tag.name.split("_")[1]) <= k)
    dropped = set(complete[: -kept] if kept else [])
    for tag in (target / "checkpoints").glob("step_*"):
        step = int(tag.name.split("_")[1])
        if step > k + 1 or step in dropped:
            shutil.rmtree(tag)
        elif step == k + 1:  # half-written: no manifest, a file cut short
            (tag / "cald_manifest.json").unlink()
            victim = max(tag.rglob("*.pt"), key=lambda p: p.stat().st_size)
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    (target / "checkpoints" / "latest").write_text(f"step_{k + 1:08d}")
    lines = [line for line in (target / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= k + 1]
    (target / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for path in ("report.json", "report.md", "student"):
        shutil.rmtree(target / path, ignore_errors=True) if (target / path).is_dir() else (target / path).unlink(missing_ok=True)


def resume_and_compare(
    reference: Path, tmp_path: Path, k: int, env: dict, cmd_for, keys, *, steps: int, kept: int | None = None, logs: tuple[str, ...] = (),
    ds_config: str = "ds_configs/zero3.json",
) -> dict[int, dict]:
    """Rerun ``cmd_for(folder)`` on a copy of ``reference`` killed while saving step k + 1 (keeping
    its last ``kept`` checkpoints): it must resume at step k, log the reference's values of
    ``keys`` for every later step, and say each of ``logs``."""
    import pytest

    resumed_dir = tmp_path / f"{reference.name}_resumed_from_{k}"
    killed_copy(reference, resumed_dir, k, kept=kept)
    proc = run(deepspeed_command(cmd_for(resumed_dir), ds_config=ds_config), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"resuming run at step {k}/{steps}" in proc.stdout + proc.stderr
    assert all(line in proc.stdout + proc.stderr for line in logs), [line for line in logs if line not in proc.stdout + proc.stderr]
    expected, got = metrics(reference), metrics(resumed_dir)
    # The lines the killed job wrote after its checkpoint were dropped: each step is logged once.
    logged = [r["step"] for r in map(json.loads, (resumed_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == sorted(set(logged)), logged
    for step in range(k + 1, steps + 1):
        assert got[step]["phase_name"] == expected[step]["phase_name"]
        present = [key for key in keys if key in expected[step]]
        assert present and all(key in got[step] for key in present), (step, present)
        for key in present:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    return got
