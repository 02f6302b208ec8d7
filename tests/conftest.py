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
# except that tests sharing a costly run (a module or session fixture that launches training,
# or the SLURM cluster) go to one worker as one unit, so that run happens once.
# NOTE: xdist's own grouping (--dist loadgroup, xdist_group marks) renames node ids, which
# pytest 9.2 ignores, so the groups are given here by node id prefix, to a scheduler of ours.
SHARED_RUNS = {  # node id prefix -> group
    "tests/distributed/test_encoder_training.py": "encoder",
    "tests/distributed/test_zero3_memory.py": "zero3_memory",
    "tests/distributed/test_resume_ranks.py": "two_ranks",
    "tests/distributed/test_pipeline.py": "default_recipe",
    "tests/distributed/test_guidance.py::test_the_shipped_recipe": "default_recipe",
    "tests/distributed/test_zero3_training.py::test_llama_mamba2_kill_and_resume": "zero3_reference",
    "tests/distributed/test_zero3_training.py::test_preemption_signal_on_one_rank": "zero3_reference",
    "tests/slurm/": "slurm",
}
SHARED_FIXTURES = {"std_run", "mode_runs", "checks", "two_ranks", "compared", "default_recipe_run", "reference_run", "slurm_cluster"}


def shared_run_group(nodeid: str) -> str | None:
    return next((group for prefix, group in SHARED_RUNS.items() if nodeid.startswith(prefix)), None)


def pytest_collection_modifyitems(items):
    # A new test that uses a shared run must be listed with the others that use it.
    groups: dict[str, set] = {}
    for item in items:
        for name in SHARED_FIXTURES & set(item.fixturenames):
            groups.setdefault(name, set()).add(shared_run_group(item.nodeid))
    split = {name: sorted(map(str, g)) for name, g in groups.items() if len(g) > 1 or None in g}
    assert not split, f"tests sharing a run are not in one SHARED_RUNS group (tests/conftest.py): {split}"


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        """Each group is one unit of work (the biggest first); every other test is its own."""

        def _split_scope(self, nodeid: str) -> str:
            return shared_run_group(nodeid) or nodeid

    return SharedRunScheduling(config, log)
