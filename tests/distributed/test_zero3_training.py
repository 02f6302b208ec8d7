"""The real deepspeed launcher, 2 CPU ranks, ZeRO-3 teacher + student engines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import tiny_overrides
from launcher import REPO, deepspeed_command, launcher_env, metrics, run

pytestmark = pytest.mark.distributed


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# The one place the tests keep wandb on (offline): a killed job resumes the same wandb run.
WANDB = {"output.wandb": "offline"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, teacher_dirs, data_cache):
    """An uninterrupted tiny llama -> mamba2 run of 6 steps on 2 ranks: (run folder, metrics per step)."""
    ref_dir = tmp_path_factory.mktemp("reference") / "ref"
    _ok(run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], ref_dir, data_cache, **WANDB)), launcher_env(ref_dir.parent)))
    reference = metrics(ref_dir)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    return ref_dir, reference


def test_llama_mamba2_kill_and_resume_continues_the_trajectory(tmp_path, teacher_dirs, data_cache, reference_run):
    import shutil

    env = launcher_env(tmp_path)
    ref_dir = tmp_path / "ref"
    shutil.copytree(reference_run[0], ref_dir)  # this test extends the reference run below
    reference = reference_run[1]
    report = json.loads((ref_dir / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 6
    assert report["ppl_student_after"] < report["ppl_student_before"]
    assert (ref_dir / "wandb").is_dir() and (ref_dir / "report.md").is_file()

    # Interrupted: SIGKILL the whole job once step 3 is logged (checkpoint of step 2 complete).
    run_dir = tmp_path / "killed"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **WANDB, **{"debug.sleep_per_step": 2.0}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and 3 not in metrics(run_dir) and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 6 not in metrics(run_dir) and not (run_dir / "report.json").exists()

    # The same command again resumes from the last complete checkpoint and finishes.
    resumed = run(cmd, env)
    _ok(resumed)
    assert "resuming run at step" in resumed.stdout + resumed.stderr
    # Both starts logged to one wandb run: its id is the run folder's.
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{run_id}") for p in starts), starts
    after = metrics(run_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "ce", "layer"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)

    # A corrupt newest checkpoint is skipped in favour of the previous complete one.
    ckpts = sorted((ref_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000006"]
    victim = max((p for p in ckpts[-1].rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as handle:
        handle.seek(victim.stat().st_size // 2)
        handle.write(b"\x00corrupt\x00" * 64)
    longer = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], ref_dir, data_cache, **{"train.max_steps": 8})), env)
    _ok(longer)
    log = longer.stdout + longer.stderr
    assert "fails its checksum" in log and "resuming run at step 4" in log
    assert json.loads((ref_dir / "report.json").read_text())["steps"] == 8
    assert metrics(ref_dir)[5]["loss"] == pytest.approx(reference[5]["loss"], rel=1e-5)


def test_preemption_signal_on_one_rank_saves_at_that_step_and_resumes_exactly(tmp_path, teacher_dirs, data_cache, reference_run):
    """SIGUSR1 to one rank: every rank stops after the same step, a complete checkpoint of that
    step is saved (not the last periodic one), the job exits 75, and rerunning continues exactly."""
    import psutil

    from cald_scale.engines.checkpoint import complete_tags

    env = launcher_env(tmp_path)
    run_dir = tmp_path / "preempted"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"debug.sleep_per_step": 2.0, "output.save_every": 4}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and 1 not in metrics(run_dir) and proc.poll() is None:
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(ranks) == 1 and proc.poll() is None, "the job ended before the signal"
    ranks[0].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-4000:]
    stopped = json.loads((run_dir / "preempted.json").read_text())
    assert stopped["signal"] == "SIGUSR1" and 1 <= stopped["step"] < 4  # before the first periodic save
    assert [s for s, _ in complete_tags(run_dir / "checkpoints")] == [stopped["step"]]
    assert sorted(metrics(run_dir)) == list(range(1, stopped["step"] + 1))

    resumed = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"output.save_every": 4})), env)
    _ok(resumed)
    assert f"resuming run at step {stopped['step']}" in resumed.stdout + resumed.stderr
    after, reference = metrics(run_dir), reference_run[1]
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "ce", "layer"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_gpt_neox_mamba_distills_and_exports(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "neox"
    _ok(run(deepspeed_command(tiny_overrides(teacher_dirs["gpt_neox"], run_dir, data_cache, **{"student.conversion.mixer": "mamba", "train.max_steps": 8})), env))
    history = metrics(run_dir)
    # The layer loss over the whole global batch (mean over ranks) falls by more than a fifth in 8 steps
    # (0.108 -> 0.078 here), and the held-out perplexity improves.
    first, last = history[1]["layer"], history[8]["layer"]
    assert last < 0.8 * first, f"layer loss did not fall: {first} -> {last}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ppl_student_after"] < report["ppl_student_before"]
    from transformers import AutoModelForCausalLM

    import cald_scale  # noqa: F401  (registers the student classes)

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.teacher_family == "gpt_neox" and student.config.mixer == "mamba"
    ids = torch.randint(0, 1000, (1, 16))
    assert torch.isfinite(student(ids).logits).all()


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "nan"
    overrides = tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"train.max_steps": 4, "debug.nan_at_micro_steps": "[1]"})
    _ok(run(deepspeed_command(overrides), env))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["nan_skipped"] == 1 and report["steps"] == 4

    run_dir = tmp_path / "nan_stop"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        **{"train.max_steps": 6, "debug.nan_at_micro_steps": "[3,4,5]", "train.max_consecutive_nan": 3},
    )
    failed = run(deepspeed_command(overrides), env)
    assert failed.returncode != 0
    assert "3 non-finite losses in a row" in failed.stdout + failed.stderr
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000002"]


@pytest.mark.slow
def test_real_smollm2_teacher_converts_and_trains(tmp_path, data_cache):
    """The real 135M teacher (de-quantised GGUF) -> Mamba2 student, a few steps on short sequences."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "smollm2"
    overrides = [
        "data.seq_len=32", "data.max_train_tokens=20000", "data.max_eval_tokens=2000", f"data.cache_dir={data_cache}",
        # Enough updates (at a short test's LR) that the held-out gain is real, not the noise of one step.
        "train.global_batch_size=4", "train.max_steps=6", "train.warmup_steps=1", "train.lr=3e-3",
        "eval.max_sequences=4", "eval.micro_batch_size=2", "output.save_every=6", f"output.run_dir={run_dir}",
        "output.wandb=disabled",
    ]
    _ok(run(deepspeed_command(overrides), env, timeout=1200))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 6 and report["world_size"] == 2
    assert report["ppl_teacher"] < 100 < report["ppl_student_before"]  # a real LM vs a freshly converted one
    assert report["ppl_student_after"] < report["ppl_student_before"]


