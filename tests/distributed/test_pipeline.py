"""Pipeline mode under the real deepspeed launcher: 2 CPU ranks = 2 stages x 1 replica.

Run as a script on every rank (``--out DIR --teachers JSON``), it builds the ZeRO-3 mode
and the pipeline mode on the same tiny teacher, gives both the same batch and saves each
one's losses and gradients to <out>/rank<r>.pt; the tests compare them. Whole runs of
both modes through ``launch/train.py`` (phases, checkpoints, resume, export) are compared
too, and the pipeline config and its refusals are checked without a launcher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# name -> (teacher family, overrides): every loss path of both modes.
CASES = {
    # Frozen copies shared with the teacher; CE over the frozen head read by rows, layer loss across the stage boundary.
    "e2e_mixers": ("llama", []),
    # CE and KL over token chunks (recomputed in backward), teacher head on the last stage.
    "e2e_kl": ("llama", ["loss.a_kl=0.5", "loss.head_chunk_tokens=24"]),
    # Each student block on the teacher's input: only the layer losses travel back.
    "teacher_forced": ("llama", ["phases=[{name: tf, mode: teacher_forced}]", "loss.skip_last=false"]),
    # The same with sub-stages of 2 blocks (stage 1 holds blocks 1 and 2): still each block on the teacher's input.
    "teacher_forced_substages": ("llama", ["phases=[{name: tf, mode: teacher_forced}]", "loss.skip_last=false", "train.stage_size=2"]),
    # Every weight trains (an untied head): embedding grads on stage 0, head grads on stage 1.
    "e2e_all_neox": ("gpt_neox", ["student.trainable=all", "student.conversion.mixer=mamba"]),
    # A bf16 teacher source under an fp32 engine (CPU): both modes' builders compute in the engine's
    # fp32 (the pipeline built bf16 copies that its fp32 mixers then refused). A run refuses this
    # teacher.dtype before (train.with_compute_dtype); the builders still take the engine's.
    "e2e_bf16_teacher_fp32_engine": ("llama", ["teacher.dtype=bfloat16"]),
    # Gemma2's embedding scale is a buffer no checkpoint stores: stage 0 keeps it as built. Its
    # family has no sdpa: the default teacher.attn_implementation runs eager.
    "e2e_gemma2": ("gemma2", []),
    # GPT-2's absolute position table sits on the base model beside the embedding: stage 0 holds
    # it, and every weight (an untied head) trains.
    "e2e_gpt2_positions": ("gpt2", ["student.trainable=all"]),
}


# -- the script, on every rank --------------------------------------------------------------
def _setup(teacher: str, overrides: list[str], stages: int):
    from cald_scale.config import load_run_config
    from cald_scale.conversion.teacher import open_teacher
    from cald_scale.engines.distributed import init_distributed

    env = init_distributed()
    cfg = load_run_config(overrides=[
        f"teacher.name_or_path={teacher}", "train.global_batch_size=4", "train.max_steps=4", "train.warmup_steps=0",
        "phases=[{name: target, guidance: target}]", "student.trainable=mixers", "student.conversion.attention_every=0", *overrides, f"train.pipeline_stages={stages}",
    ])
    source, _ = open_teacher(cfg.teacher)
    ids = torch.randint(0, source.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1234))  # the same whole batch on every rank
    return env, cfg, source, ids


def _zero3(teacher: str, overrides: list[str]) -> dict:
    """ZeRO-3 mode: both ranks run the whole batch, so the averaged gradient is the batch's."""
    from deepspeed.utils import safe_get_full_grad

    from cald_scale.engines.models import build_models
    from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config
    from cald_scale.train import forward_backward

    env, cfg, source, ids = _setup(teacher, overrides, stages=0)
    ds_config = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), cfg.train, env.world_size)
    models = build_models(cfg, ds_config, source)
    phase = cfg.plan(env.world_size).phases[0]
    models.apply_phase(phase, cfg.student.trainable)
    parts, _ = forward_backward(models, models.teacher, phase, ids, cfg)
    zero3 = {
        "losses": parts.as_floats(),
        "per_layer": parts.per_layer,
        "grads": {n: safe_get_full_grad(p).clone() for n, p in models.student_engine.module.named_parameters() if p.requires_grad},
    }
    models.student_engine.step()
    zero3["grad_norm"] = float(models.student_engine.get_global_grad_norm())
    return zero3


