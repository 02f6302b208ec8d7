"""The project's batch scripts on a real single-node SLURM cluster: 2 tasks x 1 CPU, tiny models."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from launcher import REPO, launcher_env

pytestmark = pytest.mark.distributed

JOB_NAME = "cald-test"
# The scripts ask for GPU nodes; the test node has 2 CPUs and no GPUs.
NODE_OPTIONS = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0")


def _submit(cluster, script: str, tmp_path: Path, overrides: list[str], **extra_env: str) -> int:
    env = launcher_env(tmp_path)
    env.update(SLURM_CONF=str(cluster.conf), VENV=str(Path(sys.executable).parent.parent), **extra_env)
    options = (f"--job-name={JOB_NAME}", f"--output={tmp_path}/slurm-%j.out", *NODE_OPTIONS)
    # Submitted from the repository root: the batch script finds the code through SLURM_SUBMIT_DIR.
    return cluster.sbatch(REPO / "launch" / "slurm" / script, *options, args=overrides, env=env, cwd=REPO)


def _logged_steps(run_dir: Path) -> list[int]:
    """Every training step record in metrics.jsonl, in file order, repeats kept."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _explain(cluster, tmp_path: Path, run_dir: Path, job_id: int, info: dict) -> str:
    parts = [f"job {job_id}: {info}"]
    for path in [*sorted(tmp_path.glob(f"slurm-{job_id}.out")), *sorted((run_dir / "logs").glob("*.log"))]:
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts + [cluster.log_tail(1500)])


def _wait_for_steps(cluster, tmp_path: Path, run_dir: Path, job_id: int, steps: int) -> None:
    deadline = time.time() + 420
    while len(_logged_steps(run_dir)) < steps:
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, _explain(cluster, tmp_path, run_dir, job_id, info)
        time.sleep(0.5)


