"""`cald-scale env`: what this machine gives a job, checked for real (versions, caches, locks,
the multi-node environment), with a failing line and exit status 1 where a job would stop."""

from __future__ import annotations

import json
import subprocess
import sys

import deepspeed
import torch

from cald_scale.env_report import collect


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_the_report_names_the_installed_releases_and_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    checks = _by_name(collect())
    assert {c.status for c in checks.values()} <= {"ok", "warn", "fail"}
    assert checks["deepspeed"].status == "ok" and checks["deepspeed"].value == deepspeed.__version__
    assert checks["torch"].value == torch.__version__
    assert checks["accelerator"].value == ("CPU only" if not torch.cuda.is_available() else checks["accelerator"].value)
    cache = checks["cache (teachers, corpora)"]
    assert cache.status == "ok" and cache.value == str(tmp_path / "cache") and "GB free" in cache.note
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # probed where a job would create it: nothing left behind
    assert checks["data cache (default)"].value == str(tmp_path / "cache" / "data")
    assert "file locks" not in checks  # a line only where locks do not work


def test_an_unwritable_cache_and_a_missing_compiler_fail_with_status_1(tmp_path):
    """A cache under a regular file (any user, root included, cannot create it) and a compiler
    that is not there: both are failed lines, and the command exits 1."""
    (tmp_path / "a_file").write_text("")
    env = {**__import__("os").environ, "CALD_SCALE_CACHE": str(tmp_path / "a_file" / "cache"), "CXX": "no-such-c++"}
    proc = subprocess.run([sys.executable, "-m", "cald_scale", "env", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["cache (teachers, corpora)"]["status"] == "fail" and "not writable" in checks["cache (teachers, corpora)"]["note"]
    assert checks["op builds"]["status"] == "fail" and "no-such-c++" in checks["op builds"]["value"]
    assert checks["deepspeed"]["status"] == "ok"


def test_settings_a_multi_node_launch_would_not_pass_on_are_named(tmp_path, monkeypatch):
    """deepspeed passes other nodes only some variables and .deepspeed_env's lines: a cache set
    here but not listed there is a warning naming it; listed, it is not."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    import os

    from cald_scale.env_report import _FORWARDED_PREFIXES

    for name in [n for n in os.environ if n.startswith(_FORWARDED_PREFIXES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "secret")  # a credential is never asked for in a launch file
    warned = _by_name(collect())["multi-node environment"]
    assert warned.status == "warn" and warned.value == f"CALD_SCALE_CACHE not in {tmp_path / 'home' / '.deepspeed_env'} or {tmp_path / '.deepspeed_env'}"
    (tmp_path / ".deepspeed_env").write_text(f"CALD_SCALE_CACHE={tmp_path / 'cache'}\n")
    checks = _by_name(collect())
    assert "multi-node environment" not in checks and "deepspeed env file" not in checks
    # A credential listed there goes on every pdsh command line: warned, by the batch script's rule.
    (tmp_path / ".deepspeed_env").write_text(f"CALD_SCALE_CACHE={tmp_path / 'cache'}\nWANDB_APIKEY=k\nTOKENIZERS_PARALLELISM=false\n")
    exposed = _by_name(collect())["deepspeed env file"]
    assert exposed.status == "warn" and exposed.value.startswith("WANDB_APIKEY in ")
    # deepspeed's launcher splits every line at "=": a blank or comment line stops a launch.
    (tmp_path / ".deepspeed_env").write_text(f"# the cache\nCALD_SCALE_CACHE={tmp_path / 'cache'}\n\n")
    bad = _by_name(collect())["deepspeed env file"]
    assert bad.status == "fail" and "line(s) [1, 3]" in bad.note


def test_what_a_job_runs_without_only_warns(monkeypatch):
    """wandb missing (runs log to metrics.jsonl) and a transformers outside the tested range
    warn; a missing DeepSpeed fails; a check that raises is a warned line of its own."""
    from cald_scale import env_report

    versions = {"wandb": None, "transformers": "5.26.0", "deepspeed": None}
    real = env_report._version
    monkeypatch.setattr(env_report, "_version", lambda package: versions[package] if package in versions else real(package))
    checks = _by_name(collect())
    assert checks["wandb"].status == "warn" and checks["transformers"].status == "warn" and checks["deepspeed"].status == "fail"
    def _slurm():
        return 1 / 0

    monkeypatch.setattr(env_report, "_slurm", _slurm)
    raised = _by_name(collect())["slurm"]
    assert raised.status == "warn" and raised.value.startswith("not checked: the check raised ZeroDivisionError")
