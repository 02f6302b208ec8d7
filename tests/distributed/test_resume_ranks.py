"""Checkpoints and ranks: a 2-rank checkpoint resumes on 1 rank on the 2-rank loss trajectory,
and complete checkpoints that cannot load stop the job.

The runs use the default layout: only the mixers train, the frozen copied weights are the
teacher's own tensors and are left out of checkpoints. Weight decay is on so that the
no-decay group (A_log, D, dt_bias) differs from the mixers' group: a resume that gave every
param group the first group's settings would show in the losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import tiny_overrides
from launcher import deepspeed_command, launcher_env, metrics, run

from cald_scale.config_loader import ConfigError
from cald_scale.engines.reshard import UNIVERSAL, remap_cursor, saved_world_size, universal_copy

pytestmark = pytest.mark.distributed

# NOTE: fp32 on CPU; 1 and 2 ranks differ only in summation order (one batch of 4 vs two of 2
# and a gloo all-reduce): at most 1.7e-7 relative over the 6 steps here. A universal resume
# without repair_universal_optimizer is off by 4.7e-3 two steps after resuming.
RTOL = 1e-5
KEYS = ("loss", "ce", "layer")


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _overrides(teacher_dirs, run_dir, data_cache, **extra) -> list[str]:
    return tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **{"student.trainable": "mixers", "train.weight_decay": 0.1, **extra})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, teacher_dirs, data_cache):
    """6 steps on 2 ranks (global batch 4 = 2 ranks x 2 sequences), checkpoints kept at steps 2, 4, 6."""
    run_dir = tmp_path_factory.mktemp("resume_ranks") / "two"
    _ok(run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"output.keep_last": 3}), ranks=2), launcher_env(run_dir)))
    return run_dir


def test_frozen_copies_stay_out_of_checkpoints_and_unloadable_checkpoints_stop_the_job(tmp_path, two_ranks, teacher_dirs, data_cache):
    """trainable=mixers: the copied weights are the teacher's and are left out of checkpoints
    (test_two_rank_checkpoint_resumes_on_one_rank_on_the_same_trajectory resumes from one: they come back from the teacher)."""
    run_dir = tmp_path / "two"
    shutil.copytree(two_ranks, run_dir)
    # Far smaller than the tiny teacher's 49k x 64 embedding alone (12.6 MB).
    for tag in sorted((run_dir / "checkpoints").glob("step_*")):
        model_states = sum(p.stat().st_size for p in tag.rglob("*model_states.pt"))
        assert 0 < model_states < 2e6, (tag.name, model_states)

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
    refused = run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"train.max_steps": 8}), ranks=2), launcher_env(tmp_path))
    assert refused.returncode != 0 and "refusing to start over" in refused.stdout + refused.stderr
    assert sorted((run_dir / "checkpoints").glob("step_*")) == tags


def test_two_rank_checkpoint_resumes_on_one_rank_on_the_same_trajectory(tmp_path, two_ranks, teacher_dirs, data_cache):
    """1 and 2 ranks follow one loss trajectory: the 2-rank run's step-2 checkpoint, resumed on
    1 rank, logs the 2-rank run's losses for steps 3-6."""
    reference = metrics(two_ranks)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and reference[6]["loss"] < reference[1]["loss"]  # it trains
    assert json.loads((two_ranks / "report.json").read_text())["world_size"] == 2
    # The 2-rank run as a job stopped after its step-2 checkpoint would have left it.
    run_dir = tmp_path / "resumed"
    shutil.copytree(two_ranks, run_dir)
    ckpt = run_dir / "checkpoints"
    for later in ("step_00000004", "step_00000006"):
        shutil.rmtree(ckpt / later)
    shutil.rmtree(run_dir / "student")
    (run_dir / "report.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 2]
    (run_dir / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))
    assert saved_world_size(ckpt / "step_00000002") == 2

    # 1 rank with grad_accum 2: micro-steps of 2 sequences instead of 2 x 2, so the saved
    # data cursor (2 micro-steps) must become 4 to read the same samples.
    overrides = _overrides(teacher_dirs, run_dir, data_cache, **{"train.grad_accum": 2, "output.keep_last": 3})
    log = _ok(run(deepspeed_command(overrides, ranks=1), launcher_env(tmp_path)))
    assert "resuming run at step 2/6 on 1 rank(s)" in log

    # No step lost or repeated: this session logged exactly steps 3-6, on the 2-rank trajectory.
    new = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[len(kept):]]
    assert [r["step"] for r in new if "loss" in r] == [3, 4, 5, 6]
    after = metrics(run_dir)
    for step in (3, 4, 5, 6):
        assert after[step]["lr"] == reference[step]["lr"]
        assert after[step]["tokens"] == reference[step]["tokens"]
        for key in KEYS:
            assert after[step][key] == pytest.approx(reference[step][key], rel=RTOL), (step, key)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 1 and report["steps"] == 6 and report["tokens_seen"] == 6 * 4 * 64
    assert saved_world_size(ckpt / "step_00000006") == 1

    # The converted copy sits in its tag, complete, and a second resume reuses it as it is.
    tag = ckpt / "step_00000002"
    marker = tag / UNIVERSAL / "cald_universal.json"
    assert json.loads(marker.read_text())["source_world_size"] == 2
    before = marker.stat().st_mtime_ns
    assert universal_copy(tag) == tag / UNIVERSAL and marker.stat().st_mtime_ns == before
    assert not (tag / "latest_universal").exists() and not list(tag.glob(f".{UNIVERSAL}.tmp-*"))

    # Another global batch would read another data order: refused before any engine is built.
    tags = sorted(p.name for p in ckpt.glob("step_*"))
    refused = run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"train.global_batch_size": 2, "train.max_steps": 8}), ranks=1), launcher_env(tmp_path))
    assert refused.returncode != 0
    assert "global batch of 4 sequences, this run with 1 data-parallel rank(s) uses 2" in refused.stdout + refused.stderr
    assert sorted(p.name for p in ckpt.glob("step_*")) == tags

    # Other data than the first session read (a corpus changed since: its cache key, so its split,
    # is another): refused before any engine is built, the run folder untouched.
    recorded = json.loads((run_dir / "data.json").read_text())
    assert recorded["train"]["tokens"] == 30000 and recorded["heldout"]["tokens"] > 0
    (run_dir / "data.json").write_text(json.dumps({**recorded, "train": {**recorded["train"], "source": "corpus-0123456789abcdef/train"}}))
    config = (run_dir / "config.json").read_text()
    refused = run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"train.max_steps": 8}), ranks=1), launcher_env(tmp_path))
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "changed since it started (its newest checkpoint is at step 6): train was" in out and "restore it, or start a new run" in out
    assert sorted(p.name for p in ckpt.glob("step_*")) == tags and (run_dir / "config.json").read_text() == config

    # Another teacher at the same path (its weights saved anew since the first session; here the
    # record of them altered, as the fixture's teacher is shared): refused the same way.
    (run_dir / "data.json").write_text(json.dumps(recorded))
    weights = json.loads((run_dir / "teacher.json").read_text())["teacher"]["weights"]
    assert [name for name, _, _ in weights] == ["model.safetensors"]
    (run_dir / "teacher.json").write_text(json.dumps({"teacher": {"weights": [[name, size, "0" * 16] for name, size, _ in weights]}}))
    refused = run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"train.max_steps": 8}), ranks=1), launcher_env(tmp_path))
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "the teacher or student.init_from of run" in out and "changed since it started (its newest checkpoint is at step 6): teacher was" in out
    assert sorted(p.name for p in ckpt.glob("step_*")) == tags and (run_dir / "config.json").read_text() == config


