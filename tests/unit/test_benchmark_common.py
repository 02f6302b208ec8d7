"""Pieces shared by the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


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


def test_benchmark_sizes_are_checked_when_parsed():
    """helper-77: --contexts abc was an int() traceback, and --layers 0 / --steps 0 fell back to
    the defaults and ran the full benchmark; sizes are argparse types now, refused in one line."""
    import argparse
    import subprocess
    import sys

    from _common import output_file, positive_ints

    assert positive_ints("512,2048") == [512, 2048]
    for text in ("abc", "512,0", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_ints(text)
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder: name the JSON file to write"):
        output_file(str(REPO))
    assert output_file("results/x.json").name == "x.json"
    for script, flag, value in (
        ("inference_speed.py", "--contexts", "abc"), ("mixer_speed.py", "--layers", "0"), ("train_speed.py", "--steps", "0"),
        # helper-109: a folder for --out failed at the first save, after measuring (atomic rename onto a folder)
        ("kernel_parity.py", "--out", str(REPO / "benchmarks")), ("inference_speed.py", "--attention_every", "-1"),
    ):
        proc = subprocess.run([sys.executable, f"benchmarks/{script}", flag, value], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and f"error: argument {flag}:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
