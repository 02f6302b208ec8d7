"""The encoder track under the real launcher, 2 CPU ranks, ZeRO-3: the "Std." run fine-tunes a
tiny BERT teacher with a new head on real Wikipedia topic data (a stratified subset), then every
guidance mode converts it (Linformer, BiMamba2), and a classification run resumes mid-phase."""

from __future__ import annotations

import json

import pytest
from launcher import deepspeed_command, launcher_env, metrics, resume_and_compare, run
from tiny_models import save_tiny_encoder

pytestmark = pytest.mark.distributed

STEPS = 4


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from cald_scale.conversion.teacher import TeacherConfig, open_teacher

    _, tokenizer = open_teacher(TeacherConfig(name_or_path="all-minilm-l6-v2"))  # MiniLM's real tokenizer
    return save_tiny_encoder(tmp_path_factory.mktemp("bert"), "bert", tokenizer)


def _overrides(teacher, run_dir, data_cache, phases: str, **extra) -> list[str]:
    base = {
        "task.kind": "classification",
        "teacher.name_or_path": str(teacher),
        "classification.dataset": "wiki_topic",
        "classification.max_length": 48,
        "classification.max_train_examples": 96,
        "classification.cache_dir": str(data_cache),
        "train.global_batch_size": 8,
        "train.max_steps": STEPS,
        "train.warmup_steps": 1,
        "train.lr": 3e-3,
        "eval.micro_batch_size": 128,
        "output.save_every": 1,
        "output.keep_last": STEPS,
        "output.run_dir": str(run_dir),
        "output.progress_bar": "false",
        "output.wandb": "disabled",  # ~3 s a launch; the LM kill/resume test covers it
        "phases": phases,
        "student.conversion.linformer.k": 16,
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items() if v is not None]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def std_run(tmp_path_factory, encoder_dir):
    """The Std. run: the teacher fine-tuned with no conversion; its export and waypoints."""
    root = tmp_path_factory.mktemp("encoder_runs")
    run_dir = root / "std"
    env = launcher_env(root)
    overrides = _overrides(
        encoder_dir, run_dir, root / "data", "[{name: finetune, guidance: none}]",
        **{"student.conversion.mixer": "none", "student.trainable": "all", "train.copied_lr_scale": 1.0, "output.export_student_every": 2},
    )
    proc = run(deepspeed_command(overrides), env)
    _ok(proc)
    return run_dir, root


def test_the_std_run_fine_tunes_the_teacher_and_exports_it_with_waypoints(std_run):
    run_dir, _ = std_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "classification" and report["mixer"] == "none"
    assert report["accuracy_teacher"] is None  # no teacher guides a Std. run
    assert report["eval_sets"]["test"]["student_after"]["num_examples"] == 1005  # the fixed wiki_topic test split, whole
    validation = report["eval_sets"]["validation"]
    assert validation["student_after"]["loss"] < validation["student_before"]["loss"]  # it learnt the task
    history = metrics(run_dir)
    # Real tokens, summed over both ranks: the bucketed batches of 8 leads of at most 48 tokens.
    assert STEPS * 8 * 30 < report["tokens_seen"] <= STEPS * 8 * 48 and history[STEPS]["tokens"] == report["tokens_seen"]
    for step in (2, 4):
        folder = run_dir / "student_waypoints" / f"step_{step:08d}"
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((run_dir / "student" / "config.json").read_text())
    assert config["model_type"] == "cald_classifier" and config["conversion"]["mixer"] == "none"


# mode -> (student mixer, phases); linformer_layer: one length projection shared by every layer.
MODES = {
    "unguided": ("linformer", "[{name: unguided, guidance: none}]"),
    "target": ("linformer_layer", "[{name: target, guidance: target}]"),
    "hybrid": ("bimamba2", "[{name: target, steps: 2, guidance: target}, {name: task_only, guidance: none}]"),
    "trajectory": ("bimamba2", "[{name: trajectory, guidance: trajectory, trajectory: {lr: 1.0e-3, update_every: 1}}]"),
    "waypoint": ("linformer", None),  # the Std. run's waypoints, below
    "aligned": ("bimamba2", "[{name: align, steps: 2, mode: teacher_forced, trainable: mixers, lr: 5.0e-3}, {name: end_to_end}]"),
}


