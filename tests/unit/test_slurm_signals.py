"""The batch shell's signal forwarding (launch/slurm/common.sh) against real processes: a
SLURM warning signal that comes while the deepspeed launcher still starts the ranks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A stand-in rank with the command line the deepspeed launcher gives ours: Python starts, and
# only after a while takes USR1 (launch/train.py installs its handler first thing, after the
# interpreter's own start-up). It writes what happened to it.
RANK = textwrap.dedent(
    """
    import signal, sys, time
    out = sys.argv[1]
    time.sleep(float(sys.argv[2]))  # no handler yet: USR1 now would kill this process
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    open(out, "w").write(got[0] if got else "nothing")
    """
)


def _forward_while_starting(tmp_path: Path, launch_delay_s: float, handler_delay_s: float, *, rank_up: bool) -> tuple[str, str]:
    rank = tmp_path / "rank.py"
    rank.write_text(RANK)
    run_dir, seen = tmp_path / "run", tmp_path / "seen"
    script = textwrap.dedent(
        f"""
        set -euo pipefail
        source {REPO}/launch/slurm/common.sh
        CALD_RUN_DIR={run_dir}
        # The launcher: a moment before the rank exists, as deepspeed's runner and launch.py take;
        # like theirs, its own command line is not a rank's (the rank's arguments come by environment).
        export RANK_RUN_DIR_ARG=$(cald_run_dir_arg "$CALD_RUN_DIR")
        bash -c 'sleep {launch_delay_s}; exec {sys.executable} {rank} {seen} {handler_delay_s} --local_rank=0 "$RANK_RUN_DIR_ARG"' &
        launcher=$!
        if {"true" if rank_up else "false"}; then  # the rank's process is there (its Python not yet ready)
            until [ -n "$(cald_local_ranks "$CALD_RUN_DIR")" ]; do sleep 0.05; done
        fi
        cald_signal_local_ranks USR1 "$CALD_RUN_DIR" "$launcher"
        rc=0
        wait "$launcher" || rc=$?
        echo "rank exit $rc"
        """
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return done.stdout + done.stderr, seen.read_text() if seen.exists() else "no file"


def test_a_warning_signal_before_the_ranks_start_reaches_them_once_they_take_it(tmp_path):
    """No rank yet when the signal comes: it is passed on once one takes it (it was lost, and the
    job trained on to its time limit's SIGKILL)."""
    # 3 s: the first scan finds no rank long before one starts (it takes 0.2-0.3 s on a busy machine)
    log, seen = _forward_while_starting(tmp_path, launch_delay_s=3.0, handler_delay_s=0.0, rank_up=False)
    assert seen == "USR1" and "rank exit 0" in log, log
    assert "no rank of this run takes SIGUSR1 yet" in log, log


def test_a_rank_still_starting_python_is_not_killed_by_the_signal(tmp_path):
    """The rank exists but has no handler yet: sending then would kill it (the whole launch
    failing); the signal waits for the handler."""
    log, seen = _forward_while_starting(tmp_path, launch_delay_s=0.0, handler_delay_s=1.5, rank_up=True)
    assert seen == "USR1" and "rank exit 0" in log, log


def test_an_earlier_launchs_preemption_note_does_not_decide_this_ones_requeue(tmp_path):
    """The ranks stopped with the preempted code but wrote no note (a stop before their first
    step): a note left by an earlier launch (a scancel's SIGTERM) decided that this job ends
    rather than requeues; only a note this launch wrote counts."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    note = run_dir / "preempted.json"
    note.write_text('{"signal": "SIGTERM", "step": 4}')

    def end(launched_after_note: bool) -> str:
        script = textwrap.dedent(
            f"""
            source {REPO}/launch/slurm/common.sh
            unset SLURM_JOB_ID
            CALD_RUN_DIR={run_dir} CALD_PYTHON={sys.executable} CALD_SIGNALLED= CALD_REQUEUE_ASKED=
            CALD_LAUNCHED=$(( $(stat -c %Y {note}) {"+ 5" if launched_after_note else "- 5"} ))
            _cald_end_signalled "the ranks saved a checkpoint and stopped (exit 75)"
            """
        )
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 75, done.stdout + done.stderr
        return done.stdout

    assert "not a SLURM job, rerun to resume" in end(launched_after_note=True)  # stale: an unknown signal requeues
    assert "SIGTERM is not a requeue signal" in end(launched_after_note=False)  # this launch's own note decides


def test_two_jobs_on_one_node_whose_ids_differ_by_1000_get_two_ports():
    """The rendezvous port was 29500 + job id % 1000: job 2345 beside job 1345 on the same node
    took its port and failed at the start. Now the first port free there is taken from it."""
    import os
    import socket

    def port(job_id: int, **env) -> int:
        out = subprocess.run(
            ["bash", "-c", f"source {REPO}/launch/slurm/common.sh; cald_master_port"],
            env={**os.environ, "SLURM_JOB_ID": str(job_id), "CALD_PYTHON": sys.executable, **env}, capture_output=True, text=True, check=True,
        )
        return int(out.stdout)

    other_job = socket.socket()
    for taken in range(29900, 30500):  # the other job's rendezvous port
        try:
            other_job.bind(("", taken))
            break
        except OSError:
            continue
    with other_job:
        other_job.listen()
        job_id = 1000 + taken - 29500  # its port by the old rule
        mine = port(job_id)
        assert mine != taken and 29500 <= mine < 30500
        assert port(job_id, CALD_MASTER_PORT="31234") == 31234  # the user's choice stands
    assert port(job_id) == taken  # free again: the job's own


def _two_node_launch(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """``train_deepspeed.sbatch`` as a 2-node job would run it, up to the launcher: a stand-in
    ``deepspeed`` (beside the real Python) records the environment file it was handed."""
    import os

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    (venv / "python").chmod(0o755)
    seen = tmp_path / "handed"
    (venv / "deepspeed").write_text(f'#!/bin/bash\ncp "$DS_ENV_FILE" {seen}; stat -c %a "$DS_ENV_FILE" > {seen}.mode\n')
    (venv / "deepspeed").chmod(0o755)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        ["bash", str(REPO / "launch/slurm/train_deepspeed.sbatch"), f"output.run_dir={run_dir}", *overrides],
        env={**os.environ, "VENV": str(tmp_path / "venv"), "CALD_REPO": str(REPO), "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
             "CALD_MASTER_PORT": "29999", "HOME": str(tmp_path), **(env or {})},
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    return done, run_dir


def test_the_other_nodes_environment_file_holds_no_credentials_and_goes_at_the_end(tmp_path):
    """On several nodes the ranks elsewhere get their environment from a file deepspeed puts on
    the pdsh command line (readable by any user of the node) and logs: credentials stay out of
    it, it is the owner's alone, and it is deleted when the job ends (helper-91)."""
    secrets = {"HF_TOKEN": "hf_secret_1", "WANDB_API_KEY": "wandb_secret_2", "CALD_S3_SECRET": "s3_secret_3", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
               # the word inside a name, not a part of it (helper-104)
               "WANDB_APIKEY": "apikey_secret_4", "CALD_DBPASSWORD": "db_secret_5", "HF_HUB_TOKENS": "tokens_secret_6",
               # names with such a word that are no credential (helper-93)
               "TOKENIZERS_PARALLELISM": "false", "HF_TOKEN_PATH": "/shared/hf_token", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
    (tmp_path / ".deepspeed_env").write_text("# the user's own settings\nMY_SETTING=1\n\n")  # in HOME: appended, less what deepspeed cannot split
    done, run_dir = _two_node_launch(tmp_path, "student.conversion={mixer: mamba2}", env=secrets)  # braces in quotes are no shell's
    assert done.returncode == 0, done.stdout + done.stderr
    handed = (tmp_path / "handed").read_text()
    for kept in ("HF_HUB_OFFLINE=1", "WANDB_MODE=offline", "TOKENIZERS_PARALLELISM=false", "HF_TOKEN_PATH=/shared/hf_token", "HF_HUB_DISABLE_IMPLICIT_TOKEN=1", "MY_SETTING=1"):
        assert kept in handed, (kept, handed)  # what the ranks need still goes
    assert all("=" in line for line in handed.splitlines()), handed  # deepspeed splits every line at "="
    assert not any(value in handed for value in ("hf_secret_1", "wandb_secret_2", "s3_secret_3", "apikey_secret_4", "db_secret_5", "tokens_secret_6")), handed
    assert (tmp_path / "handed.mode").read_text().strip() == "600"
    assert not (run_dir / "logs" / "ds_env-4242").exists()


def test_a_run_folder_a_remote_shell_would_read_is_refused_on_several_nodes(tmp_path):
    """pdsh hands the command line to a shell on every other node; deepspeed quotes only
    arguments with spaces, so a `$(...)` in the run folder would run there. Refused before the launch."""
    done, _ = _two_node_launch(tmp_path, f"output.run_dir={tmp_path}/cost $(touch {tmp_path}/ran)")
    assert done.returncode == 2
    said = done.stderr + "".join(log.read_text() for log in tmp_path.glob("**/logs/cald-4242.0.log"))  # the job's log
    assert "a remote shell would read" in said and "train_srun.sbatch" in said, said
    assert not (tmp_path / "handed").exists() and not (tmp_path / "ran").exists()
