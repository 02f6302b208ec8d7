"""benchmarks/guidance_table.py builds its table over sessions from the runs its committed
result records: a rerun for some seeds keeps the others, a record made with another config
is not reused, and the targets compare cells that have a spread with the teacher on the
same seeds. Checked on a recorded result (``--recorded-only``: nothing is launched)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402
import _runs  # noqa: E402
import guidance_table as gt  # noqa: E402

TASK = "wiki_topic"  # in a repo of its own (the fixture): no run folder exists, every score comes from the record


def record(folder: str, accuracy: float, run=None) -> dict:
    out = {"folder": f"benchmarks/runs/guidance_{TASK}/{folder}", "test_accuracy": accuracy, "test_macro_f1": accuracy / 2, "tokens": 1000, "train_seconds": 10.0}
    if run is not None:
        out["config"] = gt.run_key(TASK, gt.budget(False), run)
    return out


def recorded_result(cells: dict[tuple[str, str], list[float]], teacher: list[float], *, stale: tuple[str, str, int] | None = None) -> dict:
    """A committed result in the script's format: Std. and student records by seed (seeds 0..n-1)."""
    b = gt.budget(False)
    std = {str(seed): record(f"std_seed{seed}", acc, gt.std_run(TASK, b, seed)) for seed, acc in enumerate(teacher)}
    runs = {s: {m: [] for m in gt.RECIPES} for s in gt.STUDENTS}
    for (student, mode), accuracies in cells.items():
        for seed, acc in enumerate(accuracies):
            run = gt.student_run(TASK, b, seed, student, mode, gt.REPO / std[str(seed)]["folder"])
            if stale == (student, mode, seed):
                run.overrides = [*run.overrides, "train.lr=1.0e-3"]  # made before the recipe's LR changed
            runs[student][mode].append(record(f"{student}_{mode}_seed{seed}", acc, run))
    return {"budget": b, "seeds": list(range(len(teacher))), "teacher": {"runs": std}, "runs": runs, "drift": {"per_seed": {}}}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(gt, "REPO", tmp_path)
    monkeypatch.setattr(_runs, "RUNS", tmp_path / "benchmarks" / "runs")
    monkeypatch.setattr(gt, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return tmp_path / "results"


def build(results: Path, recorded: dict, seeds: list[int]) -> dict:
    (results / f"guidance_{TASK}.json").write_text(json.dumps(recorded))
    gt.table(TASK, seeds, quick=False, students=list(gt.STUDENTS), speed=None, recorded_only=True)
    return json.loads((results / f"guidance_{TASK}.json").read_text())


def test_a_rerun_for_one_seed_keeps_the_recorded_seeds(results):
    recorded = recorded_result({("linformer", "unguided"): [0.4, 0.42, 0.41], ("linformer", "target"): [0.5, 0.52, 0.51]}, [0.7, 0.72, 0.71])
    out = build(results, recorded, seeds=[2])
    assert out["seeds"] == [0, 1, 2]
    assert out["table"]["linformer"]["target"]["seeds"] == 3
    assert out["table"]["linformer"]["target"]["mean"] == pytest.approx(0.51)
    assert sorted(out["teacher"]["runs"]) == ["0", "1", "2"]
    # and the rewrite reproduces itself
    again = build(results, out, seeds=[0])
    assert again["table"] == out["table"] and again["targets"] == out["targets"]


def test_the_table_lists_the_seeds_it_holds_not_those_whose_records_are_stale(results):
    recorded = recorded_result({("linformer", "target"): [0.6, 0.62]}, [0.7, 0.72])
    recorded["teacher"]["runs"]["1"]["config"] = "made with another config"
    out = build(results, recorded, seeds=[0])
    assert out["seeds"] == [0] and sorted(out["teacher"]["runs"]) == ["0"]


def test_a_record_made_with_another_config_is_not_reused(results, capsys):
    recorded = recorded_result({("bimamba2", "target"): [0.6, 0.62]}, [0.7, 0.72], stale=("bimamba2", "target", 1))
    out = build(results, recorded, seeds=[0, 1])
    assert out["table"]["bimamba2"]["target"]["seeds"] == 1
    assert "bimamba2_target seed 1 was made with another config" in capsys.readouterr().out


def test_a_record_made_before_a_change_to_its_columns_code_is_not_reused(results, monkeypatch, capsys):
    # Recorded under a column's revision, then the code changes again (a new revision): the
    # record's config is the same, but its result is not what today's code gives.
    recorded = recorded_result({("linformer", "trajectory"): [0.5, 0.52], ("linformer", "target"): [0.6, 0.62]}, [0.7, 0.72])
    monkeypatch.setitem(gt.REVISIONS, "trajectory", "a later change")
    out = build(results, recorded, seeds=[0, 1])
    assert "trajectory" not in out["table"]["linformer"] and out["table"]["linformer"]["target"]["seeds"] == 2
    assert "linformer_trajectory seed 0 was made with another config" in capsys.readouterr().out


def test_a_run_folder_that_may_predate_its_columns_code_is_refused(results, monkeypatch):
    recorded = recorded_result({("linformer", "target"): [0.6, 0.62]}, [0.7, 0.72])
    (results / f"guidance_{TASK}.json").write_text(json.dumps(recorded))
    folder = gt.student_run(TASK, gt.budget(False), 0, "linformer", "trajectory", Path()).folder(f"guidance_{TASK}")
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")  # finished before the table stamped its key
    with pytest.raises(SystemExit, match=r"linformer_trajectory_seed0 was made before a change to its code or data \(6f18146"):
        gt.table(TASK, [0, 1], quick=False, students=list(gt.STUDENTS), speed=None, recorded_only=True)
    # a folder the table stamped with today's key is scored (here: its report is empty)
    (folder / gt.KEY_FILE).write_text(gt.run_key(TASK, gt.budget(False), gt.student_run(TASK, gt.budget(False), 0, "linformer", "trajectory", Path())))
    monkeypatch.setattr(gt, "launch_run", lambda run, benchmark: run.folder(benchmark))
    monkeypatch.setattr(gt, "scores", lambda folder: {"folder": str(folder.relative_to(gt.REPO)), "test_accuracy": 0.5, "test_macro_f1": 0.2, "tokens": 1, "train_seconds": 1.0})
    out = json.loads(json.dumps(gt.table(TASK, [0, 1], quick=False, students=list(gt.STUDENTS), speed=None, recorded_only=True)))
    assert out["table"]["linformer"]["trajectory"]["seeds"] == 1


def test_a_change_to_a_tasks_data_reruns_its_whole_table(results, monkeypatch, capsys):
    """Every run of a task whose splits changed is stale, its Std. run too; a folder stamped
    with another key for a reason other than a revision says so (not "(None)")."""
    recorded = recorded_result({("linformer", "target"): [0.6, 0.62]}, [0.7, 0.72])
    monkeypatch.setitem(gt.DATA_REVISIONS, TASK, "abc1234: the splits changed")
    with pytest.raises(SystemExit, match=r"no Std. run for seeds \[0, 1\], here or recorded"):
        build(results, recorded, seeds=[0, 1])
    assert "the recorded std seed 0 was made with another config" in capsys.readouterr().out
    monkeypatch.delitem(gt.DATA_REVISIONS, TASK)
    run = gt.student_run(TASK, gt.budget(False), 0, "linformer", "target", Path())
    folder = run.folder(f"guidance_{TASK}")
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")
    (folder / gt.KEY_FILE).write_text("a-key-of-another-config")
    with pytest.raises(SystemExit, match=r"linformer_target_seed0 was made before a change to its config or its Std. run's"):
        gt.table(TASK, [0, 1], quick=False, students=list(gt.STUDENTS), speed=None, recorded_only=True)


def test_targets_compare_cells_with_a_spread_against_the_teacher_on_their_seeds(results):
    # One seed of hybrid beats everything (no spread: not a candidate); waypoint ran on seeds
    # 0 and 1 only, where the teacher scored 0.80 and 0.82 (its third seed is far lower).
    recorded = recorded_result(
        {("linformer", "unguided"): [0.40, 0.50, 0.45], ("linformer", "waypoint"): [0.795, 0.805], ("linformer", "hybrid"): [0.95]},
        [0.80, 0.82, 0.50],
    )
    out = build(results, recorded, seeds=[0, 1, 2])
    within = out["targets"]["best_guided_within_2_points"]
    assert within["value"] == {"best": "linformer/waypoint", "student": 0.8, "teacher": 0.81} and within["pass"]
    beats = out["targets"]["guided_beats_unguided_by_more_than_std"]
    assert beats["value"] == {"linformer/waypoint": True}  # hybrid's one seed is not assessed
    seeds = out["targets"]["three_seeds_per_cell"]
    assert seeds["value"]["fewest"] == 1 and not seeds["pass"]
    assert "bimamba2/target" in seeds["value"]["cells_not_run"]


def test_a_rerun_recorded_only_with_no_teacher_says_so(results):
    with pytest.raises(SystemExit, match="no Std. run"):
        gt.table(TASK, [0], quick=False, students=list(gt.STUDENTS), speed=None, recorded_only=True)


def test_a_cell_whose_seed_has_no_teacher_score_is_not_assessed(results):
    recorded = recorded_result({("linformer", "unguided"): [0.40, 0.41], ("linformer", "target"): [0.60, 0.62]}, [0.80, 0.82])
    del recorded["teacher"]["runs"]["1"]  # seed 1's Std. record is gone: its students stay, but are not compared
    out = build(results, recorded, seeds=[0, 1])
    assert out["table"]["linformer"]["target"]["seeds"] == 2
    assert out["targets"]["best_guided_within_2_points"]["value"] is None
    assert out["targets"]["guided_beats_unguided_by_more_than_std"]["value"] == {}


def test_a_partial_rerun_launches_only_the_requested_seed_and_cells(results, monkeypatch):
    """The launcher is replaced by one that writes a report and scores it (the real one runs the trainer)."""
    launched = []

    def launch_run(run, benchmark):
        launched.append((run.name, run.seed))
        folder = run.folder(benchmark)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text("{}")
        return folder

    def scores(folder):
        acc = 0.8 if folder.name.startswith("std_") else 0.6
        return {"folder": str(folder.relative_to(gt.REPO)), "test_accuracy": acc, "test_macro_f1": acc / 2, "tokens": 1, "train_seconds": 1.0}

    monkeypatch.setattr(gt, "launch_run", launch_run)
    monkeypatch.setattr(gt, "scores", scores)
    monkeypatch.setattr(gt, "drift", lambda *args: {"mean": 0.1, "per_layer": [0.1]})
    recorded = recorded_result({("linformer", "target"): [0.5, 0.52]}, [0.7, 0.72])
    (results / f"guidance_{TASK}.json").write_text(json.dumps(recorded))
    gt.table(TASK, [2], quick=False, students=["linformer"], speed=None, recipes=("target",))
    assert set(launched) == {("std", 2), ("linformer_target", 2)}
    out = json.loads((results / f"guidance_{TASK}.json").read_text())
    assert out["seeds"] == [0, 1, 2]
    assert [r["test_accuracy"] for r in out["runs"]["linformer"]["target"]] == [0.5, 0.52, 0.6]
    assert out["teacher"]["values"] == [0.7, 0.72, 0.8]


COMMITTED = sorted(p.stem for p in (gt.REPO / "benchmarks" / "results").glob("guidance_*.json") if json.loads(p.read_text()).get("task") not in (None, "lm"))


@pytest.mark.parametrize("shared_cache", [False, True], ids=["checkout_cache", "CALD_SCALE_CACHE"])
@pytest.mark.parametrize("benchmark", COMMITTED)
def test_the_committed_records_are_still_reused_under_todays_config(benchmark, shared_cache, monkeypatch, tmp_path):
    # A record is reused only under its config digest. A config key added since (with a default
    # that reproduces the old runs) must not orphan the committed tables: each would then be
    # rerun from scratch (hours of CPU). Keys that never change a result stay out of the digest.
    # A table made before its task's data changed (DATA_REVISIONS) is stale by design, every
    # record of it: its config digest must still be today's all the same. The default cache
    # folders, in the checkout or under $CALD_SCALE_CACHE, key alike (helper-101).
    monkeypatch.chdir(gt.REPO)
    if shared_cache:
        monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "shared"))
    else:
        monkeypatch.delenv("CALD_SCALE_CACHE", raising=False)
    result = json.loads((gt.RESULTS / f"{benchmark}.json").read_text())
    made_with = result.get("data_revision")
    if made_with != gt.DATA_REVISIONS.get(result["task"]):  # stale: keyed as under the data it was made on
        if made_with is None:
            monkeypatch.delitem(gt.DATA_REVISIONS, result["task"])
        else:
            monkeypatch.setitem(gt.DATA_REVISIONS, result["task"], made_with)
    b, task = result["budget"], result["task"]
    assert benchmark == gt.benchmark_name(task, b == gt.budget(True), b["steps"] // 64 if b != gt.budget(True) else 1)
    checked = 0
    for student, cells in result["runs"].items():
        for mode, records in cells.items():
            for rec in records:
                seed = int(rec["folder"].rsplit("_seed", 1)[1])
                std_folder = gt.std_run(task, b, seed).folder(benchmark)
                run = gt.student_run(task, b, seed, student, mode, std_folder)
                assert rec["config"] == gt.run_key(task, b, run), (student, mode, seed)
                checked += 1
    assert checked > 0