def test_frozen_copies_shared_with_the_teacher_checkpoint_and_resume(tmp_path, teacher_dirs, data_cache):
    """trainable=mixers: the copied weights are the teacher's, left out of checkpoints, and a resumed run continues exactly."""
    import shutil

    env = launcher_env(tmp_path)
    run_dir = tmp_path / "mixers"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"student.trainable": "mixers"}))
    _ok(run(cmd, env))
    reference = metrics(run_dir)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    # Frozen weights are not in the checkpoint: far smaller than the tiny teacher's 49k x 64 embedding (12.6 MB).
    ckpt = run_dir / "checkpoints" / "step_00000006"
    model_states = sum(p.stat().st_size for p in ckpt.rglob("*model_states.pt"))
    assert model_states < 2e6, model_states
    # Lose the last checkpoint: the same command resumes from step 4 and repeats steps 5-6 exactly.
    shutil.rmtree(ckpt)
    resumed = run(cmd, env)
    _ok(resumed)
    assert "resuming run at step 4" in resumed.stdout + resumed.stderr
    after = metrics(run_dir)
    for step in (5, 6):
        for key in ("loss", "ce", "layer"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)

    # Complete (manifested) checkpoints that DeepSpeed cannot load stop the job: it never starts over on top of them.
    from cald_scale.engines.checkpoint import _write_manifest, seal_rank

    tags = sorted((run_dir / "checkpoints").glob("step_*"))
    for tag in tags:
        for states in tag.rglob("*model_states.pt"):
            states.write_bytes(b"not a torch file")
        step = int(tag.name.split("_")[1])
        for r in range(2):  # sealed again over the broken files: complete, but not loadable
            seal_rank(tag, step, r, 2)
        _write_manifest(tag, step, 2)
    refused = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"student.trainable": "mixers", "train.max_steps": 8})), env)
    assert refused.returncode != 0 and "refusing to start over" in refused.stdout + refused.stderr
    assert sorted((run_dir / "checkpoints").glob("step_*")) == tags


