"""Fixtures for the SLURM tests: a real single-node cluster, and the tiny runs of tests/distributed."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "distributed"))

from cluster import SlurmCluster, missing_binaries  # noqa: E402


def _load_distributed_conftest():
    # NOTE: every conftest.py is a module named "conftest"; load that one under its own name.
    spec = importlib.util.spec_from_file_location("_distributed_conftest", HERE.parent / "distributed" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _load_distributed_conftest()
real_tokenizer, teacher_dirs, data_cache = _shared.real_tokenizer, _shared.teacher_dirs, _shared.data_cache
tiny_overrides = _shared.tiny_overrides


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd (one node, 2 CPUs) for the session; stopped even on failure."""
    missing = missing_binaries()
    if missing:
        message = f"SLURM not installed (missing {', '.join(missing)}); apt-get install slurmctld slurmd slurm-client munge"
        if os.environ.get("CALD_REQUIRE_SLURM") == "1":
            pytest.fail(f"CALD_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    # A SIGTERM (e.g. `timeout`) would end pytest without teardown: make it unwind like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