def _waypoints(std_dir) -> list:
    return [std_dir / "student_waypoints" / f"step_{s:08d}" for s in (2, 4)]


def _mode_overrides(mode: str, run_dir, std_run, encoder_dir) -> list[str]:
    """Every student is converted from the pretrained encoder, as in the paper; the teacher is the
    Std. run's export, or for trajectory guidance the pretrained encoder, fine-tuned alongside."""
    std_dir, root = std_run
    mixer, phases = MODES[mode]
    teacher = encoder_dir if mode == "trajectory" else std_dir / "student"
    init_from = None if mode == "trajectory" else encoder_dir
    if mode == "waypoint":
        phases = "[{name: waypoints, guidance: waypoint, waypoints: [" + ", ".join(map(str, _waypoints(std_dir))) + "]}]"
    # Partitioned once by ZeRO-3 and exported once.
    sharing = {"student.conversion.linformer.sharing": "layer"} if mixer == "linformer_layer" else {}
    return _overrides(
        teacher, run_dir, root / "data", phases,
        # student.trainable=all, as the recipes: the head drawn on the pretrained encoder must train.
        **{"student.conversion.mixer": mixer.removesuffix("_layer"), "student.init_from": init_from, "loss.a_kl": 1.0, "student.trainable": "all", **sharing},
    )


@pytest.fixture(scope="module")
def mode_runs(std_run, encoder_dir):
    """mode -> (run folder, launcher log), each mode launched once, when first asked for."""
    done: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in done:
            run_dir = std_run[1] / mode
            proc = run(deepspeed_command(_mode_overrides(mode, run_dir, std_run, encoder_dir)), launcher_env(std_run[1]))
            _ok(proc)
            done[mode] = run_dir, proc.stdout + proc.stderr
        return done[mode]

    return get


@pytest.mark.parametrize("mode", list(MODES))
def test_every_guidance_mode_converts_the_pretrained_encoder_under_its_teacher(mode_runs, std_run, encoder_dir, mode):
    run_dir, log = mode_runs(mode)
    mixer = MODES[mode][0].removesuffix("_layer")
    if mode != "trajectory":
        assert f"student converted from {encoder_dir} (student.init_from); teacher: {std_run[0] / 'student'}" in log
    report = json.loads((run_dir / "report.json").read_text())
    history = metrics(run_dir)
    assert report["mixer"] == mixer and len(history) == STEPS
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in history.values())
    assert 0.0 <= report["accuracy_student_after"] <= 1.0
    guided = {"unguided": [], "target": [1, 2, 3, 4], "hybrid": [1, 2], "trajectory": [1, 2, 3, 4], "waypoint": [1, 2, 3, 4], "aligned": [1, 2, 3, 4]}[mode]
    assert [s for s in history if "layer" in history[s]] == guided
    if mode == "unguided":
        assert report["accuracy_teacher"] is None
    else:
        assert report["accuracy_teacher"] is not None
    if mode == "hybrid":
        assert history[3]["teacher_release"]["teacher_params_alive"] == [0, 0]
    if mode == "target":  # the shared length projection
        from transformers import AutoModelForSequenceClassification

        exported = AutoModelForSequenceClassification.from_pretrained(run_dir / "student").encoder.encoder.layer
        assert exported[0].attention.self.mixer.E is exported[2].attention.self.mixer.E
    if mode == "trajectory":
        assert "teacher_ce" in history[STEPS] and "teacher_after" in report["eval_sets"]["test"]
    if mode == "waypoint":
        first, second = _waypoints(std_run[0])
        assert log.index(f"teacher weights now from {first}") < log.index(f"teacher weights now from {second}")


def test_a_classification_run_resumes_mid_phase_on_the_same_batches(mode_runs, std_run, encoder_dir):
    """The aligned run killed while saving step 2: it resumes from step 1, mid-alignment, and
    logs the very same losses, across the switch to end to end, on the same batches."""
    ref, _ = mode_runs("aligned")
    cmd_for = lambda run_dir: _mode_overrides("aligned", run_dir, std_run, encoder_dir)  # noqa: E731
    got = resume_and_compare(ref, std_run[1], 1, launcher_env(std_run[1]), cmd_for, ("loss", "ce", "layer", "grad_norm", "tokens"), steps=STEPS)
    assert [got[s]["phase_name"] for s in (2, 3, 4)] == ["align", "end_to_end", "end_to_end"]
