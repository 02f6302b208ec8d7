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
