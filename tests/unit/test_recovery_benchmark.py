"""benchmarks/recovery.py extends its table over sittings: a rerun keeps the other seeds'
runs, and the default job's targets are read from its own layout row. The launcher is
replaced by one that returns a finished run's curve (nothing trains here)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402
import recovery  # noqa: E402

TEACHER = {"heldout": 50.0, "wiki": 18.0}


def run_record(label: str, seed: int, heldout: float, wiki: float) -> dict:
    return {
        "folder": f"benchmarks/runs/recovery/{label}_seed{seed}", "date": "2026-12-03", "tokens": 51200, "train_seconds": 1.0,
        "final": {"heldout": heldout, "wiki": wiki}, "teacher": dict(TEACHER),
        "curve": {"heldout": [[0, 1e4], [51200, heldout]], "wiki": [[0, 1e4], [51200, wiki]]},
    }


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(recovery, "RESULTS", tmp_path)
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    launched = []

    def fake_launch(run, benchmark):
        launched.append((run.name, run.seed))
        return run_record(run.name, run.seed, 80.0, 45.0)  # every launched run ends here

    monkeypatch.setattr(recovery, "launch", fake_launch)
    return tmp_path, launched


def write_earlier(folder: Path, layouts: dict[str, list[tuple[float, float]]]) -> None:
    earlier = {
        "machine": {"date": "2026-12-02T00:00:00"}, "budget": recovery.budget(False),
        "runs": {recovery.DEFAULT_RECIPE: [run_record(recovery.DEFAULT_RECIPE, 0, 75.0, 580.0)]},
        "layouts": {label: [run_record(label, seed, *scores) for seed, scores in enumerate(seeds)] for label, seeds in layouts.items()},
    }
    (folder / "recovery.json").write_text(json.dumps(earlier))


def test_a_seed_0_rerun_keeps_the_seed_1_runs_of_earlier_sittings(results):
    folder, launched = results
    write_earlier(folder, {"layout_attn25": [(85.0, 47.0), (87.0, 46.0)], "layout_mamba2": [(117.0, 102.0)]})
    recovery.main(["--layouts", "layout_attn25", "--no_second_seed"])
    out = json.loads((folder / "recovery.json").read_text())
    assert launched == [("layout_attn25", 0)]
    assert [r["final"]["heldout"] for r in out["layouts"]["layout_attn25"]] == [80.0, 87.0]  # seed 0 replaced, seed 1 kept
    assert list(out["layouts"]["layout_mamba2"]) and list(out["runs"]) == [recovery.DEFAULT_RECIPE]  # the rest kept


def test_the_default_jobs_targets_come_from_its_layout_row(results):
    folder, _ = results
    write_earlier(folder, {"layout_mamba2": [(117.0, 102.0)], "layout_attn50": [(69.0, 32.0)]})
    recovery.main(["--layouts", "layout_attn25", "--no_second_seed"])  # 80 / 50 = 1.6x, 45 / 18 = 2.5x
    targets = json.loads((folder / "recovery.json").read_text())["targets"]
    assert targets["default_job_is_layout_attn25"]["pass"]  # the layout's config is the embedded default's
    assert targets["default_heldout_within_2x_teacher"] == {**targets["default_heldout_within_2x_teacher"], "value": 1.6, "pass": True}
    assert targets["default_wiki_within_3x_teacher"]["value"] == 2.5
    assert targets["default_is_the_leanest_layout_within_targets"]["pass"]  # all-Mamba2 misses 3x on wiki


def test_the_leanest_layout_flag_fails_when_a_layout_was_not_run_or_a_leaner_one_passes(results):
    folder, _ = results
    write_earlier(folder, {"layout_attn50": [(69.0, 32.0)]})
    recovery.main(["--layouts", "layout_attn25", "--no_second_seed"])
    flag = json.loads((folder / "recovery.json").read_text())["targets"]["default_is_the_leanest_layout_within_targets"]
    assert not flag["pass"] and "not run: ['layout_mamba2']" in flag["value"]
    write_earlier(folder, {"layout_mamba2": [(90.0, 50.0)], "layout_attn50": [(69.0, 32.0)]})  # all-Mamba2 within both
    recovery.main(["--layouts", "layout_attn25", "--no_second_seed"])
    flag = json.loads((folder / "recovery.json").read_text())["targets"]["default_is_the_leanest_layout_within_targets"]
    assert not flag["pass"] and "leanest: layout_mamba2" in flag["value"]


def test_argument_mistakes_are_refused(results):
    with pytest.raises(SystemExit):
        recovery.main(["--quick", "--layouts"])
    with pytest.raises(SystemExit):
        recovery.main(["--layouts", "layout_attn33"])
    with pytest.raises(SystemExit):
        recovery.main(["--recipes"])  # nargs="+": an empty list is an error, not "measure nothing"


def test_each_rival_is_compared_with_the_default_on_the_seeds_both_have():
    """By seed, not by list position: a rival run on seeds 0 and 2 meets the default's seeds 0
    and 1 on seed 0 alone; a rival with no seed in common cannot be ranked, and the flag says so."""
    default = [run_record(recovery.DEFAULT_RECIPE, 0, 74.2, 500.0), run_record(recovery.DEFAULT_RECIPE, 1, 76.8, 500.0)]
    rival = [run_record("rival", 0, 74.4, 500.0), run_record("rival", 2, 76.0, 500.0)]
    flag = recovery.targets({recovery.DEFAULT_RECIPE: default, "rival": rival}, {})["default_is_best"]
    assert flag["pass"] and "1.003x" in flag["value"] and "over 1 seed(s)" in flag["value"]
    flag = recovery.targets({recovery.DEFAULT_RECIPE: default, "rival": rival, "other": [run_record("other", 3, 90.0, 500.0)]}, {})["default_is_best"]
    assert not flag["pass"] and "no seed in common with" in flag["value"] and "['other']" in flag["value"]