def test_teacher_forced_schedule_trains_each_block_on_its_own(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "forced"
    overrides = tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"phases": "[{name: tf, mode: teacher_forced}]", "train.max_steps": 8, "train.lr": 1e-2, "loss.skip_last": "false"})
    _ok(run(deepspeed_command(overrides), env))
    history = metrics(run_dir)
    assert sorted(history) == list(range(1, 9))
    assert "ce" not in history[1] and len(history[1]["layer_losses"]) == 3
    assert history[8]["layer"] < 0.75 * history[1]["layer"], (history[1]["layer"], history[8]["layer"])


def test_hybrid_layout_aligns_trains_exports_and_generates(tmp_path, teacher_dirs, data_cache):
    """MambaInLlama-style hybrid: layer 1 keeps the teacher's attention (frozen with the
    mixers-only default) through teacher-forced alignment, end-to-end training and export."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "hybrid"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        **{"student.conversion.attention_layers": "[1]", "student.trainable": "mixers", "phases": None,
           "train.max_steps": 8, "train.lr": 1e-2, "output.export_bamba": "true"},
    )
    _ok(run(deepspeed_command(overrides), env))
    history = metrics(run_dir)
    assert history[8]["phase_name"] == "end_to_end" and history[1]["phase_name"] == "align"
    assert len(history[1]["layer_losses"]) >= 2
    from transformers import AutoModelForCausalLM

    import cald_scale  # noqa: F401  (registers the student classes)

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dirs["llama"])
    assert student.config.attention_layers == [1] and [m.layer_idx for m in student.mixers()] == [0, 2]
    kept = {k: v for k, v in teacher.state_dict().items() if ".layers.1.self_attn." in k}
    student_state = student.backbone.state_dict()
    assert kept and all(torch.equal(v, student_state[k]) for k, v in kept.items())
    ids = torch.randint(3, 1000, (2, 10))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(ids, use_cache=True, **greedy), student.generate(ids, use_cache=False, **greedy))
    bamba = AutoModelForCausalLM.from_pretrained(run_dir / "bamba").eval()
    assert type(bamba).__name__ == "BambaForCausalLM" and bamba.config.attn_layer_indices == [1]
    with torch.no_grad():
        torch.testing.assert_close(bamba(ids).logits, student(ids).logits, rtol=1e-4, atol=1e-5)


def test_bamba_export_of_a_layout_bamba_cannot_express_stops_before_training(tmp_path, teacher_dirs, data_cache):
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "neox_bamba"
    proc = run(deepspeed_command(tiny_overrides(teacher_dirs["gpt_neox"], run_dir, data_cache, **{"output.export_bamba": "true"})), env)
    assert proc.returncode != 0
    assert "cannot export to Bamba: gpt_neox blocks" in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