def test_a_teacher_with_non_finite_outputs_is_refused_at_its_baseline(tmp_path, teacher_dirs, data_cache):
    """One NaN in a teacher weight (a damaged checkpoint): refused once its held-out score is
    NaN, naming the teacher, before the student is scored or any step runs (it trained on, the
    layer losses NaN, and stopped steps later blaming the learning rate)."""
    import torch
    from safetensors.torch import load_file, save_file

    teacher = shutil.copytree(teacher_dirs["llama"], tmp_path / "damaged")
    weights = load_file(teacher / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(teacher, run_dir, data_cache, **{"student.trainable": "mixers"})
    refused = run(deepspeed_command(overrides, ranks=1), launcher_env(tmp_path))
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and f"teacher {str(teacher)!r} scores heldout.ppl=inf, heldout.nll=nan on held-out data" in out and "its outputs are not finite" in out, out[-3000:]
    assert "converted student" not in out and not (run_dir / "checkpoints").exists() and not metrics(run_dir)
    assert torch.isnan(load_file(teacher / "model.safetensors")[key]).any()


def test_a_train_split_under_one_global_batch_is_refused_before_the_engines(tmp_path, teacher_dirs, data_cache):
    """Two sequences of 64 tokens against a global batch of 4: named before the models are built and
    both baselines scored (minutes with a real teacher), not after."""
    run_dir = tmp_path / "tiny"
    refused = run(deepspeed_command(_overrides(teacher_dirs, run_dir, data_cache, **{"data.max_train_tokens": 150}), ranks=1), launcher_env(tmp_path))
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "the dataset has 2 sequences, fewer than one global batch of 4" in out
    assert "converted student" not in out and not (run_dir / "baseline.json").exists()


def _saved(cursor: int, *, micro: int, accum: int, world: int) -> dict:
    """A client state as DeepSpeed returns it: ours plus the engine's ds_config."""
    ds_config = {"train_batch_size": micro * accum * world, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
    return {"micro_cursor": cursor, "tokens_seen": 123, "ds_config": ds_config}


def test_data_cursor_is_a_position_in_samples():
    # 64 ranks x 1 sequence, no accumulation -> 32 ranks x 1 sequence x 2 micro-steps: twice the micro-steps.
    assert remap_cursor(_saved(10, micro=1, accum=1, world=64), micro_batch=1, grad_accum=2, world_size=32)["micro_cursor"] == 20
    # 2 ranks x 2 -> 1 rank x 4: the same micro-step size, nothing to change.
    assert remap_cursor(_saved(4, micro=2, accum=1, world=2), micro_batch=4, grad_accum=1, world_size=1) == _saved(4, micro=2, accum=1, world=2)
    # 1 rank x 2 x 2 micro-steps -> 2 ranks x 2: a skipped (non-finite) micro-batch left the cursor
    # mid-step (5 x 2 samples): the next whole micro-step of 4 starts at sample 12, none read twice.
    assert remap_cursor(_saved(5, micro=2, accum=2, world=1), micro_batch=2, grad_accum=1, world_size=2)["micro_cursor"] == 3
    with pytest.raises(ConfigError, match="global batch of 4 sequences, this run with 2 data-parallel rank.s. uses 8"):
        remap_cursor(_saved(4, micro=2, accum=1, world=2), micro_batch=4, grad_accum=1, world_size=2)
