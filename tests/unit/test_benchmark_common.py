"""Pieces shared by the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402


def test_child_processes_keep_the_parents_python_path(tmp_path, monkeypatch):
    """A benchmark's child (train_speed's items, scale_memory's ranks) imports what its parent
    found through PYTHONPATH, the carried wheels on a GPU machine, and the repository first."""
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "carried_probe.py").write_text("VALUE = 7\n")
    monkeypatch.setenv("PYTHONPATH", str(carried))
    env = _common.child_env(OMP_NUM_THREADS="1")
    code = "import carried_probe, cald_scale, os; print(carried_probe.VALUE, os.environ['OMP_NUM_THREADS'])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["7", "1"]
    assert env["PYTHONPATH"].split(":")[0] == str(_common.REPO)