# Each batch script runs a whole job here: first start, preemption, requeue, resumed start to the end.
# (script, signal to the batch shell, the signal the ranks see): srun turns a TERM into SIGKILLs
# of its tasks, so that script passes TERM on as USR1; the deepspeed one signals the ranks itself.
# "job:TERM" is a SIGTERM to every process of the job (a preemption's grace time): the deepspeed
# launcher then ends at once while its ranks still save, and the batch shell waits for them.
# A SIGTERM requeues only where CALD_REQUEUE_ON names it (a cluster whose preemption cancels
# jobs); by default it is a scancel, which stops the job (test_a_cancelled_job_...).
# NOTE: srun's case is run with the time limit's SIGTERM arriving while the ranks still save after
# the USR1 warning; a USR1 alone takes the same path up to that TERM (a job costs ~60 s of CI here).
@pytest.mark.parametrize(
    "script, sent, seen",
    [
        ("train_srun.sbatch", "USR1+TERM", "SIGUSR1"),
        ("train_deepspeed.sbatch", "TERM", "SIGTERM"),
        ("train_deepspeed.sbatch", "job:TERM", "SIGTERM"),
    ],
)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, teacher_dirs, data_cache, script, sent, seen):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        # Slow steps so the signal lands mid-run; no periodic checkpoint: the one to resume from
        # is the preemption's own.
        **{"train.max_steps": 8, "output.save_every": 100, "output.log_every": 1, "debug.sleep_per_step": 1.0},
    )
    job_id = _submit(slurm_cluster, script, tmp_path, overrides, **({"CALD_REQUEUE_ON": "USR1 TERM"} if sent in ("TERM", "job:TERM") else {}))
    _wait_for_steps(slurm_cluster, tmp_path, run_dir, job_id, 2)
    if sent.startswith("job:"):
        sent = sent.removeprefix("job:")
        slurm_cluster.signal_job(job_id, sent)
    else:  # what `#SBATCH --signal=B:USR1@120` does before the time limit: a signal to the batch shell only
        first_signal, *later = sent.split("+")
        slurm_cluster.signal_batch(job_id, first_signal)
        for other in later:
            time.sleep(0.5)
            slurm_cluster.signal_batch(job_id, other)
        sent = first_signal

    info = slurm_cluster.wait(job_id, timeout=420)
    explain = _explain(slurm_cluster, tmp_path, run_dir, job_id, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", explain
    assert info["Restarts"] == "1", explain
    preempted = json.loads((run_dir / "preempted.json").read_text())
    stop = preempted["step"]
    assert preempted["signal"] == seen and 2 <= stop < 8, preempted

    # No lost and no repeated steps across the requeue; the second start resumed at the stop.
    assert _logged_steps(run_dir) == list(range(1, 9)), explain
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 8 and report["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{stop:08d}", "step_00000008"]
    first = (run_dir / "logs" / f"{JOB_NAME}-{job_id}.0.log").read_text()
    second = (run_dir / "logs" / f"{JOB_NAME}-{job_id}.1.log").read_text()
    assert "launch: " in first and "starting run at step 0" in first, first[-3000:]
    assert f"batch shell got SIG{sent}" in first and f"requeueing job {job_id}" in first, first[-3000:]
    assert f"resuming run at step {stop}" in second and "ranks exited with 0" in second, second[-3000:]
    # The job's own logs land in the run folder; SLURM's output file only points at them.
    assert f"cald: job log -> {run_dir}/logs/" in (tmp_path / f"slurm-{job_id}.out").read_text()


def test_srun_job_sigkilled_by_a_whole_job_sigterm_is_requeued_and_resumes_from_its_last_checkpoint(slurm_cluster, tmp_path, teacher_dirs, data_cache):
    """srun answers its own SIGTERM by SIGKILLing its tasks (Slurm's behaviour): no preemption
    checkpoint can be written, but the job goes back to the queue and resumes from the last
    periodic one, with no step logged twice."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        **{"train.max_steps": 6, "output.save_every": 2, "output.log_every": 1, "debug.sleep_per_step": 1.0},
    )
    job_id = _submit(slurm_cluster, "train_srun.sbatch", tmp_path, overrides, CALD_REQUEUE_ON="USR1 TERM")
    _wait_for_steps(slurm_cluster, tmp_path, run_dir, job_id, 3)
    slurm_cluster.signal_job(job_id, "TERM")

    info = slurm_cluster.wait(job_id, timeout=420)
    explain = _explain(slurm_cluster, tmp_path, run_dir, job_id, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", explain
    first = (run_dir / "logs" / f"{JOB_NAME}-{job_id}.0.log").read_text()
    assert "SIGTERM reached the job and the ranks exited with" in first and f"requeueing job {job_id}" in first, first[-3000:]
    second = (run_dir / "logs" / f"{JOB_NAME}-{job_id}.1.log").read_text()
    assert "resuming run at step 2" in second or "resuming run at step 4" in second, second[-3000:]
    assert _logged_steps(run_dir) == list(range(1, 7)), explain


def test_a_cancelled_job_stops_and_is_not_requeued(slurm_cluster, tmp_path, teacher_dirs, data_cache):
    """A plain `scancel` sends SIGTERM to the whole job: the user stops the run. The batch shell
    passed it on as a preemption and requeued the job, on every cancel (a review caught a job
    that could only be stopped while pending); by default a SIGTERM is no requeue signal."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        **{"train.max_steps": 8, "output.save_every": 2, "output.log_every": 1, "debug.sleep_per_step": 1.0},
    )
    job_id = _submit(slurm_cluster, "train_srun.sbatch", tmp_path, overrides)
    _wait_for_steps(slurm_cluster, tmp_path, run_dir, job_id, 3)
    slurm_cluster.cancel(job_id)
    info = slurm_cluster.wait(job_id, timeout=420)
    explain = _explain(slurm_cluster, tmp_path, run_dir, job_id, info)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", explain
    first = (run_dir / "logs" / f"{JOB_NAME}-{job_id}.0.log").read_text()
    assert "SIGTERM is not a requeue signal (CALD_REQUEUE_ON=USR1" in first and "requeueing" not in first, first[-3000:]
    assert len(_logged_steps(run_dir)) < 8  # it stopped: nothing ran on
