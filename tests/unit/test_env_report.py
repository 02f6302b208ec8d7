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
    assert checks["file locks"].status == "ok"


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
    from cald_scale.env_report import _FORWARDED

    for name in _FORWARDED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "cache"))
    warned = _by_name(collect())["multi-node environment"]
    assert warned.status == "warn" and warned.value == f"CALD_SCALE_CACHE not in {tmp_path / 'home' / '.deepspeed_env'} or {tmp_path / '.deepspeed_env'}"
    (tmp_path / ".deepspeed_env").write_text(f"CALD_SCALE_CACHE={tmp_path / 'cache'}\n")
    assert "multi-node environment" not in _by_name(collect())
