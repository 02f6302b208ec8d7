"""The paper's guidance table for the encoder track: all-MiniLM-L6-v2 -> Linformer and BiMamba2
on real classification data, under every guidance mode, several seeds per cell.

For each task (Wikipedia topic, 12 classes; Twitter sentiment, 3 classes) and seed:

1. the "Std." run fine-tunes the teacher (pretrained encoder + new mean-pooled head, no
   conversion) and exports its checkpoints along the way: the target teacher and the waypoints;
2. each student (Linformer k=256, BiMamba2) is converted from the *pretrained* encoder
   (``student.init_from``, as the paper's reference code does) and trained jointly on the task
   under unguided, target, trajectory, waypoint and hybrid guidance, on the same budget.
   Target, waypoint and hybrid follow that seed's Std. run; trajectory starts from the
   pretrained encoder and fine-tunes it alongside;
3. one more column, beyond the paper's modes, is a staged recipe on the same budget: the
   mixers aligned teacher-forced to the Std. teacher first (30% of the steps, mixers only),
   then target guidance end to end (``aligned_target``).

It also measures the teacher's hidden-state drift (mean cosine distance per layer between
the pretrained and the fine-tuned teacher on the 512 longest validation inputs) and the forward speed of
teacher and students at 4k tokens (benchmarks/encoder_speed.py). Finished runs are reused
(benchmarks/runs/guidance_<task>/, git-ignored), and so are the runs that the committed
result records (on the same budget, each with a digest of its whole config and its teacher's,
checked before reuse), so the table can be built over several sessions on other machines;
a rerun for some seeds keeps the recorded others. Writes benchmarks/results/guidance_<task>{,_quick}.{json,md}; a table on a longer
budget (``--epochs``: passes over the same training examples, every run alike, the Std. run
included) is its own benchmark, guidance_<task>_<N>epochs.

    python benchmarks/guidance_table.py                       # both tasks, 3 seeds (hours on 2 CPU cores)
    python benchmarks/guidance_table.py --tasks wiki_topic --seeds 0      # launches seed 0's runs; recorded seeds are kept
    python benchmarks/guidance_table.py --tasks wiki_topic --students linformer --saved-speed
    python benchmarks/guidance_table.py --tasks wiki_topic --recorded-only --saved-speed   # a partial table, launching nothing
    python benchmarks/guidance_table.py --quick               # CI-sized: wiki_topic, 1 seed, a few steps
    python benchmarks/guidance_table.py --tasks wiki_topic --students bimamba2 --recipes aligned_target --epochs 3 --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_result  # noqa: E402
from _runs import REPO, Run, launch_run  # noqa: E402

KEY_FILE = "table_key.txt"  # a finished run folder's key (``run_key``), written by the table
MODES = ("unguided", "target", "trajectory", "waypoint", "hybrid")
# Every column of the table: the paper's five modes, then a staged recipe that spends the first
# 30% of the budget aligning each mixer to the teacher's block on the teacher's own input
# (LoLCATs' attention transfer, MOHAWK's stage 2), then trains end to end under the target.
RECIPES = (*MODES, "aligned_target")
STUDENTS = {"linformer": ["student.conversion.mixer=linformer", "student.conversion.linformer.k=256"], "bimamba2": ["student.conversion.mixer=bimamba2"]}
TEACHER = "all-minilm-l6-v2"
# Changes to the code (not the config) that change a column's results. A run's key names its
# column's revision, so a run recorded before one is not reused: the table reruns it.
REVISIONS = {
    "trajectory": "6f18146: the trajectory teacher fine-tunes with dropout on, as the Std. run does",
}
# The same for a task's data (every run of its table): a change to how its splits are built.
DATA_REVISIONS = {
    "tweet_sentiment": "318bb6b: a retweet or link variant of a tweet falls in the tweet's split (test held 167 copies of train tweets)",
}


def budget(quick: bool, epochs: int = 1) -> dict:
    """Examples, steps and batch of every run of one table (``epochs`` passes over the examples)."""
    if quick:  # scored on 240 of each eval split: a check that every cell runs, not a result
        return {"examples": 128, "steps": 6, "batch": 16, "max_length": 64, "eval_batch": 128, "eval_examples": 240}
    return {"examples": 2048, "steps": 64 * epochs, "batch": 32, "max_length": 128, "eval_batch": 64, "eval_examples": None}


def benchmark_name(task: str, quick: bool, epochs: int = 1) -> str:
    return f"guidance_{task}" + ("_quick" if quick else "") + (f"_{epochs}epochs" if epochs != 1 else "")


def common(task: str, b: dict) -> list[str]:
    return [
        "task.kind=classification",
        # NOTE: classification runs never read data.corpus (the causal LM's text); pinned to the
        # value every recorded run was stamped under, so the LM default's move to Brown does not
        # change their config digests.
        "data.corpus=shakespeare",
        f"classification.dataset={task}",
        f"classification.max_length={b['max_length']}",
        f"classification.max_train_examples={b['examples']}",
        f"train.global_batch_size={b['batch']}",
        f"train.max_steps={b['steps']}",
        f"train.warmup_steps={max(1, b['steps'] // 20)}",
        f"eval.micro_batch_size={b['eval_batch']}",
        *([f"classification.max_eval_examples={b['eval_examples']}"] if b["eval_examples"] else []),
        f"output.save_every={b['steps']}",
        "output.wandb=disabled",
    ]


def std_run(task: str, b: dict, seed: int) -> Run:
    """The teacher fine-tuned with no conversion; its exports are the target and the waypoints."""
    return Run(
        "std",
        [
            *common(task, b),
            f"teacher.name_or_path={TEACHER}",
            "student.conversion.mixer=none",
            "student.trainable=all",
            "train.lr=1.0e-4",
            "train.copied_lr_scale=1.0",
            "train.weight_decay=0.01",
            f"output.export_student_every={max(1, b['steps'] // 3)}",
            "loss.a_layer=0",
            "phases=[{name: finetune, guidance: none}]",
        ],
        seed=seed,
    )


def student_run(task: str, b: dict, seed: int, student: str, mode: str, std_folder: Path) -> Run:
    waypoints = sorted((std_folder / "student_waypoints").glob("step_*"))
    phases = {
        "unguided": "[{name: unguided, guidance: none}]",
        "target": "[{name: target, guidance: target}]",
        "trajectory": "[{name: trajectory, guidance: trajectory, trajectory: {lr: 1.0e-4, update_every: 1}}]",
        "waypoint": "[{name: waypoints, guidance: waypoint, waypoints: [" + ", ".join(str(p) for p in waypoints) + "]}]",
        "hybrid": "[{name: target, fraction: 0.4, guidance: target}, {name: task_only, guidance: none}]",
        "aligned_target": "[{name: align, fraction: 0.3, guidance: target, mode: teacher_forced, trainable: mixers, lr: 5.0e-3}, {name: target, guidance: target}]",
    }[mode]
    # As in the paper's reference code, every student is converted from the pretrained encoder (with
    # the seeded head of this seed's Std. run); the teacher that guides it is this seed's fine-tuned
    # one, or for trajectory guidance the pretrained encoder, fine-tuned alongside.
    teacher = TEACHER if mode == "trajectory" else str(std_folder / "student")
    return Run(
        f"{student}_{mode}",
        [
            *common(task, b),
            *STUDENTS[student],
            f"teacher.name_or_path={teacher}",
            *([f"student.init_from={TEACHER}"] if teacher != TEACHER else []),
            "student.trainable=all",
            "train.lr=5.0e-4",
            "train.copied_lr_scale=0.2",
            "train.weight_decay=0.01",
            f"phases={phases}",
        ],
        seed=seed,
    )


def scores(folder: Path) -> dict:
    """Test and validation accuracy / macro-F1 of a finished classification run, and its cost."""
    report = json.loads((folder / "report.json").read_text())
    sets = report["eval_sets"]
    return {
        "folder": str(folder.relative_to(REPO)),
        "test_accuracy": sets["test"]["student_after"]["accuracy"],
        "test_macro_f1": sets["test"]["student_after"]["macro_f1"],
        "validation_accuracy": sets["validation"]["student_after"]["accuracy"],
        "teacher_test_accuracy": (sets["test"]["teacher"] or {}).get("accuracy"),
        "tokens": report["tokens_seen"],
        "train_seconds": report["train_seconds"],
        "wall_seconds": report["wall_seconds_this_session"],
    }


def drift(std_folder: Path, task: str, b: dict, seed: int) -> dict:
    """Hidden-state drift of the fine-tuned teacher from the pretrained one on the 512 longest
    validation inputs (8 batches of 64, longest first: the most tokens per forward; on tweets
    the longest 14%, so a figure of long inputs)."""
    from cald_scale.config import load_run_config
    from cald_scale.conversion.teacher import build_teacher, classifier_teacher, open_teacher, TeacherConfig
    from cald_scale.data.classification_batches import eval_batches_by_length
    from cald_scale.distill.stages import layerwise
    from cald_scale.eval.drift import hidden_state_drift
    from cald_scale.tasks.classification import ClassificationTask

    cfg = load_run_config(overrides=[*common(task, b), f"teacher.name_or_path={std_folder / 'student'}", f"train.seed={seed}"])
    task_data = ClassificationTask(cfg, is_main=True)
    task_data.open_data()
    tuned = layerwise(build_teacher(task_data.source))
    base, _ = open_teacher(TeacherConfig(name_or_path=TEACHER))
    pretrained = layerwise(build_teacher(classifier_teacher(base, task_data.data.label_names, seed=seed)))
    split = task_data.splits["validation"]
    batches = [split.batch(e.indices) for e in eval_batches_by_length(split.lengths, 64, 0, 1)[:8]]
    return hidden_state_drift(pretrained, tuned, batches)


def summarise(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def config_key(run: Run, teacher: Run | None = None) -> str:
    """What defines a run, comparable across checkouts and sessions: a digest of its whole
    resolved config (defaults included; teacher.dtype as the machine resolves it) and seed, with this checkout's path written as <repo>
    and the waypoint list (the Std. run's exports, which a recorded Std. run may not have here)
    and keys added since at their legacy values (``LEGACY_DEFAULTS``) and keys that never change a
    result (``RESULT_NEUTRAL_KEYS``: how ZeRO-3 hooks modules, say) left out; with ``teacher``,
    the key of the Std. run that guided it is part of it."""
    from cald_scale.config import load_run_config, without_legacy_defaults, without_result_neutral
    from cald_scale.train import as_recorded

    overrides = [re.sub(r"waypoints: \[[^\]]*\]", "waypoints: [std_exports]", o) for o in run.overrides]
    # teacher.dtype as the run resolves it (its config.json records that): "auto" is the ds_config's precision here.
    cfg = as_recorded(load_run_config(None, [*overrides, f"train.seed={run.seed}"]), Path(__file__).resolve().parents[1] / run.ds_config, 1)
    config = without_result_neutral(without_legacy_defaults(cfg.to_dict()))
    config.pop("output")  # where it writes, not what it runs
    # NOTE: cache folders are recorded absolute since stop 56; one inside this checkout is keyed
    # relative to it, as the runs (started at its root) recorded it before, so their keys stand.
    # The default folder wherever it resolves ($CALD_SCALE_CACHE/<kind> when set) is keyed as the checkout's.
    from cald_scale.fileio import work_cache_dir

    for section in ("data", "classification"):
        cache = (config.get(section) or {}).get("cache_dir")
        if cache and cache == work_cache_dir(None, section):
            config[section]["cache_dir"] = f".cache/cald_scale/{section}"
        elif cache and Path(cache).is_relative_to(REPO):
            config[section]["cache_dir"] = str(Path(cache).relative_to(REPO))
    text = json.dumps(config, sort_keys=True).replace(str(REPO), "<repo>")
    if teacher is not None:
        text += " teacher " + config_key(teacher)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(task: str, b: dict, run: Run) -> str:
    """A run's config key; a student's includes its teacher's, that seed's Std. run (trajectory's teacher is the pretrained encoder)."""
    guided_by_std = run.name != "std" and not run.name.endswith("_trajectory")
    key = config_key(run, std_run(task, b, run.seed) if guided_by_std else None)
    changed = revision(task, run)
    return hashlib.sha256(f"{key} {changed}".encode()).hexdigest()[:16] if changed else key


def revision(task: str, run: Run) -> str | None:
    """The last code changes that changed the run's results: to its task's data
    (``DATA_REVISIONS``) and to its column (``REVISIONS``), if any."""
    changes = [change for change in (DATA_REVISIONS.get(task), REVISIONS.get(run.name.split("_", 1)[-1])) if change]
    return "; ".join(changes) or None


def seed_of(record: dict) -> int:
    return int(record["folder"].rsplit("_seed", 1)[1])


def recorded_runs(benchmark: str, b: dict) -> tuple[dict[str, dict], list[int]]:
    """The scores of every run in this benchmark's committed result, by run folder, and its
    seeds, if that result was made on the same budget; a Std. run's record carries its
    seed's drift.

    Run folders are git-ignored and stay on the machine that ran them; the committed record
    is what lets the table grow over sessions on other machines."""
    path = RESULTS / f"{benchmark}.json"
    if not path.is_file():
        return {}, []
    old = json.loads(path.read_text())
    if old.get("budget") != b:
        return {}, []
    runs = {r["folder"]: dict(r) for r in old["teacher"]["runs"].values()}
    runs.update({r["folder"]: r for by_mode in old["runs"].values() for rs in by_mode.values() for r in rs})
    for seed, d in old["drift"]["per_seed"].items():
        runs[old["teacher"]["runs"][seed]["folder"]]["drift"] = d
    return runs, old["seeds"]


def table(task: str, seeds: list[int], quick: bool, students: list[str], speed: dict | None, recorded_only: bool = False,
          recipes: tuple[str, ...] = RECIPES, epochs: int = 1) -> dict:
    """Launch the runs of one task's table that are neither finished here nor recorded, then score it.

    With ``recorded_only`` nothing is launched: cells hold the seeds that exist, and the
    table says how many (a partial table). Only the rows in ``students`` and the columns in
    ``recipes`` launch runs; the others keep the runs that exist, so a result is never written
    with fewer runs than it had."""
    b = budget(quick, epochs)
    benchmark = benchmark_name(task, quick, epochs)
    recorded, recorded_seeds = recorded_runs(benchmark, b)
    launch_seeds = set(seeds)
    seeds = sorted(launch_seeds | set(recorded_seeds))  # a rerun for some seeds keeps the others' records

    def score(run: Run, key: str | None = None) -> dict:
        key = key or run_key(task, b, run)
        folder = launch_run(run, benchmark)
        (folder / KEY_FILE).write_text(key)
        return {**scores(folder), "config": key}

    def finished(run: Run) -> dict | None:
        folder = run.folder(benchmark)
        if (folder / "report.json").is_file():
            key = run_key(task, b, run)
            # A folder finished before the table stamped its key can be trusted only where no
            # code change since has moved its column.
            on_disk = (folder / KEY_FILE).read_text() if (folder / KEY_FILE).is_file() else None
            changed = revision(task, run)
            if on_disk != key and (on_disk is not None or changed):
                why = f"a change to its code or data ({changed})" if changed else "a change to its config or its Std. run's"
                raise SystemExit(f"[{benchmark}] {folder} was made before {why}: its key differs; move it away to rerun it")
            return score(run, key)  # reused, after checking its whole config
        record = recorded.get(str(folder.relative_to(REPO)))
        if record is not None and record.get("config") != run_key(task, b, run):
            print(f"[{benchmark}] the recorded {run.name} seed {run.seed} was made with another config: not reused", flush=True)
            return None
        return record

    def std_folder(seed: int) -> Path:
        """This seed's Std. run on disk (its exports guide the students): reused or (re)run."""
        return launch_run(std_run(task, b, seed), benchmark)

    def may_launch(seed: int, student: str | None = None, mode: str | None = None) -> bool:
        return not recorded_only and seed in launch_seeds and student in (None, *students) and mode in (None, *recipes)

    std = {seed: finished(std_run(task, b, seed)) for seed in seeds}
    std = {seed: s or (score(std_run(task, b, seed)) if may_launch(seed) else None) for seed, s in std.items()}
    cells: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in RECIPES} for s in STUDENTS}
    for seed in seeds:  # every cell's first seed before any second one: a partial table is still a table
        folder = std_run(task, b, seed).folder(benchmark)
        for student in STUDENTS:
            for mode in RECIPES:
                run = student_run(task, b, seed, student, mode, folder)
                got = finished(run)
                if got is None and may_launch(seed, student, mode):
                    if mode != "trajectory":  # its teacher is the pretrained encoder
                        std_folder(seed)  # on disk, with its waypoints
                    got = score(student_run(task, b, seed, student, mode, folder))
                if got is not None:
                    cells[student][mode].append(got)
    std = {seed: finished(std_run(task, b, seed)) for seed in seeds}  # a Std. rerun above scores itself
    std = {seed: s for seed, s in std.items() if s is not None}
    if not std:
        raise SystemExit(f"[{benchmark}] no Std. run for seeds {seeds}, here or recorded: nothing to tabulate (run without --recorded-only)")
    seeds = sorted(std)  # the seeds the table holds (a recorded seed whose runs are stale is not one)
    drifts = {}
    for seed, s in std.items():
        on_disk = (REPO / s["folder"] / "report.json").is_file()
        drifts[seed] = drift(REPO / s["folder"], task, b, seed) if on_disk else s.get("drift")
    drifts = {seed: d for seed, d in drifts.items() if d is not None}
    teacher = summarise([r["test_accuracy"] for r in std.values()])
    rows = {
        student: {mode: {**summarise([r["test_accuracy"] for r in runs]), "seeds": len(runs), "macro_f1": summarise([r["test_macro_f1"] for r in runs]),
                         "tokens": statistics.mean(r["tokens"] for r in runs), "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}
                  for mode, runs in by_mode.items() if runs}
        for student, by_mode in cells.items()
    }
    # The targets compare cells of 2+ seeds only (a single seed has no spread to beat), and a
    # student with the teacher on the same seeds.
    assessed = {(s, m) for s in STUDENTS for m in rows[s] if rows[s][m]["seeds"] >= 2 and all(seed_of(r) in std for r in cells[s][m])}
    guided = [(s, m) for s, m in sorted(assessed) if m != "unguided"]

    def teacher_on(student: str, mode: str) -> float:
        return statistics.mean(std[seed_of(r)]["test_accuracy"] for r in cells[student][mode])

    def beats_unguided(student: str, mode: str) -> bool | None:
        """On the seeds both cells have (None below 2): mean gap > the larger seed std."""
        by_seed = [{seed_of(r): r["test_accuracy"] for r in cells[student][m]} for m in (mode, "unguided")]
        shared = sorted(set(by_seed[0]) & set(by_seed[1]))
        if len(shared) < 2:
            return None
        guided_cell, unguided = (summarise([accs[seed] for seed in shared]) for accs in by_seed)
        return guided_cell["mean"] - unguided["mean"] > max(guided_cell["std"], unguided["std"])

    best = max(guided, key=lambda sm: rows[sm[0]][sm[1]]["mean"] - teacher_on(*sm)) if guided else None
    beats = {f"{s}/{m}": beats_unguided(s, m) for s, m in guided if (s, "unguided") in assessed}
    beats = {cell: flag for cell, flag in beats.items() if flag is not None}
    run_cells = {f"{s}/{m}": row["seeds"] for s, by_mode in rows.items() for m, row in by_mode.items()}
    fewest = min(run_cells.values(), default=0)
    not_run = [f"{s}/{m}" for s in STUDENTS for m in RECIPES if f"{s}/{m}" not in run_cells]
    result = {
        "benchmark": benchmark,
        "machine": machine(),
        "task": task,
        "data_revision": DATA_REVISIONS.get(task),  # the splits it was made on (None: as first built)
        "budget": b,
        "seeds": seeds,
        "teacher": {**teacher, "runs": std},
        "table": rows,
        "runs": cells,
        "drift": {"per_seed": drifts, "mean": statistics.mean(d["mean"] for d in drifts.values()) if drifts else None},
        "speed": speed,
        "targets": {
            "best_guided_within_2_points": {
                "what": "the best guided student (cells of 2+ seeds) is within 2 points of the fine-tuned teacher's mean test accuracy on the same seeds",
                "value": {"best": f"{best[0]}/{best[1]}", "student": round(rows[best[0]][best[1]]["mean"], 4), "teacher": round(teacher_on(*best), 4)} if best else None,
                "pass": best is not None and teacher_on(*best) - rows[best[0]][best[1]]["mean"] <= 0.02,
            },
            "guided_beats_unguided_by_more_than_std": {"what": "each guided mode and recipe beats unguided by more than the seed std (cells of 2+ seeds, on the seeds both have)", "value": beats, "pass": bool(beats) and all(beats.values())},
            "three_seeds_per_cell": {"what": "at least 3 seeds in every cell of the table", "value": {"fewest": fewest, "cells_not_run": not_run}, "pass": fewest >= 3 and not not_run},
            **(speed or {}).get("targets", {}),
        },
    }
    write_result(benchmark, result)
    (RESULTS / f"{benchmark}.md").write_text("\n".join(markdown(result)) + "\n")
    return result


def markdown(result: dict) -> list[str]:
    b, teacher = result["budget"], result["teacher"]
    pm = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    seeds = len(result["seeds"])
    recipes = [m for m in RECIPES if any(m in row for row in result["table"].values())]

    def cell(row: dict, mode: str) -> str:
        if mode not in row:
            return "-"
        return pm(row[mode]) + ("" if row[mode].get("seeds", seeds) == seeds else f" ({row[mode]['seeds']} seed{'s' * (row[mode]['seeds'] > 1)})")

    lines = [
        f"# Guidance table, {result['task']} ({result['machine']['date'][:10]}): all-MiniLM-L6-v2 -> Linformer / BiMamba2",
        "",
        f"Test accuracy (%), mean ± std over seeds {result['seeds']}; every run: {b['examples']} training examples, "
        f"{b['steps']} steps of {b['batch']}, max {b['max_length']} tokens. Fine-tuned teacher (Std.): **{pm(teacher)}** "
        f"(seed{'s' * (len(teacher['runs']) > 1)} {', '.join(str(k) for k in teacher['runs'])}).",
        "",
        "| student | " + " | ".join(recipes) + " | tokens / run | train s / run |",
        "|---|" + "---|" * (len(recipes) + 2),
    ]
    for student, row in result["table"].items():
        if not row:  # a row that no run has reached yet
            continue
        cost = row.get("target") or next(iter(row.values()), None)
        costs = f"{cost['tokens']:,.0f} | {cost['train_seconds']:.0f}" if cost else "- | -"
        lines.append(f"| {student} | " + " | ".join(cell(row, m) for m in recipes) + f" | {costs} |")
    d = result["drift"]
    if d["per_seed"]:
        first = next(iter(d["per_seed"]))
        lines += ["", f"Teacher hidden-state drift (mean cosine distance, pretrained vs fine-tuned, the 512 longest validation inputs): {d['mean']:.4f}; "
                  f"per layer (seed {first}): " + ", ".join(f"{x:.4f}" for x in d["per_seed"][first]["per_layer"])]
    if result.get("speed"):
        from encoder_speed import markdown as speed_markdown

        lines += ["", *speed_markdown(result["speed"])[:-2 - len(result["speed"]["targets"])]]
        if "machine" in result["speed"]:  # --saved-speed
            lines += [f"(from benchmarks/results/encoder_speed.json, measured {result['speed']['machine']['date'][:10]})"]
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    lines += [f"| {t['what']} | {t['value']} | {t['pass']} |" for t in result["targets"].values()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: wiki_topic tweet_sentiment (quick: wiki_topic)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--students", nargs="*", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES), help="the columns (default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training examples, every run alike (a table of its own)")
    speed_source = parser.add_mutually_exclusive_group()
    speed_source.add_argument("--no-speed", action="store_true", help="skip the 4k-token forward speed measurement")
    speed_source.add_argument("--saved-speed", action="store_true", help="take it from benchmarks/results/encoder_speed.json (python benchmarks/encoder_speed.py)")
    parser.add_argument("--recorded-only", action="store_true", help="launch nothing: build the table from the runs finished here and those the committed result records (a partial table)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or (args.quick and args.epochs != 1):
        parser.error("--epochs: a whole number >= 1, and not with --quick")
    tasks = args.tasks or (["wiki_topic"] if args.quick else ["wiki_topic", "tweet_sentiment"])
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    speed = None
    if args.saved_speed:
        saved = RESULTS / "encoder_speed.json"
        if not saved.is_file():
            parser.error(f"--saved-speed: {saved} does not exist; run python benchmarks/encoder_speed.py first")
        speed = json.loads(saved.read_text())
    elif not args.no_speed:
        from encoder_speed import measure

        speed = measure((512, 4096), repeats=1) if args.quick else measure()
    for task in tasks:
        result = table(task, seeds, args.quick, args.students, speed, recorded_only=args.recorded_only, recipes=tuple(args.recipes), epochs=args.epochs)
        print("\n".join(markdown(result)), flush=True)


if __name__ == "__main__":
    main()
