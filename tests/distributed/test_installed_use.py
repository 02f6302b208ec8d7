"""cald_scale used as an installed package, from a folder that is no checkout (helper-90): the
training command is a module of the package, and the shipped ds_configs are found by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from launcher import free_port, launcher_env, metrics

pytestmark = pytest.mark.distributed


def test_deepspeed_module_trains_from_a_folder_that_is_no_checkout(tmp_path, teacher_dirs, data_cache):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"train.max_steps": 2, "output.save_every": 2})
    env = launcher_env(tmp_path)  # PYTHONPATH: the package, as an install would give it
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "cald_scale.launch", "--ds_config", "zero3", *overrides]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(metrics(run_dir)) == [1, 2] and (run_dir / "student" / "config.json").is_file()
    assert not any(elsewhere.iterdir()), sorted(p.name for p in elsewhere.iterdir())  # nothing written where it was started

    # The one-process command takes the same arguments; the training library run as a script says what to run.
    said = subprocess.run([sys.executable, "-m", "cald_scale", "train", "--print_config", "--ds_config", "ds_configs/pipeline.json", "train.pipeline_stages=2"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert said.returncode == 0 and "pipeline_stages: 2" in said.stdout, said.stderr[-2000:]
    library = subprocess.run([sys.executable, "-m", "cald_scale.train"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert library.returncode == 1 and "python -m cald_scale.launch" in library.stderr


_LIBRARY_USE = r"""
import json, logging, os, sys

import torch.distributed as dist

from cald_scale.config import load_run_config
from cald_scale.train import train

overrides = json.loads(sys.argv[1])
handlers = len(logging.getLogger().handlers)
seen = []
for run in ("first", "second"):  # twice in one process, as a notebook would
    report = train(load_run_config(None, [o.replace("RUN", run) for o in overrides]), "zero3")
    seen.append({"steps": report["steps"] if "steps" in report else None, "initialized": dist.is_initialized(),
                 "env": sorted(k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CALD_LAUNCH_ID") if k in os.environ),
                 "root_handlers_added": len(logging.getLogger().handlers) - handlers})
print("SEEN", json.dumps(seen))
from cald_scale.launch import leave
leave()  # as the README says a script that trained on gloo ends
"""


def test_train_called_from_python_leaves_the_process_as_it_found_it(tmp_path, teacher_dirs, data_cache):
    """`cald_scale.train.train(cfg, "zero3")` from a user's script or notebook: the rank variables
    set for a world of one are taken back afterwards and no logging handler is added, so the
    next tool in the process does not take itself for a rank; a second run in the same process
    works (it uses the process group the first left: DeepSpeed keeps its groups for the
    process's life; helper-90)."""
    import json

    overrides = tiny_overrides(teacher_dirs["llama"], tmp_path / "RUN", data_cache, **{"train.max_steps": 1, "output.save_every": 1})
    env = {k: v for k, v in launcher_env(tmp_path).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _LIBRARY_USE, json.dumps(overrides)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert [s["env"] for s in seen] == [["CALD_LAUNCH_ID"], ["CALD_LAUNCH_ID"]], seen  # the launch's id, no rank variable
    assert [s["root_handlers_added"] for s in seen] == [0, 0], seen
    assert (tmp_path / "first" / "student").is_dir() and (tmp_path / "second" / "student").is_dir()
