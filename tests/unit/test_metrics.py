"""MetricsLogger: one line per step across a resume, and a wandb that dies never stops the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from cald_scale.metrics import MetricsLogger


def _logger(run_dir: Path, start_step: int, wandb_mode: str = "disabled") -> MetricsLogger:
    return MetricsLogger(run_dir, enabled=True, wandb_mode=wandb_mode, project="cald-scale-tests", config={}, total_steps=10, start_step=start_step, progress_bar=False)


def test_a_resumed_run_drops_the_lines_logged_after_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)] + ['{"step": 8, "lo']  # the kill cut the last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = _logger(tmp_path, start_step=5)
    metrics.log(6, {"loss": 0.5})
    metrics.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_rerun_logs_its_end_point_evaluation_once(tmp_path):
    """Rerunning a finished run (or requeueing one stopped during its final evaluation) evaluates
    and logs the last step again: the earlier evaluation line of that step goes, its training line stays."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)] + [json.dumps({"step": 10, "eval/heldout/ppl": 40.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = _logger(tmp_path, start_step=10)  # total_steps=10
    metrics.log(10, {"eval/heldout/ppl": 39.0})
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11)) + [10]
    assert records[-2]["loss"] == 0.1 and records[-1]["eval/heldout/ppl"] == 39.0
    # A resume mid-run keeps the evaluation line logged at its checkpoint's step (not logged again).
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines[:4], json.dumps({"step": 4, "eval/heldout/ppl": 50.0}), *lines[4:6]]) + "\n")
    _logger(tmp_path, start_step=4).close()
    assert [json.loads(line).get("eval/heldout/ppl") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == 50.0


def _wandb_services() -> list[int]:
    """Processes of wandb's service under this one (its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"wandb" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_wandb_service_stopped_by_the_preemption_signal_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """SLURM signals every process of the job: wandb's service may die before the run saves."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = _logger(tmp_path, start_step=0, wandb_mode="offline")
    assert metrics._wandb is not None
    services = _wandb_services()
    assert services, "wandb started no service process to stop"
    for pid in services:
        os.kill(pid, signal.SIGTERM)
    time.sleep(2)
    with caplog.at_level(logging.WARNING, logger="cald_scale.metrics"):
        for step in range(1, 4):
            metrics.log(step, {"loss": 1.0})
        metrics.summary({"final": 1.0})
        metrics.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "wandb disabled" in caplog.text and metrics._wandb is None


def test_a_resumed_run_rewinds_its_wandb_run_to_the_checkpoint(tmp_path, monkeypatch):
    """wandb ignores steps below a run's last one: a resume that logs steps 6-7 again rewinds
    the run to step 5 (the real offline wandb, its init watched), and one that logs nothing again
    resumes plainly."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls, init = [], wandb.init

    def watched_init(**kwargs):
        calls.append({k: kwargs.get(k) for k in ("resume_from", "resume", "id")})
        return init(**kwargs)

    monkeypatch.setattr(wandb, "init", watched_init)
    first = _logger(tmp_path, start_step=0, wandb_mode="offline")
    for step in range(1, 8):
        first.log(step, {"loss": 1.0 / step})
    first.close()
    run_id = calls[0]["id"]
    resumed = _logger(tmp_path, start_step=5, wandb_mode="offline")
    assert resumed._wandb is not None and resumed._wandb.id == run_id
    resumed.close()
    assert calls[1] == {"resume_from": f"{run_id}?_step=5", "resume": None, "id": None}
    again = _logger(tmp_path, start_step=5, wandb_mode="offline")  # nothing after step 5 is left to log again
    again.close()
    assert calls[2] == {"resume_from": None, "resume": "allow", "id": run_id}


def test_a_shells_wandb_mode_never_sends_a_run_configured_offline(tmp_path, monkeypatch, caplog):
    """Many wandb users export WANDB_MODE=online in their profile: a run whose config says
    offline (the default, "needs no account") must stay offline; the environment may only
    keep more on the machine (disabled). The real wandb, offline: it reads WANDB_MODE itself,
    and an empty or unknown value there turned the run off after a warning that it ran offline."""
    cases = [  # WANDB_MODE, output.wandb, what runs, what the log says
        ("online", "offline", "offline", "WANDB_MODE=online is ignored"),
        ("disabled", "offline", None, ""),
        ("offline", "online", "offline", "keeps more on this machine"),
        ("dryrun", "online", "offline", "keeps more on this machine"),  # wandb's synonym of offline
        ("Offline", "offline", "offline", ""),
        ("", "offline", "offline", "is no wandb mode"),
        ("no-such-mode", "online", "offline", "is no wandb mode"),
    ]
    for i, (env, configured, runs, said) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        monkeypatch.setenv("WANDB_MODE", env)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cald_scale.metrics"):
            metrics = _logger(tmp_path / str(i), start_step=0, wandb_mode=configured)
        try:
            assert os.environ["WANDB_MODE"] == env  # the shell's own value, back once wandb has started (a later run reads it)
            assert (metrics._wandb.settings.mode if metrics._wandb is not None else None) == runs, (env, caplog.text)
            failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.getMessage().startswith("wandb disabled")]
            assert not failed and said in caplog.text and ("ignored" in caplog.text) == ("ignored" in said), (env, caplog.text)
        finally:
            metrics.close()


def test_metrics_lines_are_strict_json_with_null_for_non_finite_values(tmp_path):
    metrics = _logger(tmp_path, start_step=0)
    metrics.log(1, {"loss": float("nan"), "layer_losses": [1.0, float("inf"), None], "nested": {"x": float("-inf")}})
    metrics.close()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert record["loss"] is None and record["layer_losses"] == [1.0, None, None] and record["nested"] == {"x": None}


def test_sync_puts_the_metrics_file_on_disk(tmp_path, monkeypatch):
    """At each checkpoint the trainer syncs metrics.jsonl: a power loss after a checkpoint keeps
    the lines of every step it holds (a closed file is only in the page cache)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    metrics = _logger(tmp_path, start_step=0)
    metrics.sync()  # nothing logged yet: nothing to sync, no empty file made
    assert not (tmp_path / "metrics.jsonl").exists()
    metrics.log(1, {"loss": 1.0})
    monkeypatch.setattr(os, "fsync", recording_fsync)
    metrics.sync()
    metrics.close()
    assert synced == [str((tmp_path / "metrics.jsonl").resolve())]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1