def _pipeline(teacher: str, overrides: list[str]) -> dict:
    """Pipeline mode: one replica of 2 stages, one micro-batch of the same 4 sequences."""
    from cald_scale.engines.pipeline import PipelineGuide, build_pipeline, load_pipeline_ds_config, pipeline_train_step
    from cald_scale.distill.progress import StepState

    env, cfg, source, ids = _setup(teacher, overrides, stages=2)
    ds_config = load_pipeline_ds_config(REPO / "ds_configs" / "pipeline.json", cfg.train, env.world_size)
    plan = cfg.plan(cfg.train.data_parallel_size(env.world_size))
    pipe = build_pipeline(cfg, ds_config, source, plan)
    pipe.apply_phase(plan.phases[0], cfg.student.trainable)
    grads: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(grad):  # a stage may back-propagate its outputs one by one: sum the pieces
            grads[name] = grads[name] + grad if name in grads else grad.detach().clone()

        return hook

    for name, param in pipe.stage.named_student_tensors(keep_vars=True):
        if param.requires_grad:
            param.register_hook(keep(name))
    record = pipeline_train_step(pipe, PipelineGuide(plan, pipe, base_weights=str(source.folder)), plan.phases[0], 0, lambda cursor: {"input_ids": ids}, StepState({}), cfg, tokens_per_micro=ids.numel())
    return {"record": record, "grads": grads, "grad_norm": float(pipe.student_engine.get_global_grad_norm()), "stage": pipe.stage.index, "bounds": pipe.bounds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teachers", required=True, help="JSON: family -> teacher folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    teachers = json.loads(args.teachers)
    # NOTE: every ZeRO-3 engine first: a PipelineEngine leaves its grid as DeepSpeed's global
    # model-parallel unit, which engines built after it in the same process then misread.
    zero3 = {name: _zero3(teachers[family], overrides) for name, (family, overrides) in CASES.items()}
    results = {name: {"zero3": zero3[name], "pipeline": _pipeline(teachers[family], overrides)} for name, (family, overrides) in CASES.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(args.out) / f"rank{os.environ.get('RANK', '0')}.pt")


# -- the tests ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, real_tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gemma2")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gemma2", vocab_size=len(real_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=32, pad_token_id=real_tokenizer.pad_token_id,
        eos_token_id=real_tokenizer.eos_token_id, bos_token_id=real_tokenizer.bos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, real_tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(real_tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=128, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the modes draw different dropout masks
        pad_token_id=real_tokenizer.pad_token_id, eos_token_id=real_tokenizer.eos_token_id, bos_token_id=real_tokenizer.bos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compared(tmp_path_factory, teacher_dirs, gemma2_dir, gpt2_dir) -> list[dict]:
    from launcher import free_port, launcher_env, run

    out = tmp_path_factory.mktemp("pipeline_vs_zero3")
    teachers = json.dumps({family: str(path) for family, path in {**teacher_dirs, "gemma2": gemma2_dir, "gpt2": gpt2_dir}.items()})
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), __file__, "--teachers", teachers, "--out", str(out)]
    proc = run(cmd, launcher_env(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_losses_and_gradients_equal_zero3(compared, case):
    ranks = [r[case] for r in compared]
    assert [r["pipeline"]["stage"] for r in ranks] == [0, 1] and ranks[0]["pipeline"]["bounds"] == [0, 1, 3]
    zero3 = ranks[0]["zero3"]
    # Losses: the total and every part, per distilled layer too (reported identically on both stages).
    for rank in ranks:
        record = rank["pipeline"]["record"]
        assert set(record) - {"layer_losses"} == set(zero3["losses"]), (record, zero3["losses"])
        for key, value in zero3["losses"].items():
            assert record[key] == pytest.approx(value, rel=1e-6), key
        assert record["layer_losses"] == pytest.approx(zero3["per_layer"], rel=1e-6)
        assert rank["pipeline"]["grad_norm"] == pytest.approx(zero3["grad_norm"], rel=1e-5)  # clipping sees all stages
    # Gradients: each stage holds its own blocks' trainable tensors, together exactly ZeRO-3's.
    stage0, stage1 = (set(r["pipeline"]["grads"]) for r in ranks)
    assert not stage0 & stage1 and stage0 | stage1 == set(zero3["grads"]), (stage0 ^ set(zero3["grads"]), stage1)
    first_block = re.compile(r"\.(layers|h)\.0\.")  # GPT-2 keeps its blocks in h, its embeddings as wte and wpe
    assert all(first_block.search(n) or re.search(r"embed|\.wte\.|\.wpe\.", n) for n in stage0) and not any(first_block.search(n) for n in stage1)
    for rank in ranks:
        for name, grad in rank["pipeline"]["grads"].items():
            expected = zero3["grads"][name]
            assert expected.abs().max() > 0, name
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _drop_last_tag_and_resume(run_dir: Path, last: int, cmd: list[str], env: dict, *, at: int) -> dict:
    """Delete the step-``last`` checkpoint, rerun ``cmd``: it must resume at step ``at``; the metrics after."""
    from launcher import metrics, run

    shutil.rmtree(run_dir / "checkpoints" / f"step_{last:08d}")
    resumed = run(cmd, env)
    _ok(resumed)
    assert f"resuming run at step {at}" in resumed.stdout + resumed.stderr
    return metrics(run_dir)


@pytest.mark.distributed
def test_pipeline_run_trains_as_zero3_resumes_and_exports(tmp_path, teacher_dirs, data_cache, default_recipe_run):
    """The default recipe (teacher-forced alignment, then end to end) through launch/train.py in both modes."""
    from conftest import tiny_overrides
    from launcher import deepspeed_command, launcher_env, metrics, run

    from cald_scale.conversion.weights import open_weights

    env = launcher_env(tmp_path)
    recipe = {"student.trainable": None, "phases": None}  # as default_recipe_run, the ZeRO-3 reference
    zero3_dir, pipe_dir = default_recipe_run, tmp_path / "pipeline"
    cmd = deepspeed_command(tiny_overrides(teacher_dirs["llama"], pipe_dir, data_cache, **recipe, **{"train.pipeline_stages": 2}), ds_config="ds_configs/pipeline.json")
    _ok(run(cmd, env))
    zero3, reference = metrics(zero3_dir), metrics(pipe_dir)
    assert [reference[s]["phase_name"] for s in range(1, 7)] == ["align"] * 4 + ["end_to_end"] * 2
    assert "ce" not in reference[4] and "ce" in reference[5] and len(reference[1]["layer_losses"]) == 3  # teacher-forced: every block, the last too
    # The same data, updates and clipping: every step's global gradient norm, and the models' perplexities.
    for step in range(1, 7):
        assert reference[step]["grad_norm"] == pytest.approx(zero3[step]["grad_norm"], rel=1e-4), step
    ours, theirs = (json.loads((d / "report.json").read_text()) for d in (pipe_dir, zero3_dir))
    assert ours["world_size"] == 2 and ours["steps"] == 6 and ours["tokens_seen"] == theirs["tokens_seen"]
    assert ours["ppl_teacher"] == pytest.approx(theirs["ppl_teacher"], rel=1e-6)
    assert ours["ppl_student_before"] == pytest.approx(theirs["ppl_student_before"], rel=1e-6)
    assert ours["ppl_student_after"] == pytest.approx(theirs["ppl_student_after"], rel=1e-4)
    assert ours["ppl_student_after"] < ours["ppl_student_before"]
    # The exported student: one shard per stage, the same tensors as the ZeRO-3 export (from_pretrained loads it).
    assert sorted(p.name for p in (pipe_dir / "student").glob("*.safetensors")) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    configs = [json.loads((d / "student" / "config.json").read_text()) for d in (pipe_dir, zero3_dir)]
    assert configs[0]["architectures"] == configs[1]["architectures"] == ["CaldStudentForCausalLM"]
    exported, expected = open_weights(pipe_dir / "student"), open_weights(zero3_dir / "student")
    assert sorted(exported.keys()) == sorted(expected.keys())
    for key in expected.keys():
        torch.testing.assert_close(exported.get(key), expected.get(key), rtol=1e-4, atol=1e-5, msg=key)
    from transformers import AutoModelForCausalLM

    import cald_scale  # noqa: F401  (registers the student classes)

    student = AutoModelForCausalLM.from_pretrained(pipe_dir / "student")
    assert torch.isfinite(student(torch.randint(0, 1000, (1, 16))).logits).all()

    # Data parallel across pipeline replicas (ZeRO-1): 1 stage x 2 replicas trains as the other two.
    replicas_dir = tmp_path / "replicas"
    _ok(run(deepspeed_command(tiny_overrides(teacher_dirs["llama"], replicas_dir, data_cache, **recipe, **{"train.pipeline_stages": 1}), ds_config="ds_configs/pipeline.json"), env))
    replicated = metrics(replicas_dir)
    for step in range(1, 7):
        for key in ("loss", "layer", "grad_norm"):
            assert replicated[step][key] == pytest.approx(zero3[step][key], rel=1e-4), (step, key)
    assert json.loads((replicas_dir / "report.json").read_text())["ppl_student_after"] == pytest.approx(theirs["ppl_student_after"], rel=1e-4)

    # Frozen copies stay out of checkpoints; losing the last one, the same command resumes at step 4 and repeats steps 5-6.
    # Each stage's rank seals exactly its own files.
    sealed = {r: set(json.loads((pipe_dir / "checkpoints" / "step_00000006" / f"cald_done_rank_{r:05d}.json").read_text())["files"]) for r in (0, 1)}
    assert {"layer_01-model_states.pt", "mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"} <= sealed[1]
    assert {"layer_00-model_states.pt", "mp_rank_00_model_states.pt"} <= sealed[0] and not sealed[0] & sealed[1]
    after = _drop_last_tag_and_resume(pipe_dir, 6, cmd, env, at=4)
    for step in (5, 6):
        for key in ("loss", "ce", "layer", "grad_norm"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)

    # Another pipeline layout is refused before anything is built; another micro-batch layout at the
    # same global batch (2 micro-batches of 2 instead of 1 of 4) resumes with its data cursor remapped.
    shutil.rmtree(pipe_dir / "checkpoints" / "step_00000006")
    overrides = tiny_overrides(teacher_dirs["llama"], pipe_dir, data_cache, **recipe)
    refused = run(deepspeed_command([*overrides, "train.pipeline_stages=1"], ds_config="ds_configs/pipeline.json"), env)
    log = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "was saved by a 2-stage pipeline and this run is a 1-stage pipeline" in log, log[-3000:]
    assert "Traceback" not in log
    regrouped = run(deepspeed_command([*overrides, "train.pipeline_stages=2", "train.grad_accum=2"], ds_config="ds_configs/pipeline.json"), env)
    _ok(regrouped)
    assert "data cursor remapped: 4 micro-steps of 4 samples -> 8 of 2" in regrouped.stdout + regrouped.stderr
    after = metrics(pipe_dir)
    for step in (5, 6):
        for key in ("loss", "layer", "grad_norm"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-4), (step, key)


# -- without a launcher -----------------------------------------------------------------------
def test_shipped_recipes_fit_the_pipeline_ds_config():
    from cald_scale.config import load_run_config
    from cald_scale.engines.pipeline import load_pipeline_ds_config

    from cald_scale.config_loader import ConfigError

    for recipe in sorted((REPO / "recipes").rglob("*.yaml")):
        plain = load_run_config(recipe)
        if plain.task.kind == "classification":  # ZeRO-3 only, refused in one line
            with pytest.raises(ConfigError, match="pipeline mode .* runs causal LMs; classification runs under ZeRO-3"):
                load_run_config(recipe, ["train.pipeline_stages=2"])
            continue
        if any(phase.guidance == "trajectory" for phase in plain.phases):  # the teacher trains: ZeRO-3 only, refused with the config
            with pytest.raises(ConfigError, match="trajectory guidance trains the teacher in a training engine of its own"):
                load_run_config(recipe, ["train.pipeline_stages=2"])
            continue
        cfg = load_run_config(recipe, ["train.pipeline_stages=2"])
        resolved = load_pipeline_ds_config(REPO / "ds_configs" / "pipeline.json", cfg.train, world_size=4)
        assert resolved["pipeline"]["stages"] == 2 and resolved["zero_optimization"]["stage"] == 1
        # 4 ranks = 2 replicas of a 2-stage pipeline: the global batch splits over the replicas only.
        assert resolved["train_batch_size"] == cfg.train.micro_batch(2) * cfg.train.grad_accum * 2, recipe.name


def _one_stage(teacher: Path, *, share: bool, extra: tuple[str, ...] = ()):
    from cald_scale.config import load_run_config
    from cald_scale.conversion.teacher import open_teacher
    from cald_scale.engines.pipeline import CaldStage, StageFactory, stage_bounds

    cfg = load_run_config(overrides=[
        f"teacher.name_or_path={teacher}", "train.global_batch_size=4", "train.max_steps=4", "phases=[{name: a, guidance: target}]",
        "student.trainable=mixers", "student.conversion.attention_every=0", "train.pipeline_stages=1", *extra,
    ])
    source, _ = open_teacher(cfg.teacher)
    factory = StageFactory(cfg, source, stage_bounds(source.config.num_hidden_layers, 1), with_teacher=True, share=share,
                           dtype=torch.float32, device=torch.device("cpu"))
    return CaldStage(factory, 0)


@pytest.mark.parametrize("share", [False, True])
def test_a_stage_reports_the_teacher_memory_it_frees_and_no_leak(teacher_dirs, share):
    """A one-stage pipeline holds the tied embedding as embedding and head: freed once. The
    tensors the student shares stay and are no leak (they read as teacher_params_alive, the
    figure ZeRO-3 mode reports 0 for when nothing leaks)."""
    stage = _one_stage(teacher_dirs["llama"], share=share)
    teacher = stage.teacher.model
    assert teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight  # tied
    mine = {id(p) for p in stage.parameters()}
    unique = {id(p): p for p in teacher.parameters()}
    expected = sum(p.numel() * p.element_size() for i, p in unique.items() if i not in mine)
    assert any(i in mine for i in unique) == share
    del teacher, unique
    freed, alive = stage.release_teacher()
    assert (freed, alive) == (expected, 0) and stage.teacher is None


def test_a_stage_evaluates_the_student_without_its_embedding_dropout(teacher_dirs, tmp_path):
    """eval() (the engine's eval_batch) reaches the student's embedding dropout, which sits
    outside the stage's owned pieces: two scores of one batch are one."""
    from cald_scale.engines.pipeline import _Mode

    folder = tmp_path / "neox_dropout"
    shutil.copytree(teacher_dirs["gpt_neox"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"hidden_dropout": 0.3}))
    stage = _one_stage(folder, share=True, extra=("student.conversion.mixer=mamba",))
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    stage.mode = _Mode("eval_student")
    with torch.no_grad():
        stage.train()
        assert float(stage(ids)) != float(stage(ids))  # the dropout is real
        stage.eval()
        assert float(stage(ids)) == float(stage(ids))


def test_pipeline_config_errors_name_the_problem(tmp_path):
    from cald_scale.config import load_run_config
    from cald_scale.config_loader import ConfigError
    from cald_scale.engines.pipeline import _check_supported, load_pipeline_ds_config, stage_bounds

    cfg = load_run_config(overrides=["train.pipeline_stages=2"])
    with pytest.raises(ConfigError, match="needs a ds_config with a pipeline section"):
        load_pipeline_ds_config(REPO / "ds_configs" / "zero3.json", cfg.train, world_size=2)
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        load_pipeline_ds_config(REPO / "ds_configs" / "pipeline.json", cfg.train, world_size=3)
    bad = tmp_path / "pipe_z3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "pipeline": {}}))
    with pytest.raises(ConfigError, match="refuses ZeRO-2 and -3"):
        load_pipeline_ds_config(bad, cfg.train, world_size=2)
    with pytest.raises(ValueError, match="pipeline_stages must be >= 0"):
        load_run_config(overrides=["train.pipeline_stages=-1"])
    # A step is skipped through DeepSpeed's overflow check: the set-ups without one are refused.
    shipped = json.loads((REPO / "ds_configs" / "pipeline.json").read_text())
    for name, change, message in [
        ("z0", {"zero_optimization": {"stage": 0}}, "in float32, pipeline mode needs zero_optimization.stage 1"),
        ("nonorm", {"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, "needs zero_optimization.compute_grad_norm"),
    ]:
        path = tmp_path / f"pipe_{name}.json"
        path.write_text(json.dumps({**shipped, **change}))
        with pytest.raises(ConfigError, match=message):
            load_pipeline_ds_config(path, cfg.train, world_size=2)
    from cald_scale.engines.pipeline import _check_overflow_guard

    with pytest.raises(ConfigError, match="needs bf16.check_grad_overflow"):
        _check_overflow_guard({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}}, bad)
    _check_overflow_guard({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, bad)  # BF16_Optimizer: always checks
    _check_overflow_guard({"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}, bad)  # the loss scaler

    assert stage_bounds(3, 2) == [0, 1, 3] and stage_bounds(8, 4) == [0, 2, 4, 6, 8] and stage_bounds(5, 2, [0, 3, 5]) == [0, 3, 5]
    with pytest.raises(ConfigError, match="exceeds the teacher's 3 blocks"):
        stage_bounds(3, 4)
    with pytest.raises(ConfigError, match="increasing block boundaries"):
        stage_bounds(5, 2, [0, 5, 5])

    with pytest.raises(ValueError, match="phase 't': trajectory guidance trains the teacher in a training engine of its own"):
        load_run_config(overrides=["train.pipeline_stages=2", "phases=[{name: t, guidance: trajectory}]"])  # refused with the config
    tied_all = load_run_config(overrides=["train.pipeline_stages=2", "student.trainable=all", "phases=[{name: e, trainable: all}]"])
    with pytest.raises(ConfigError, match="tied input/output embedding"):
        _check_supported(tied_all, tied_all.plan(1), tied=True)
    _check_supported(tied_all, tied_all.plan(1), tied=False)  # an untied head trains in pipeline mode

    # A stage of attention blocks only (the default layout keeps layers 1, 5, ..., 29) has no mixer.
    from transformers import LlamaConfig

    from cald_scale.engines.pipeline import _check_every_stage_converts

    default, teacher = load_run_config(overrides=["train.pipeline_stages=2"]), LlamaConfig(num_hidden_layers=30)
    with pytest.raises(ConfigError, match=r"pipeline stage 1 holds blocks \[29, 30\), which all keep the teacher's attention"):
        _check_every_stage_converts(default, teacher, stage_bounds(30, 2, [0, 29, 30]))
    _check_every_stage_converts(default, teacher, stage_bounds(30, 2, [0, 28, 30]))


@pytest.mark.distributed
def test_three_stages_train_every_weight_through_both_phase_modes_and_resume(tmp_path, teacher_dirs, data_cache):
    """gpt_neox -> Mamba, 3 stages x 1 replica (3 CPU ranks), every weight training, weight decay on. ZeRO-1 all-reduces
    a gradient norm per optimizer group across a replica's stages, so the middle stage, which has no
    embedding or head, must still have their 'outside' group (a stand-in; without it the first step
    hung). The teacher-forced phase holds that group at LR 0; the stand-in is never exported."""
    from conftest import tiny_overrides
    from launcher import deepspeed_command, launcher_env, metrics, run

    from cald_scale.conversion.weights import open_weights

    env = launcher_env(tmp_path)
    run_dir = tmp_path / "three"
    phases = "[{name: e2e, steps: 2}, {name: tf, steps: 2, mode: teacher_forced}]"
    overrides = tiny_overrides(
        teacher_dirs["gpt_neox"], run_dir, data_cache,  # untied: pipeline mode trains no tied embedding
        **{"train.pipeline_stages": 3, "phases": phases, "train.max_steps": 4, "train.weight_decay": 0.1, "student.conversion.mixer": "mamba"},
    )
    cmd = deepspeed_command(overrides, ranks=3, ds_config="ds_configs/pipeline.json")
    _ok(run(cmd, env))
    history = metrics(run_dir)
    assert [history[s]["phase_name"] for s in range(1, 5)] == ["e2e"] * 2 + ["tf"] * 2
    e2e, tf = history[2]["lr_groups"], history[4]["lr_groups"]
    assert e2e["outside"] == e2e["copied"] > 0 and tf["outside"] == 0.0 and tf["copied"] > 0
    assert all(math.isfinite(history[s]["loss"]) for s in range(1, 5))
    exported = open_weights(run_dir / "student")
    assert not [k for k in exported.keys() if "stand_in" in k]
    # The stand-in is in the middle stage's checkpoint: losing the last tag, the run resumes at step 2.
    after = _drop_last_tag_and_resume(run_dir, 4, cmd, env, at=2)
    for step in (3, 4):
        assert after[step]["loss"] == pytest.approx(history[step]["loss"], rel=1e-5), step


def _saved_tensors(tag: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a pipeline checkpoint's weights (layer files) and optimizer states, by file and key."""
    found: dict[str, torch.Tensor] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)

    for path in sorted(tag.glob("*.pt")):
        if path.name.startswith("layer_") or path.name.endswith("optim_states.pt"):
            walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return found


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a and sorted(a) == sorted(b)
    return all(torch.equal(a[k], b[k]) for k in a)


def _run_with_nan_losses(run_dir: Path, teacher_dirs, data_cache, *, stages: int, **extra):
    """A pipeline run on 2 CPU ranks of 2 micro-batches a step, its mixers training, three
    non-finite micro-steps in a row allowed; ``extra``: the overrides that poison it."""
    from conftest import tiny_overrides
    from launcher import deepspeed_command, launcher_env, run

    pipe = {"train.pipeline_stages": stages, "student.trainable": "mixers", "train.grad_accum": 2, "train.global_batch_size": 4, "train.max_consecutive_nan": 3}
    overrides = tiny_overrides(teacher_dirs["llama"], run_dir, data_cache, **pipe, **extra)
    return run(deepspeed_command(overrides, ds_config="ds_configs/pipeline.json"), launcher_env(run_dir.parent))


@pytest.mark.distributed
def test_pipeline_nan_losses_are_masked_counted_then_stop_the_run(tmp_path, teacher_dirs, data_cache):
    """Pipeline mode cannot redraw a micro-batch inside its schedule: a non-finite one is masked
    (no gradient) and counted; a step with every micro-batch masked is skipped (weights and
    optimizer state unchanged); three in a row stop the run in one line, checkpoints intact."""
    from launcher import metrics

    # Step 2: one of them is non-finite, masked; the step reports the other.
    # Steps 4 and 5: both are; step 4 is skipped, and the third in a row stops the run at step 5.
    run_dir = tmp_path / "nan"
    failed = _run_with_nan_losses(
        run_dir, teacher_dirs, data_cache, stages=2,
        **{"train.max_steps": 8, "debug.nan_at_micro_steps": "[2,6,7,8,9]", "output.save_every": 1, "output.keep_last": 3},
    )
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "3 non-finite losses in a row at step 5" in out
    assert "step 4: the optimizer step was skipped (every micro-batch was non-finite)" in out
    history = metrics(run_dir)
    assert sorted(history) == [1, 2, 3, 4] and [history[s]["nan_skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 3]
    assert [history[s]["step_applied"] for s in (1, 2, 3, 4)] == [True, True, True, False]
    # The wholly masked step has no finite loss: null, as metrics.jsonl is strict JSON.
    assert all(math.isfinite(history[s]["loss"]) for s in (1, 2, 3)) and history[4]["loss"] is None
    tags = run_dir / "checkpoints"
    assert sorted(p.name for p in tags.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    # Step 3 learned; the wholly masked step 4 left every weight and optimizer state as it was.
    step_2, step_3, step_4 = (_saved_tensors(tags / f"step_{s:08d}") for s in (2, 3, 4))
    assert not _same_tensors(step_2, step_3)
    assert _same_tensors(step_3, step_4)
    assert not (run_dir / "report.json").exists()


@pytest.mark.distributed
def test_pipeline_replicas_count_a_masked_micro_step_once_and_step_on_the_others(tmp_path, teacher_dirs, data_cache):
    """1 stage x 2 replicas: replica 1 alone has non-finite losses. Its wholly masked step still
    steps (replica 0's micro-batches count), and each masked micro-step counts once."""
    from launcher import metrics

    run_dir = tmp_path / "replicas"
    # Step 2 (micro-steps 2 and 3): both of replica 1's micro-batches; step 3: its second.
    proc = _run_with_nan_losses(
        run_dir, teacher_dirs, data_cache, stages=1,
        **{"train.max_steps": 3, "debug.nan_at_micro_steps": "[2,3,5]", "debug.nan_ranks": "[1]", "eval.max_sequences": 2},
    )
    _ok(proc)
    assert "non-finite loss in 2 of 4 micro-batches at step 2 (2 of its 2 micro-steps)" in proc.stdout + proc.stderr
    history = metrics(run_dir)
    assert [history[s]["nan_skipped"] for s in (1, 2, 3)] == [0, 2, 3]
    assert all(history[s]["step_applied"] and math.isfinite(history[s]["loss"]) for s in (1, 2, 3))
    per_step = [history[1]["tokens"], history[2]["tokens"] - history[1]["tokens"], history[3]["tokens"] - history[2]["tokens"]]
    assert per_step == [4 * 64, 2 * 64, 3 * 64]  # only the finite micro-batches' tokens count

if __name__ == "__main__":
    from cald_scale.launch import finish

    finish(main)  # leave as a training rank does: no interpreter finalization under gloo
