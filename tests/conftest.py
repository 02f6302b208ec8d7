"""Shared fixtures: tiny teachers of every supported family, the real tokenizer, clean global state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _restore_global_state():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Under `pytest -n 2` (the README's command) tests are scheduled one by one over two workers,
# except that the tests sharing a costly run (a module or session fixture that launches
# training, or the SLURM cluster) stay on one worker, so that run happens once.
SHARED_RUNS = {
    "std_run": "encoder", "mode_runs": "encoder",
    "default_recipe_run": "default_recipe",
    "compared": "pipeline_vs_zero3",
    "two_ranks": "two_ranks",
    "checks": "zero3_memory",
    "reference_run": "zero3_reference",
    "slurm_cluster": "slurm",
}


def pytest_collection_modifyitems(items):
    for item in items:
        groups = {SHARED_RUNS[name] for name in item.fixturenames if name in SHARED_RUNS}
        assert len(groups) <= 1, f"{item.nodeid} shares the runs of {sorted(groups)}: give them one group"
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))
