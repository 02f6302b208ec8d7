"""benchmarks/_runs.py reuses a finished run folder only for the run asked for now: the same
config, and the same ranks and DeepSpeed config, which config.json does not hold."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _runs  # noqa: E402

from cald_scale.config import load_run_config  # noqa: E402

BENCHMARK = "reuse_check"


def finished(run: _runs.Run, *, world_size: int, launch: dict | None) -> Path:
    """A folder as a finished run leaves it (config.json as the run records it: teacher.dtype
    resolved to the engines' precision; report.json), launched as ``launch`` says."""
    from cald_scale.train import as_recorded

    folder = run.folder(BENCHMARK)
    folder.mkdir(parents=True)
    args = [*run.overrides, f"train.seed={run.seed}", f"output.run_dir={folder}", "output.progress_bar=false"]
    recorded = as_recorded(load_run_config(None, args), _runs.REPO / run.ds_config, world_size)
    assert recorded.teacher.dtype == "float32"  # the run's record, not the config's "auto"
    (folder / "config.json").write_text(json.dumps(recorded.to_dict()))
    (folder / "report.json").write_text(json.dumps({"world_size": world_size}))
    if launch is not None:
        (folder / _runs.LAUNCH_FILE).write_text(json.dumps(launch))
    return folder


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(_runs, "RUNS", tmp_path)


def test_a_run_launched_on_other_ranks_or_another_ds_config_is_not_reused(runs):
    two_ranks = _runs.Run("streamed", ["train.max_steps=2"])
    folder = finished(two_ranks, world_size=2, launch=None)  # from before launch.json: the report says 2 ranks
    assert _runs.launch_run(two_ranks, BENCHMARK, ranks=2) == folder
    with pytest.raises(RuntimeError, match=r"launched otherwise \(ranks: 2 -> 1\); move it away"):
        _runs.launch_run(two_ranks, BENCHMARK, ranks=1)

    piped = _runs.Run("piped", ["train.max_steps=2", "train.pipeline_stages=2"], ds_config="ds_configs/pipeline.json")
    folder = finished(piped, world_size=2, launch={"ranks": 2, "ds_config": "ds_configs/zero3.json"})
    with pytest.raises(RuntimeError, match=r"ds_config: 'ds_configs/zero3.json' -> 'ds_configs/pipeline.json'"):
        _runs.launch_run(piped, BENCHMARK, ranks=2)
    (folder / _runs.LAUNCH_FILE).write_text(json.dumps({"ranks": 2, "ds_config": "ds_configs/pipeline.json"}))
    assert _runs.launch_run(piped, BENCHMARK, ranks=2) == folder
