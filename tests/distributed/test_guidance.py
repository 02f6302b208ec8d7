"""The guidance modes as phases, under the real launcher with 2 CPU ranks and ZeRO-3.

Resume checks recreate on disk exactly what a job killed while saving step k+1 leaves
behind (complete checkpoints up to k, a half-written tag k+1, metrics up to k+1), then
rerun the same command; the real SIGKILL path itself is tests/distributed/test_zero3_training.py.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides
from launcher import deepspeed_command, launcher_env, metrics, resume_and_compare, run
from tiny_models import save_tiny_teacher

pytestmark = pytest.mark.distributed

STEPS = 6
HYBRID = "[{name: target, steps: 3, guidance: target}, {name: task_only, guidance: none}]"
TRAJECTORY = "[{name: trajectory, guidance: trajectory, trajectory: {lr: 1.0e-3, update_every: 1}}]"


def _waypoints(paths) -> str:
    return "[{name: waypoints, guidance: waypoint, waypoints: [" + ", ".join(str(p) for p in paths) + "]}]"


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _overrides(teacher_dirs, run_dir, data_cache, phases: str, **extra) -> list[str]:
    # student.trainable: the run config's default (mixers): with a frozen target the copied
    # weights are the teacher's own tensors, which must outlive the hybrid release.
    extra = {"output.save_every": 1, "output.keep_last": STEPS, "student.trainable": None, **extra}
    return tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, phases=phases, **extra)


def _resume_and_compare(reference, tmp_path, k, env, cmd_for, keys, **kwargs):
    return resume_and_compare(reference, tmp_path, k, env, cmd_for, keys, steps=STEPS, **kwargs)


def test_hybrid_releases_the_teacher_at_the_switch_and_resumes_across_it(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    ref = tmp_path / "hybrid"
    cmd_for = lambda run_dir: _overrides(teacher_dirs, run_dir, data_cache, HYBRID)  # noqa: E731
    _ok(run(deepspeed_command(cmd_for(ref)), env))
    history = metrics(ref)
    assert [history[s]["phase_name"] for s in range(1, STEPS + 1)] == ["target"] * 3 + ["task_only"] * 3
    assert all("layer" in history[s] for s in (1, 2, 3)) and not any("layer" in history[s] for s in (4, 5, 6))
    released = history[4]["teacher_release"]
    # Every rank freed its partitions, and no teacher parameter survives anywhere.
    assert released["teacher_params_alive"] == [0, 0]
    assert all(b > 0 for b in released["freed_partition_bytes"])
    report = json.loads((ref / "report.json").read_text())
    assert report["teacher_release"]["step"] == 3 and report["teacher_release"]["teacher_params_alive"] == 0
    # Killed while saving step 3 (resumes from step 2): one more guided step, then the switch.
    got = _resume_and_compare(ref, tmp_path, 2, env, cmd_for, ("loss", "ce", "layer"))
    assert got[4]["teacher_release"]["teacher_params_alive"] == [0, 0]
    # Killed while saving step 5, with the checkpoints of steps 3 and 4 kept (past the switch): no
    # teacher is built, the student holds its own copies of the frozen weights (the checkpoints
    # leave them out), and the steps are the reference's.
    no_teacher = "resuming at step 3 or later, past the last step a teacher guides: no teacher is built"
    _resume_and_compare(ref, tmp_path, 4, env, cmd_for, ("loss", "ce"), kept=2, logs=(no_teacher,))
    assert json.loads((tmp_path / "hybrid_resumed_from_4" / "report.json").read_text())["teacher_release"] is None
    # Pipeline mode (2 stages): the same steps; resumed past the switch, its stages hold no teacher pieces.
    # Logged every 5 steps: the release before step 4 is logged at its step all the same.
    pipe = tmp_path / "hybrid_pipeline"
    pipe_cmd = lambda run_dir: cmd_for(run_dir) + ["train.pipeline_stages=2", "output.log_every=5"]  # noqa: E731
    _ok(run(deepspeed_command(pipe_cmd(pipe), ds_config="ds_configs/pipeline.json"), env))
    piped, zero3 = metrics(pipe), metrics(ref)
    assert sorted(s for s in piped if "loss" in piped[s]) == [4, 5, 6] and "teacher_release" in piped[4]
    for step in (4, 5, 6):
        for key in ("loss", "ce", "layer"):
            if key in zero3[step]:
                assert piped[step][key] == pytest.approx(zero3[step][key], rel=1e-4), (step, key)
    _resume_and_compare(pipe, tmp_path, 4, env, pipe_cmd, ("loss", "ce"), kept=2, logs=(no_teacher,), ds_config="ds_configs/pipeline.json")
    assert json.loads((tmp_path / "hybrid_pipeline_resumed_from_4" / "report.json").read_text())["teacher_release"] is None


def test_trajectory_teacher_learns_and_resumes_mid_phase_then_guides_as_waypoints(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    ref = tmp_path / "trajectory"
    cmd_for = lambda run_dir: _overrides(teacher_dirs, run_dir, data_cache, TRAJECTORY, **{"output.export_teacher_every": 3})  # noqa: E731
    _ok(run(deepspeed_command(cmd_for(ref)), env))
    history = metrics(ref)
    assert history[STEPS]["teacher_ce"] < history[1]["teacher_ce"] - 0.05, "the trajectory teacher did not learn"
    assert (ref / "checkpoints" / "step_00000003" / "teacher").is_dir()
    _resume_and_compare(ref, tmp_path, 3, env, cmd_for, ("loss", "ce", "layer", "teacher_ce"))

    # The trajectory teacher's exported checkpoints guide a waypoint run, swapped in order.
    waypoints = [ref / "teacher_waypoints" / f"step_{s:08d}" for s in (3, 6)]
    wp_ref = tmp_path / "waypoint"
    wp_cmd = lambda run_dir: _overrides(teacher_dirs, run_dir, data_cache, _waypoints(waypoints))  # noqa: E731
    proc = run(deepspeed_command(wp_cmd(wp_ref)), env)
    _ok(proc)
    log = proc.stdout + proc.stderr
    assert log.index(f"teacher weights now from {waypoints[0]}") < log.index(f"teacher weights now from {waypoints[1]}")
    # Killed while saving step 4 (resumes from 3, the waypoint switch): the second waypoint is loaded again.
    _resume_and_compare(wp_ref, tmp_path, 3, env, wp_cmd, ("loss", "ce", "layer"))

    # Pipeline mode (2 stages): every stage swaps in its own pieces of each waypoint; the same trajectory.
    wp_pipe = tmp_path / "waypoint_pipeline"
    proc = run(deepspeed_command(wp_cmd(wp_pipe) + ["train.pipeline_stages=2"], ds_config="ds_configs/pipeline.json"), env)
    _ok(proc)
    log = proc.stdout + proc.stderr
    assert log.index(f"teacher weights now from {waypoints[0]}") < log.index(f"teacher weights now from {waypoints[1]}")
    piped, zero3 = metrics(wp_pipe), metrics(wp_ref)
    for step in range(1, STEPS + 1):
        for key in ("loss", "ce", "layer", "grad_norm"):
            assert piped[step][key] == pytest.approx(zero3[step][key], rel=1e-4), (step, key)


def test_bad_waypoints_fail_before_training_naming_the_checkpoint(tmp_path, teacher_dirs, data_cache, real_tokenizer):
    """A good waypoint, a missing one and one of another geometry: one error names both bad ones."""
    env = launcher_env(tmp_path)
    missing = tmp_path / "no_such_checkpoint"
    other = save_tiny_teacher(tmp_path / "two_layers", "llama", real_tokenizer, layers=2)
    proc = run(deepspeed_command(_overrides(teacher_dirs, tmp_path / "bad", data_cache, _waypoints([teacher_dirs["llama"], missing, other]))), env)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "error: 2 of the 3 waypoints cannot guide this run" in log and "Traceback" not in log
    assert f"teacher checkpoint {missing} does not exist" in log
    assert f"teacher checkpoint {other} does not match the teacher (num_hidden_layers: 2 vs 3)" in log
    assert f"teacher checkpoint {teacher_dirs['llama']} " not in log  # the good one is not blamed
    assert not metrics(tmp_path / "bad")


def test_unguided_builds_no_teacher(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    unguided = tmp_path / "unguided"
    overrides = tiny_overrides(teacher_dirs["llama"], unguided, data_cache, phases="[{name: unguided, guidance: none}]", **{"train.max_steps": 3})
    proc = run(deepspeed_command(overrides), env)
    _ok(proc)
    report = json.loads((unguided / "report.json").read_text())
    assert report["ppl_teacher"] is None and "n/a (unguided)" in proc.stdout + proc.stderr
    assert all(set(r) >= {"ce"} and "layer" not in r for r in metrics(unguided).values())
    # (Alignment with the copied weights frozen, then everything training: the NaN run in test_zero3_training.py.)


def test_the_shipped_recipe_aligns_then_trains_end_to_end_only_the_mixers(default_recipe_run):
    history = metrics(default_recipe_run)
    assert [history[s]["phase_name"] for s in range(1, STEPS + 1)] == ["align"] * 4 + ["end_to_end"] * 2
    assert all(set(history[s]["lr_groups"]) <= {"mixers", "mixers_no_decay"} for s in history)
    report = json.loads((default_recipe_run / "report.json").read_text())
    assert report["ppl_student_after"] < report["ppl_student_before"]
