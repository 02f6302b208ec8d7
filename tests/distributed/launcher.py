"""Run launch/train.py under the real deepspeed launcher with CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """Last metrics record per step (a resumed run rewrites the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record
    return out
