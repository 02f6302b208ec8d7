"""Run config: strict keys, overrides, shipped recipes and ds_configs agree."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import torch

from cald_scale.config import RunConfig, config_differences, load_run_config, without_legacy_defaults, without_result_neutral
from cald_scale.config_loader import ConfigError, from_dict, to_dict
from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config, size_zero_buffers, teacher_ds_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
DS_CONFIGS = sorted(p for p in (REPO / "ds_configs").glob("*.json") if p.name != "pipeline.json")  # tests/distributed/test_pipeline.py checks it


def test_default_is_the_embedded_job():
    cfg = load_run_config()
    assert cfg.teacher.name_or_path == "smollm2-135m-instruct"
    assert cfg.student.conversion.mixer == "mamba2"
    assert (cfg.loss.a_ce, cfg.loss.a_layer, cfg.loss.a_kl) == (1.0, 15.0, 0.0)
    # The 25% attention hybrid on general English (benchmarks/results/recovery.md, layouts).
    assert cfg.student.conversion.attention_every == 4 and cfg.data.corpus == "brown"
    # recipes/align_then_e2e.yaml spells the default out.
    spelled = load_run_config(REPO / "recipes" / "align_then_e2e.yaml").to_dict()
    assert {k: v for k, v in spelled.items() if k != "output"} == {k: v for k, v in cfg.to_dict().items() if k != "output"}


def test_the_kept_attention_layers_default_by_task():
    # A listed layout, an explicit 0, a classification run and mixer=none keep no spread.
    assert load_run_config(overrides=["student.conversion.attention_layers=[1]"]).student.conversion.attention_every == 0
    assert load_run_config(overrides=["student.conversion.attention_every=0"]).student.conversion.attention_every == 0
    assert load_run_config(overrides=["task.kind=classification", "teacher.name_or_path=all-minilm-l6-v2"]).student.conversion.attention_every == 0
    assert load_run_config(overrides=["student.conversion.mixer=none", "student.trainable=all"]).student.conversion.attention_every == 0
    assert load_run_config(overrides=["student.conversion.attention_every=2"]).student.conversion.attention_every == 2
    with pytest.raises(ConfigError, match="only one of the two may choose"):
        load_run_config(overrides=["student.conversion.attention_every=2", "student.conversion.attention_layers=[1]"])
    with pytest.raises(ConfigError, match="attention_every must be >= 0"):
        load_run_config(overrides=["student.conversion.attention_every=-1"])


def test_a_classification_run_refuses_the_perplexity_settings_it_would_ignore():
    base = ["task.kind=classification", "teacher.name_or_path=all-minilm-l6-v2"]
    for override, named in (("eval.max_sequences=8", "eval.max_sequences"), ("eval.other_corpora=[]", "eval.other_corpora")):
        with pytest.raises(ConfigError, match=f"{named} set what perplexity scores"):
            load_run_config(overrides=[*base, override])
    load_run_config(overrides=[*base, "classification.max_eval_examples=100"])


def test_a_saved_config_from_before_a_key_reads_its_legacy_value():
    # A run folder written before attention_every existed converted every layer: it differs from
    # today's default (4) and matches an explicit 0, for resume and for benchmark reuse alike.
    saved = load_run_config().to_dict()
    del saved["student"]["conversion"]["attention_every"]
    del saved["debug"]["nan_ranks"]  # added later still: every rank, as nan_at_micro_steps did before it
    for phase in saved["phases"]:  # and in every phase: its own LR schedule, as every phase had
        del phase["lr_schedule"]
    del saved["student"]["conversion"]["mamba2"]["intermediate_size"]  # expand x hidden_size, as before it
    del saved["student"]["conversion"]["bimamba2"]["mamba2"]["intermediate_size"]
    del saved["debug"]["signal_after_build"]
    assert config_differences(saved, load_run_config()) == ["student.conversion.attention_every: saved 0, wanted 4"]
    assert config_differences(saved, load_run_config(overrides=["student.conversion.attention_every=0"])) == []
    # ... and a config at the legacy value digests as it did before the key existed.
    assert without_legacy_defaults(load_run_config(overrides=["student.conversion.attention_every=0"]).to_dict()) == saved


def test_a_saved_config_with_a_renamed_key_reads_under_its_new_name():
    # Run folders written while train.zero3_leaves was the bool train.frozen_leaf_modules resume.
    for old, new in ((True, "frozen"), (False, "none")):
        saved = load_run_config().to_dict()
        del saved["train"]["zero3_leaves"]
        saved["train"]["frozen_leaf_modules"] = old
        assert config_differences(saved, load_run_config(overrides=[f"train.zero3_leaves={new}"])) == []
        assert config_differences(saved, load_run_config()) == [f"train.zero3_leaves: saved {new!r}, wanted 'blocks'"]


def test_result_neutral_keys_stay_out_of_what_identifies_a_result():
    a, b = (load_run_config(overrides=[f"train.zero3_leaves={mode}"]).to_dict() for mode in ("none", "blocks"))
    assert a != b and without_result_neutral(a) == without_result_neutral(b)
    assert "zero3_leaves" not in without_result_neutral(a)["train"]


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.max_stpes") as err:
        load_run_config(overrides=["train.max_stpes=3"])
    assert "max_steps" in str(err.value)
    with pytest.raises(ConfigError, match=re.escape("unknown config key(s) ['train.max_step'] (did you mean train.max_steps?) in TrainConfig")):
        load_run_config(overrides=["train.max_step=3"])
    with pytest.raises(ConfigError, match=re.escape("unknown config key(s) ['trian'] (did you mean train?)")):
        from_dict(RunConfig, {"trian": {}})
    with pytest.raises(ConfigError, match=re.escape('train.frozen_leaf_modules was renamed to train.zero3_leaves (true is "frozen", false is "none")')):
        load_run_config(overrides=["train.frozen_leaf_modules=true"])
    # an index into a list the recipe leaves to its default: the list is given whole
    with pytest.raises(ConfigError, match=re.escape("train.betas is a list the recipe does not give; give it whole (train.betas=[...])")):
        load_run_config(overrides=["train.betas.0=0.5"])


def test_a_mapping_override_merges_into_the_section_it_names():
    """`student.conversion={mixer: mamba}` replaced the recipe's whole conversion section: the
    all-Mamba2 recipe silently became a 25% attention hybrid (the defaults of the keys it dropped)."""
    recipe = REPO / "recipes" / "smollm2_mamba2.yaml"
    plain = load_run_config(recipe).student.conversion
    merged = load_run_config(recipe, ["student.conversion={mixer: mamba, mamba: {d_state: 8}}"]).student.conversion
    assert (plain.attention_every, plain.attention_init) == (merged.attention_every, merged.attention_init) == (0, False)
    assert (merged.mixer, merged.mamba.d_state) == ("mamba", 8)
    phases = load_run_config(recipe, ["phases=[{name: only}]"]).phases
    assert [p.name for p in phases] == ["only"]  # a list is replaced whole
    edited = load_run_config(None, ["phases.0={lr: 0.001}"]).phases[0]  # a list item's mapping merges too
    assert (edited.name, edited.mode, edited.lr) == ("align", "teacher_forced", 0.001)
    # YAML's "{name:target}" is one key, "name:target": the message says what YAML needs.
    with pytest.raises(ConfigError, match=re.escape("['phases[0].name:target'] in PhaseConfig") + r".*\(YAML needs a space after the colon: name: target\)"):
        load_run_config(overrides=["phases=[{name:target}]"])


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not one of"):
        load_run_config(overrides=["student.conversion.mixer=transformer"])
    with pytest.raises(ConfigError, match="integer"):
        load_run_config(overrides=["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="only one phase may take the rest"):
        load_run_config(overrides=["phases=[{name: a}, {name: b}]"])
    with pytest.raises(ConfigError, match="recipe no/such/recipe.yaml does not exist"):
        load_run_config("no/such/recipe.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {max_steps: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML at line 2"):
        load_run_config(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {max_steps: 3}\ndata: {seq_len: 64}\ntrain: {lr: 0.1}\n")  # PyYAML alone keeps the last
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML at line 3, column 1: key 'train' appears twice"):
        load_run_config(twice)
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        load_run_config(overrides=["train.lr=[1,"])
    for bad, message in (("output.log_every=0", "log_every must be >= 1"), ("eval.max_sequences=0", "max_sequences"),
                         ("eval.every=-3", "eval.every must be >= 0"), ("train.grad_clip=-1", "grad_clip must be >= 0"),
                         ("train.preemption_signals=[SIGKILL]", "SIGKILL cannot be caught"),
                         ("student.conversion.linformer.sharing=layer", None)):
        if message is None:  # the default job's phases hold a teacher-forced one
            with pytest.raises(ConfigError, match=r"sharing=layer .* teacher-forced phases \(\['align'\]\) cannot train under ZeRO-3"):
                load_run_config(overrides=["student.conversion.mixer=linformer", bad])
            continue
        with pytest.raises(ConfigError, match=message):
            load_run_config(overrides=[bad])


def test_a_number_that_is_not_finite_is_refused_where_it_is_no_value_of_the_setting():
    """nan passes every ``< 0`` check and inf every ``> 0`` one: refused when read, naming the key."""
    for bad in ("train.lr=nan", "train.grad_clip=.nan", "train.copied_lr_scale=inf", "phases=[{name: a, lr: nan}]", "loss.a_layer=-inf"):
        with pytest.raises(ConfigError, match="expected a finite number"):
            load_run_config(overrides=[bad])
    # An open upper limit (its default) and a wait with no limit take inf as one of their values.
    cfg = load_run_config(overrides=["student.conversion.mamba2.time_step_limit=[0.001, inf]", "data.wait_timeout_s=.inf", "output.lock_wait_s=inf"])
    assert cfg.student.conversion.mamba2.time_step_limit == (0.001, float("inf"))
    assert cfg.data.wait_timeout_s == cfg.output.lock_wait_s == float("inf")
    with pytest.raises(ConfigError, match="time_step_limit.*finite"):
        load_run_config(overrides=["student.conversion.mamba2.time_step_limit=[nan, inf]"])


def test_a_whole_number_where_a_string_is_expected_is_that_string(tmp_path):
    assert load_run_config(overrides=["output.run_dir=2024"]).output.run_dir == "2024"
    # As written, where YAML 1.1 reads another number (octal, underscores, base 60): a run must
    # not land in (or resume) runs/8 for runs/010.
    cfg = load_run_config(overrides=["output.run_dir=010", "output.wandb_project=2024_12_06", "eval.other_corpora=[0755, '12:30']"])
    assert (cfg.output.run_dir, cfg.output.wandb_project, cfg.eval.other_corpora) == ("010", "2024_12_06", ["0755", "12:30"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output:\n  run_dir: 0x1F\ntrain:\n  max_steps: 1_000\n")
    cfg = load_run_config(recipe)
    assert cfg.output.run_dir == "0x1F" and cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    with pytest.raises(ConfigError, match="expected a string, got 3.5"):
        load_run_config(overrides=["output.run_dir=3.5"])  # not guessed: 3.50 and 3.5 read alike
    with pytest.raises(ConfigError, match="expected a string, got True"):
        load_run_config(overrides=["output.run_dir=true"])


def test_a_setting_the_run_would_ignore_is_refused_or_named(caplog):
    """Accepted and then dropped unsaid, each was: a copied-weight LR in a phase that trains the
    mixers alone, a ZeRO-3 schedule in pipeline mode (refused); a Mamba2 geometry that teacher
    matching replaces (named: a run saved with one must still resume); and AdamW settings torch
    refuses only after the model is built."""
    import logging

    from cald_scale.conversion.modeling import ConversionConfig
    from tiny_models import tiny_teacher

    with pytest.raises(ConfigError, match=r"phase 'align' sets copied_lr_scale, but it trains the mixers alone"):
        load_run_config(overrides=["phases.0.copied_lr_scale=0.5"])
    with pytest.raises(ConfigError, match=r"train.copied_lr_scale=0.3 sets the copied weights' LR, but student.trainable=mixers"):
        load_run_config(overrides=["train.copied_lr_scale=0.3"])
    assert load_run_config(overrides=["train.copied_lr_scale=0.3", "student.trainable=all"]).train.copied_lr_scale == 0.3
    with pytest.raises(ConfigError, match=r"student.share_frozen_weights=false unshares the frozen copied weights, but student.trainable=all"):
        load_run_config(overrides=["student.share_frozen_weights=false", "student.trainable=all"])
    assert not load_run_config(overrides=["student.share_frozen_weights=false"]).student.share_frozen_weights  # mixers: it applies
    with pytest.raises(ConfigError, match="train.schedule=naive is a ZeRO-3 mode schedule"):
        load_run_config(overrides=["train.pipeline_stages=2", "train.schedule=naive"])
    with pytest.raises(ConfigError, match=r"train.betas must each be in \[0, 1\)"):
        load_run_config(overrides=["train.betas=[0.9, 1.5]"])
    with pytest.raises(ConfigError, match="train.weight_decay must be >= 0"):
        load_run_config(overrides=["train.weight_decay=-0.1"])
    teacher = tiny_teacher("llama", layers=2)  # 4 heads of 16
    asked = ConversionConfig()
    asked.mamba2 = dataclasses.replace(asked.mamba2, d_state=128, n_groups=1)
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion"):
        assert asked.resolved(teacher.config).mamba2.d_state == 16
    assert "student.conversion.mamba2 sets {'d_state': 128}, which student.conversion.match_teacher_geometry" in caplog.text
    assert ConversionConfig().resolved(teacher.config).mamba2.d_state == 16  # the defaults are matched
    resolved = ConversionConfig().resolved(teacher.config)
    assert resolved.resolved(teacher.config).mamba2 == resolved.mamba2  # and a matched one stays
    linformer = ConversionConfig(mixer="linformer")
    linformer.linformer = dataclasses.replace(linformer.linformer, head_dim=32, k=8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cald_scale.conversion"):
        matched = linformer.resolved(teacher.config).linformer
    assert (matched.num_heads, matched.head_dim, matched.k) == (4, 16, 8)  # k is the user's to choose
    assert "student.conversion.linformer sets {'head_dim': 32}, which student.conversion.match_teacher_geometry" in caplog.text


def test_exponent_without_a_dot_is_a_number():
    assert load_run_config(overrides=["train.lr=3e-4"]).train.lr == 3e-4
    with pytest.raises(ConfigError, match="train.lr"):
        load_run_config(overrides=["train.lr=fast"])


def test_overrides_and_round_trip():
    cfg = load_run_config(overrides=["train.max_steps=7", "student.conversion.mamba2.chunk_size=32", "loss.a_kl=0.5"])
    assert cfg.train.max_steps == 7 and cfg.student.conversion.mamba2.chunk_size == 32 and cfg.loss.a_kl == 0.5
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_fit_shipped_ds_configs(recipe, ds_path):
    cfg = load_run_config(recipe)
    resolved = resolve_ds_config(load_ds_config(ds_path), cfg.train, data_parallel_size=2)
    assert resolved["train_batch_size"] == cfg.train.micro_batch(2) * cfg.train.grad_accum * 2
    assert "scheduler" not in resolved  # the phases own the LR schedule
    assert cfg.plan(world_size=2).total_steps >= 1
    assert resolved["optimizer"]["params"]["lr"] == cfg.train.lr
    teacher = teacher_ds_config(resolved)
    assert "optimizer" not in teacher and teacher["zero_optimization"]["stage"] == 3
    sized = size_zero_buffers(resolved, block_numel=5_000_000, stage_size=2, prefetch=True)
    zero = sized["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 10_000_000 and zero["stage3_max_reuse_distance"] == 5_000_000
    assert zero["stage3_max_live_parameters"] == 20_000_000 and zero["overlap_comm"] is False  # no CUDA here
    assert zero["reduce_scatter"] is True  # two ranks scatter their gradient partitions
    alone = resolve_ds_config(load_ds_config(ds_path), cfg.train, data_parallel_size=1)["zero_optimization"]
    assert alone["reduce_scatter"] is False  # one rank reduces its buckets in place
    on_cpu = size_zero_buffers(resolved, block_numel=5_000_000)["zero_optimization"]  # no accelerator: no prefetch
    assert on_cpu["stage3_prefetch_bucket_size"] == 0 and on_cpu["stage3_max_live_parameters"] == 5_000_000


def test_explicit_zero_buffer_sizes_are_kept():
    cfg = load_run_config()
    ds = load_ds_config(REPO / "ds_configs" / "zero3.json")
    ds["zero_optimization"]["reduce_bucket_size"] = 123
    sized = size_zero_buffers(resolve_ds_config(ds, cfg.train, data_parallel_size=1), block_numel=10_000_000)
    assert sized["zero_optimization"]["reduce_bucket_size"] == 123
    ds["zero_optimization"]["reduce_scatter"] = True
    assert resolve_ds_config(ds, cfg.train, data_parallel_size=1)["zero_optimization"]["reduce_scatter"] is True
    ds["zero_optimization"]["stage3_bogus"] = "auto"
    with pytest.raises(ConfigError, match="stage3_bogus"):
        size_zero_buffers(resolve_ds_config(ds, cfg.train, data_parallel_size=1), block_numel=1)


def test_ds_config_contradiction_and_stage(tmp_path):
    cfg = load_run_config()
    ds = load_ds_config(REPO / "ds_configs" / "zero3.json")
    ds["gradient_accumulation_steps"] = 8
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 contradicts the run config's train.grad_accum \(1\)"):
        resolve_ds_config(ds, cfg.train, data_parallel_size=1)
    bad = tmp_path / "z2.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage must be 3"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": "3"}}))
    with pytest.raises(ConfigError, match=r'stage must be 3 \(got "3"\)'):  # a string, shown as one
        load_ds_config(bad)
    with pytest.raises(FileNotFoundError):
        load_ds_config(tmp_path / "missing.json")
    # ZeRO++ options that cannot hold two models, or that store the copied weights quantized (helper-102).
    for setting, message in (
        ({"zero_hpz_partition_size": 8}, "zero_hpz_partition_size=8 .* cannot build two models"),
        ({"zero_quantized_nontrainable_weights": True}, "zero_quantized_nontrainable_weights stores frozen weights quantized"),
    ):
        bad.write_text(json.dumps({"zero_optimization": {"stage": 3, **setting}}))
        with pytest.raises(ConfigError, match=message):
            load_ds_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1}}))
    assert load_ds_config(bad)["zero_optimization"]["zero_hpz_partition_size"] == 1


def test_ds_config_optimizer_numbers_that_are_not_numbers_are_named(tmp_path):
    """helper-77: "eps": "1e-8" failed in AdamW's constructor, in a traceback after both models
    were built; now the file is refused when it is read."""
    shipped = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    path = tmp_path / "types.json"
    for params, message in (
        ({"eps": "1e-8"}, 'optimizer.params.eps must be a number, got "1e-8"'),
        ({"weight_decay": True}, "optimizer.params.weight_decay must be a number, got true"),
        ({"betas": [0.9]}, "optimizer.params.betas must be two numbers, got [0.9]"),
    ):
        config = json.loads(json.dumps(shipped))
        config["optimizer"]["params"].update(params)
        path.write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_ds_config(path)
    config = json.loads(json.dumps(shipped))
    config["zero_optimization"]["offload_param"] = {"device": "nvme"}  # DeepSpeed asserted it when building the engine
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape("zero_optimization.offload_param offloads to nvme but names no nvme_path")):
        load_ds_config(path)
    config = json.loads(json.dumps(shipped))
    config["optimizer"]["params"].update({"eps": 1e-8, "betas": [0.9, 0.95]})
    path.write_text(json.dumps(config))
    assert load_ds_config(path)["optimizer"]["params"]["eps"] == 1e-8


def test_ds_config_settings_the_schedule_would_not_honour_are_refused():
    """Each of these ran on, differently from what it says: no optimizer (a traceback at the first
    step, minutes in), another optimizer given AdamW's settings, torch_autocast (DeepSpeed applies
    it in engine.forward only: fp32 compute, bf16 gradient reduction), and the older "bfloat16"
    name, which the "bf16": false default hid (fp32 training, twice the memory)."""
    cfg = load_run_config()
    shipped = load_ds_config(REPO / "ds_configs" / "zero3.json")

    def resolved(**changes) -> dict:
        ds = {**json.loads(json.dumps(shipped)), **changes}
        return resolve_ds_config({k: v for k, v in ds.items() if v is not None}, cfg.train, data_parallel_size=1)

    with pytest.raises(ConfigError, match='no "optimizer" section'):
        resolved(optimizer=None)
    with pytest.raises(ConfigError, match="optimizer type 'SGD'"):
        resolved(optimizer={"type": "SGD", "params": {"lr": "auto"}})
    with pytest.raises(ConfigError, match="torch_autocast"):
        resolved(torch_autocast={"enabled": True, "dtype": "bfloat16"})
    alias = json.loads(json.dumps(shipped))
    alias.pop("bf16", None)
    alias["bfloat16"] = {"enabled": "auto"}
    out = resolve_ds_config(alias, cfg.train, data_parallel_size=1)
    assert "bfloat16" not in out and out["bf16"] == {"enabled": False}  # auto on a CPU: read as bf16's
    with pytest.raises(ConfigError, match='both "bf16" and "bfloat16"'):
        resolved(bfloat16={"enabled": True})


def test_the_engines_precision_decides_and_teacher_dtype_follows_it(monkeypatch):
    """The ds_config's bf16/fp16 sections set the precision both models compute in. teacher.dtype
    "auto" (the default) is recorded as it resolved; another value, which did nothing, is refused.
    fp16 asked for turns bf16 "auto" off (both on crashed in DeepSpeed's own assertion)."""
    from cald_scale.engines import ds_config as ds_module
    from cald_scale.engines.ds_config import compute_dtype
    from cald_scale.train import with_compute_dtype

    cfg = load_run_config()
    assert cfg.teacher.dtype == "auto"
    shipped = load_ds_config(REPO / "ds_configs" / "zero3.json")

    def resolved(**sections) -> dict:
        return resolve_ds_config({**json.loads(json.dumps(shipped)), **sections}, cfg.train, data_parallel_size=1)

    on_cpu = resolved()
    assert compute_dtype(on_cpu) == torch.float32
    assert with_compute_dtype(cfg, on_cpu).teacher.dtype == "float32"
    with pytest.raises(ConfigError, match=r"teacher.dtype=bfloat16, but the engines compute in float32 \(its bf16 and fp16 sections are off"):
        with_compute_dtype(load_run_config(overrides=["teacher.dtype=bfloat16"]), on_cpu)
    monkeypatch.setattr(ds_module, "bf16_available", lambda: True)  # a bf16-capable GPU
    on_gpu = resolved()
    assert compute_dtype(on_gpu) == torch.bfloat16 and with_compute_dtype(cfg, on_gpu).teacher.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="teacher.dtype=float32, but the engines compute in bfloat16 \\(its bf16 section is on"):
        with_compute_dtype(load_run_config(overrides=["teacher.dtype=float32"]), on_gpu)
    fp16 = resolved(fp16={"enabled": True})
    assert (fp16["bf16"]["enabled"], compute_dtype(fp16)) == (False, torch.float16)
    with pytest.raises(ConfigError, match="enables both bf16 and fp16"):
        resolved(bf16={"enabled": True}, fp16={"enabled": True})


def test_ds_config_typos_are_refused_when_read(tmp_path):
    """A misspelled key is named when the file is read (before any model is built): at the top
    level, where DeepSpeed would silently ignore it, and inside zero_optimization."""
    shipped = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cases = {
        "gradient_clippin": ("gradient_clipping", "did you mean gradient_clipping?"),
        "zero_optimization.stage3_param_persistance_threshold": ("stage3_param_persistence_threshold", "did you mean stage3_param_persistence_threshold"),
        "zero_optimization.no_such_option": (None, "zero_optimization.no_such_option is not a DeepSpeed setting"),
        # passed to the optimizer's constructor, where it failed after the models were built
        "optimizer.params.weight_decy": (None, "optimizer.params.weight_decy (did you mean weight_decay?)"),
    }
    for key, (_, message) in cases.items():
        config = json.loads(json.dumps(shipped))
        node, leaf = config, key.split(".")[-1]
        for part in key.split(".")[:-1]:
            node = node[part]
        node[leaf] = 1
        path = tmp_path / "typo.json"
        path.write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_ds_config(path)
    # the run config's own settings, or a precision's name, would do nothing there (DeepSpeed ignores them)
    for key, message in (("grad_clip", "grad_clip is not a DeepSpeed setting (it is the run config's train.grad_clip)"),
                         ("lr", "lr is not a DeepSpeed setting (it is the run config's train.lr)"),
                         ("precision", 'precision is not a DeepSpeed setting (the precision is the "bf16" or "fp16" section\'s "enabled")')):
        path.write_text(json.dumps({**shipped, key: 1}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_ds_config(path)
    # DeepSpeed's own wandb and comet monitors would log online whatever output.wandb says (helper-91)
    for name in ("wandb", "comet"):
        path.write_text(json.dumps({**shipped, name: {"enabled": True, "project": "p"}}))
        with pytest.raises(ConfigError, match=re.escape(f"{name}.enabled starts DeepSpeed's own {name} monitor, which logs online")):
            load_ds_config(path)
        path.write_text(json.dumps({**shipped, name: {"enabled": False}}))
        assert load_ds_config(path)[name] == {"enabled": False}
    # an unknown top-level key that resembles no DeepSpeed key is left to DeepSpeed (it may be new)
    path.write_text(json.dumps({**shipped, "my_notes": "x"}))
    assert load_ds_config(path)["my_notes"] == "x"
    # a file of another shape is named, not a traceback
    for content, message in (
        ([1], "must be a JSON object of settings, got list"),
        ({**shipped, "zero_optimization": None}, "zero_optimization must be an object of settings, got null"),
        ({**shipped, "torch_autocast": True}, "torch_autocast must be an object of settings, got true"),
        ({**shipped, "bfloat16": True}, "bfloat16 must be an object of settings, got true"),
    ):
        path.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed config {path}") + ".*" + re.escape(message)):
            load_ds_config(path)


def test_global_batch_splits_over_ranks():
    cfg = load_run_config()
    assert [cfg.train.micro_batch(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="does not split"):
        cfg.train.micro_batch(3)
    explicit = load_run_config(overrides=["train.global_batch_size=null", "train.micro_batch_size=3"]).train
    assert explicit.micro_batch(5) == 3
    both = load_run_config(overrides=["train.micro_batch_size=3"]).train
    with pytest.raises(ValueError, match="set one of them to null"):
        both.micro_batch(1)


def _launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", Path(__file__).parents[2] / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return launch


def test_a_recipe_folder_and_a_yaml_boolean_for_a_word_are_named():
    # A folder was "does not exist"; YAML's off (a boolean) was reported as False, unexplained.
    with pytest.raises(ConfigError, match=r"recipe .*recipes is a folder: name a YAML file in it \(.*smollm2_mamba2\.yaml"):
        load_run_config(REPO / "recipes")
    with pytest.raises(ConfigError, match=r"output\.wandb: False is not one of .* \(YAML reads an unquoted off/on/yes/no/true/false as a boolean: quote"):
        load_run_config(overrides=["output.wandb=off"])
    assert load_run_config(overrides=["output.wandb='disabled'"]).output.wandb == "disabled"


def test_launcher_reports_a_config_error_in_one_line(capsys):
    """A bad phase list ends with one line that names the problem, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        _launch_module().main(["train.max_steps=3", "phases=[{name: a, steps: 2}, {name: b, steps: 2}]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error:") and "phases add up to 4 steps but train.max_steps=3" in err
    assert "\n" not in err and "Traceback" not in err


def test_cald_traceback_shows_where_a_config_error_was_raised(capsys, monkeypatch):
    """CALD_TRACEBACK=1 (README "Configuration") turns the one line into the exception and its
    traceback, for a bad setting too (it was read only for errors raised once the job ran)."""
    monkeypatch.setenv("CALD_TRACEBACK", "1")
    from cald_scale.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr must be > 0") as raised:
        _launch_module().main(["train.lr=-1"])
    assert raised.traceback[-1].name == "from_dict"  # where it was raised, not where it was caught
    monkeypatch.delenv("CALD_TRACEBACK")
    with pytest.raises(SystemExit):
        _launch_module().main(["train.lr=-1"])
    assert capsys.readouterr().err.strip() == "config error: train: train.lr must be > 0, got -1.0"


def test_a_run_shorter_than_the_warmup_clamps_it(capsys):
    """`train.max_steps=2` alone used to fail on the default warmup of 5: each phase clamps it."""
    _launch_module().main(["train.max_steps=2", "--print_config"])
    cfg = load_run_config(overrides=["train.max_steps=2"])
    assert [(p.steps, p.warmup_steps) for p in cfg.plan(world_size=1).phases] == [(1, 0), (1, 0)]
    assert "phases:" in capsys.readouterr().out


def test_print_config_checks_the_ds_config_the_run_will_read(tmp_path, capsys):
    """The SLURM scripts call --print_config before they launch: a ds_config the run would refuse
    (missing, the other mode's, a contradiction) stops the job there, in one line."""
    bad = tmp_path / "clip.json"
    bad.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero3.json").read_text()), "gradient_clipping": 5.0}))
    cases = (
        (["--ds_config", str(tmp_path / "zero3.jsn")], f"error: DeepSpeed config {tmp_path / 'zero3.jsn'} does not exist"),
        (["--ds_config", str(REPO / "ds_configs" / "zero3.json"), "train.pipeline_stages=2"], "config error: pipeline mode (train.pipeline_stages=2) needs a ds_config with a pipeline section"),
        (["--ds_config", str(bad)], "config error: ds_config gradient_clipping=5.0 contradicts the run config's train.grad_clip (1.0)"),
        # bf16 "auto": bfloat16 on a bf16 GPU, float32 elsewhere; float16 on neither (the login node does not know which)
        (["teacher.dtype=float16"], "config error: teacher.dtype=float16, but the engines compute in bfloat16 or float32"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            _launch_module().main([*argv, f"output.run_dir={tmp_path / 'run'}", "--print_config"])
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_another_student_is_refused_naming_the_key(tmp_path, caplog):
    """Resuming checks the saved teacher, student and data against the new config: a field added
    since the run was written counts as its default; a changed field is named in one line; other
    changes are allowed and recorded. A folder with no checkpoint is taken over."""
    import logging

    import torch

    from cald_scale.config import config_differences
    from cald_scale.engines.distributed import DistEnv
    from cald_scale.train import _check_run_dir, _record

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = load_run_config(None, ["train.max_steps=4"])
    saved = cfg.to_dict()
    del saved["student"]["init_from"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    longer = load_run_config(None, ["train.max_steps=8", "data.cache_dir=/elsewhere"])
    changed = _check_run_dir(tmp_path, longer, resuming_at=2)  # the run may be extended, its cache moved
    assert not (tmp_path / "config_changes.jsonl").exists()  # nothing written before the checkpoint has loaded
    # ...but not the steps already run: at 4 of 4 steps, step 4 ran end to end; 8 steps put it in the 70% alignment
    with pytest.raises(ValueError, match=r"step 4 of .* already ran in phase 'end_to_end' .* put it in 'align' .* give the phases that ran their steps"):
        _check_run_dir(tmp_path, longer, resuming_at=4)
    with pytest.raises(ValueError, match=r"checkpoint is at step 4, past this run's 2 steps"):
        _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=2"]), resuming_at=4)
    with caplog.at_level(logging.WARNING, logger="cald_scale.train"):
        _record(tmp_path, longer, env, resumed_at=2, changed=changed)
        assert "the run is finished" not in caplog.text
        _record(tmp_path, longer, env, resumed_at=8, changed=["train.lr: saved 0.005, wanted 0.01"], finished=True)  # a finished run rerun
    assert "the run is finished (its checkpoint is at its last step, 8): no training step runs with the changed settings" in caplog.text
    changes = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["from_step"] == 2 and changes[0]["changes"] == [
        f"data.cache_dir: saved '{cfg.data.cache_dir}', wanted '/elsewhere'", "train.max_steps: saved 4, wanted 8",
    ]

    other = load_run_config(None, ["train.max_steps=8", "student.conversion.mixer=mamba"])
    with pytest.raises(ValueError, match=r"another teacher, student or data \(student.conversion.mixer: saved 'mamba2', wanted 'mamba'"):
        _check_run_dir(tmp_path, other, resuming_at=4)
    for fixed in ("data.seq_len=32", "train.seed=5"):
        with pytest.raises(ValueError, match=fixed.split("=")[0]):
            _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=8", fixed]), resuming_at=4)
    assert _check_run_dir(tmp_path, other, resuming_at=None) == []  # no checkpoint: a start that failed; taken over
    # A data section the task never reads is free on resume: an LM run started with a
    # classification.* setting (accepted before stop 60, refused now) resumes without it (helper-103).
    (tmp_path / "config.json").write_text(json.dumps({**saved, "classification": {**saved["classification"], "max_length": 64}}))
    assert _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=4"]), resuming_at=2) == [
        f"classification.max_length: saved 64, wanted {load_run_config().classification.max_length}"
    ]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _record(tmp_path, other, env, resumed_at=None, changed=[])
    assert json.loads((tmp_path / "config.json").read_text())["student"]["conversion"]["mixer"] == "mamba"
    assert config_differences(saved, other, sections=("loss", "data")) == []
    assert config_differences(saved, load_run_config(None, ["train.max_steps=4", "train.lr=2e-3"]), ignore=("train.lr",)) == []
    assert config_differences({"student": {"no_such_key": 1}}, cfg)[0].startswith("the saved config no longer loads")
    # A saved config that no longer loads (a key since removed) still has its teacher, student
    # and data compared: the keys both configs name.
    (tmp_path / "config.json").write_text(json.dumps({**saved, "train": {**saved["train"], "an_old_key": 1}}))
    with pytest.raises(ValueError, match=r"another teacher, student or data \(student.conversion.mixer: saved 'mamba2', wanted 'mamba'"):
        _check_run_dir(tmp_path, other, resuming_at=4)
    same = _check_run_dir(tmp_path, cfg, resuming_at=4)
    assert same[0].startswith("the saved config no longer loads (unknown config key(s) ['train.an_old_key']") and len(same) == 1
    (tmp_path / "config.json").write_text("")  # emptied by a crash
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'} is not valid JSON")):
        _check_run_dir(tmp_path, cfg, resuming_at=4)


def test_steps_a_checkpoint_ran_stay_in_their_phases_under_this_version(tmp_path):
    """The checkpoint records the phases its steps ran in; a version that resolves the same config
    to other boundaries (four quarters of 10 steps rounded one by one were 2, 2, 2, 4) is refused."""
    from cald_scale.train import PHASES_RUN, _check_phases_run

    cfg = load_run_config(None, ["train.max_steps=10", "phases=[{name: a, fraction: 0.25}, {name: b, fraction: 0.25}, {name: c, fraction: 0.25}, {name: d, fraction: 0.25}]"])
    plan = cfg.plan(1)
    assert [(p.start, p.end) for p in plan.phases] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    older = {PHASES_RUN: [["a", 0, 2], ["b", 2, 4], ["c", 4, 6]]}
    with pytest.raises(ValueError, match=r"step 5 of .* ran in phase 'c' \(steps 5-6\), and this version puts it in 'b' \(steps 3-5\)"):
        _check_phases_run(tmp_path, older, plan, 6)
    _check_phases_run(tmp_path, older, plan, 4)  # at step 4, the steps run agree
    _check_phases_run(tmp_path, {PHASES_RUN: [["a", 0, 2], ["b", 2, 5], ["c", 5, 6]]}, plan, 6)
    _check_phases_run(tmp_path, {}, plan, 6)  # a checkpoint from before the record


def test_a_recipe_given_twice_is_a_usage_error(capsys):
    from cald_scale.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["prepare-data", "--recipe", "a.yaml", "--recipe", "b.yaml"])
    assert stop.value.code == 2
    assert "--recipe given twice (a.yaml, b.yaml); give one" in capsys.readouterr().err


def test_a_resume_may_not_change_whether_the_student_shares_a_fixed_teacher(tmp_path):
    """A mixers-only student shares a fixed teacher's frozen tensors and its checkpoints leave
    them out; a trajectory phase added on resume would need them (they would not load)."""
    from cald_scale.train import _check_run_dir

    target = load_run_config(None, ["train.max_steps=8", "phases=[{name: t, guidance: target}]"])
    (tmp_path / "config.json").write_text(json.dumps(target.to_dict()))
    later = "phases=[{name: t, steps: 4, guidance: target}, {name: traj, guidance: trajectory}]"
    with pytest.raises(ValueError, match=r"trained with a fixed teacher and this run.s phases have a trajectory or waypoint phase"):
        _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=8", later]), resuming_at=4)
    # every weight trains: nothing is shared, so the same change is allowed (and recorded)
    every = ["student.trainable=all", "train.max_steps=8"]
    (tmp_path / "config.json").write_text(json.dumps(load_run_config(None, [*every, "phases=[{name: t, guidance: target}]"]).to_dict()))
    assert _check_run_dir(tmp_path, load_run_config(None, [*every, later]), resuming_at=4)
    for recipe in sorted((Path(__file__).parents[2] / "recipes" / "guidance").glob("*.yaml")):  # never the default job's folder
        assert load_run_config(recipe).output.run_dir == f"runs/{recipe.stem}"


def test_local_inputs_are_recorded_as_absolute_paths_so_commands_elsewhere_find_them(tmp_path, monkeypatch):
    """A run started in a project folder with `teacher.name_or_path=teacher data.corpus=c.jsonl`
    recorded those words; `cald-scale generate/evaluate` started elsewhere then looked for a hub
    model called 'teacher'. Local paths (each item of a corpus list, globs, a megatron prefix)
    are made absolute; built-in names, hub ids, paths that are not here and the other-domain eval
    sets (their names key their scores) stay as written; a
    run saved with the relative spelling resumes under the absolute one and the other way round."""
    from cald_scale.config import config_differences

    (tmp_path / "teacher").mkdir()
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "prefix.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    relative = ["teacher.name_or_path=teacher", "data.corpus=c.jsonl,./prefix", "data.eval_corpus=docs/*.txt",
                "eval.other_corpora=[wiki, ~/nowhere-else.jsonl, HuggingFaceFW/fineweb]", "student.init_from=./teacher"]
    cfg = load_run_config(None, relative)
    assert cfg.teacher.name_or_path == cfg.student.init_from == str(tmp_path / "teacher")
    assert cfg.data.corpus == f"{tmp_path / 'c.jsonl'},{tmp_path / 'prefix'}" and cfg.data.eval_corpus == str(tmp_path / "docs" / "*.txt")
    # The other-domain sets keep their spelling: it names their scores (metrics, baseline, report).
    assert cfg.eval.other_corpora == ["wiki", "~/nowhere-else.jsonl", "HuggingFaceFW/fineweb"]
    assert load_run_config(None, ["eval.other_corpora=[c.jsonl]"]).eval.other_corpora == ["c.jsonl"]
    default = load_run_config(None, ["teacher.name_or_path=HuggingFaceTB/SmolLM2-360M"])
    assert (default.teacher.name_or_path, default.data.corpus) == ("HuggingFaceTB/SmolLM2-360M", "brown")
    saved = {**cfg.to_dict(), "teacher": {**cfg.to_dict()["teacher"], "name_or_path": "teacher"}}
    assert config_differences(saved, load_run_config(None, [f"teacher.name_or_path={tmp_path}/../{tmp_path.name}/teacher", *relative[1:]])) == []
    # A project moved (or copied) elsewhere resumes: the paths are recorded as changes, and what
    # the models and data hold is compared by content (teacher.json, data.json), not by path.
    from cald_scale.train import _check_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    moved = cfg.to_dict()
    moved["teacher"]["name_or_path"], moved["student"]["init_from"] = "/old/place/teacher", "/old/place/teacher"
    moved["data"]["corpus"], moved["data"]["eval_corpus"] = "/old/place/c.jsonl", "/old/place/docs/*.txt"
    (run_dir / "config.json").write_text(json.dumps(moved))
    changes = _check_run_dir(run_dir, cfg, resuming_at=4)
    assert f"teacher.name_or_path: saved '/old/place/teacher', wanted '{tmp_path / 'teacher'}'" in changes and len(changes) == 4
    # So does a classification run's (its data.json holds the content's cache key).
    (tmp_path / "labelled").mkdir()
    classify = ["task.kind=classification", f"classification.dataset={tmp_path / 'labelled'}", "classification.text_column=t",
                "classification.label_column=l", f"classification.cache_dir={tmp_path / 'cache'}", "student.conversion.mixer=linformer"]
    moved = load_run_config(None, classify).to_dict()
    moved["classification"]["dataset"], moved["classification"]["cache_dir"] = "/old/place/labelled", "/old/place/cache"
    (run_dir / "config.json").write_text(json.dumps(moved))
    assert len(_check_run_dir(run_dir, load_run_config(None, classify), resuming_at=4)) == 2


def test_what_a_resume_may_change_and_what_it_says(tmp_path, caplog):
    """(helper-73) A resume may switch activation checkpointing or the attention kernel (how the
    same weights compute: the way out of an out-of-memory); not eval.max_sequences (the saved
    baseline was scored on the old count, and the report divides one by the other); a changed
    student.init_from is named as such; training longer inside a decayed phase says the LR jumps."""
    import logging

    from cald_scale.train import _check_run_dir

    phases = "phases=[{name: align, steps: 35, mode: teacher_forced, trainable: mixers, lr: 5.0e-3}, {name: end_to_end}]"
    cfg = load_run_config(None, ["train.max_steps=50", phases])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert len(_check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=50", phases, "student.activation_checkpointing=true",
                                                              "teacher.attn_implementation=eager"]), resuming_at=50)) == 2
    # The engines' precision as it resolved (a run moved to a bf16 GPU; earlier runs recorded float32 whatever it was).
    assert _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=50", phases, "teacher.dtype=bfloat16"]), resuming_at=50) == ["teacher.dtype: saved 'auto', wanted 'bfloat16'"]
    with pytest.raises(ValueError, match="eval.max_sequences: saved 32, wanted 64"):
        _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=50", phases, "eval.max_sequences=64"]), resuming_at=50)
    with pytest.raises(ValueError, match=r"was trained from student.init_from=None and this run converts from '/elsewhere/base'"):
        _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=50", phases, "student.init_from=/elsewhere/base"]), resuming_at=50)
    with caplog.at_level(logging.WARNING, logger="cald_scale"):
        _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=100", phases]), resuming_at=50)
    assert "resuming at step 50: the LR jumps from" in caplog.text and "give the added steps a phase of their own" in caplog.text
    # A resume with a changed setting inside a phase's warmup (LR 1.7e-4 at step 36, 3.3e-4 at step
    # 37): the LR goes on as planned, which is no jump (helper-84: it was said to be one).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cald_scale"):
        assert _check_run_dir(tmp_path, load_run_config(None, ["train.max_steps=50", phases, "student.activation_checkpointing=true"]), resuming_at=36)
    assert "LR jumps" not in caplog.text


def test_a_resume_applies_its_own_weight_decay_and_betas_over_the_checkpoints():
    """A checkpoint's optimizer groups carry the weight decay and betas they were saved with, and
    loading it overwrote the new run's: a changed train.weight_decay or train.betas was recorded
    as applied and never ran (helper-73). The no-decay groups stay at 0."""
    from types import SimpleNamespace

    import torch

    from cald_scale.distill.phases import set_decay_and_betas

    weights, biases = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))

    def adamw(decay, betas):
        return torch.optim.AdamW([{"params": [weights], "weight_decay": decay, "name": "mixers"},
                                  {"params": [biases], "weight_decay": 0.0, "name": "mixers_no_decay"}], betas=betas)

    saved = adamw(0.0, (0.9, 0.95)).state_dict()
    resumed = adamw(0.1, (0.9, 0.999))
    resumed.load_state_dict(saved)
    assert [(g["weight_decay"], g["betas"]) for g in resumed.param_groups] == [(0.0, (0.9, 0.95))] * 2  # the checkpoint's
    set_decay_and_betas(SimpleNamespace(optimizer=resumed), 0.1, [0.9, 0.999])
    assert [(g["weight_decay"], g["betas"]) for g in resumed.param_groups] == [(0.1, (0.9, 0.999)), (0.0, (0.9, 0.999))]


def test_a_pipeline_resume_may_add_waypoints_its_checkpoints_hold_the_same(tmp_path):
    """In pipeline mode a mixers-only student's checkpoints leave the frozen copies out whether or
    not a stage shares them with the teacher (they are rebuilt from the teacher's files), so
    waypoints added on resume change nothing they hold: allowed there, refused under ZeRO-3
    (where the frozen copies stop being the teacher's and would be missing)."""
    from cald_scale.engines.models import checkpoint_excludes_frozen
    from cald_scale.train import _check_run_dir

    later = f"phases=[{{name: t, steps: 4, guidance: target}}, {{name: w, guidance: waypoint, waypoints: [{tmp_path / 'w1'}]}}]"
    for stages, allowed in (("2", True), ("0", False)):
        run_dir = tmp_path / f"stages{stages}"
        run_dir.mkdir()
        target = load_run_config(None, ["train.max_steps=8", f"train.pipeline_stages={stages}", "phases=[{name: t, guidance: target}]"])
        (run_dir / "config.json").write_text(json.dumps(target.to_dict()))
        resumed = load_run_config(None, ["train.max_steps=8", f"train.pipeline_stages={stages}", later])
        assert checkpoint_excludes_frozen(resumed, resumed.plan(1)) is allowed
        if allowed:
            assert any(change.startswith("phases") for change in _check_run_dir(run_dir, resumed, resuming_at=4))
        else:
            with pytest.raises(ValueError, match=r"trained with a fixed teacher and this run.s phases have a trajectory or waypoint phase"):
                _check_run_dir(run_dir, resumed, resuming_at=4)


def test_explain_without_print_config_is_refused_before_any_job_starts(tmp_path):
    """--explain alone once started the embedded default job (8 minutes here), unasked."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", "--explain", f"output.run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "add --print_config (nothing was run)" in proc.stderr and proc.stdout == ""
    assert not run_dir.exists()


def test_a_rendezvous_port_in_use_is_named_in_one_line(tmp_path):
    """A second job on a machine whose launcher port is taken: torch's DistNetworkError went past
    the entry point's one-line errors as a traceback."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, "launch/train.py", f"output.run_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: rank 0 cannot open the rendezvous port 127.0.0.1:{port}: it is in use" in proc.stderr
    assert "--master_port" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_rendezvous_that_times_out_says_it_waited_for_the_other_ranks(monkeypatch):
    """Rank 0's TCPStore gives up on ranks that never came (torch's DistStoreError, after 30 minutes
    by default): the message names the wait, not a network fault (the 1-line path is the test above)."""
    import torch.distributed as dist

    from cald_scale.engines.distributed import _rendezvous_error

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    err = _rendezvous_error(dist.DistStoreError("Timed out after 1801 seconds waiting for clients. 2/4 clients joined."))
    assert isinstance(err, OSError)
    assert str(err).startswith("rank 0 timed out waiting for all 4 ranks at the rendezvous node1:29500 (a rank that never started")


def test_print_config_prints_the_config_alone_and_explains_each_key():
    """The SLURM scripts parse --print_config's stdout as YAML: DeepSpeed's notice ("Setting
    accelerator to CPU"), printed on its first import by the ds_config check, went there too.
    --explain puts each key's docstring above it as a comment, and still loads as the config."""
    import subprocess
    import sys

    import yaml

    from cald_scale.config_loader import field_docs

    def printed(*flags: str) -> str:
        proc = subprocess.run([sys.executable, "launch/train.py", "--print_config", *flags, "train.max_steps=7"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    expected = load_run_config(overrides=["train.max_steps=7"]).to_dict()
    assert yaml.safe_load(printed()) == expected
    explained = printed("--explain")
    assert yaml.safe_load(explained) == expected
    assert "  # Held-out sequences scored (teacher, student before and after training): the same ones," in explained
    # Every key a user can set says what it is (a field added without a docstring fails here).
    from cald_scale.config import RunConfig

    undocumented = []

    def walk(cls, where):
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[field.name]
            inner = typing.get_args(kind)[0] if typing.get_origin(kind) is list and typing.get_args(kind) else kind
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{where}{field.name}.")
            if field.name not in docs and where:  # RunConfig's own sections are named by their classes
                undocumented.append(where + field.name)

    walk(RunConfig, "")
    assert undocumented == []


def test_settings_that_would_do_nothing_in_this_run_are_refused():
    """Each passed --print_config and was silently unused (helper-81)."""
    cases = {
        ("data.eval_corpus=wiki", "data.eval_fraction=0.2"): "data.eval_fraction=0.2 holds out part of data.corpus, but data.eval_corpus scores another corpus",
        ("task.pooling=cls",): "task.pooling=cls pools a classification head; a causal LM (causal_lm) has none",
        ("task.kind=classification", "data.seq_len=512"): "data.seq_len: a classification run reads its data from the classification section (classification.max_length, ...), never from data",
        ("classification.max_length=64",): "classification.max_length: a causal_lm run reads its data from the data section (data.seq_len, ...), never from classification",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_run_config(overrides=list(overrides))
    load_run_config(overrides=["data.eval_corpus=wiki"])  # the default fraction: nothing said
    # A run saved with one still loads (to resume, to be scored): the refusal is of what is asked now.
    saved = load_run_config().to_dict()
    saved["data"].update(eval_corpus="wiki", eval_fraction=0.2)
    saved["task"]["pooling"] = "cls"
    assert from_dict(RunConfig, saved).data.eval_fraction == 0.2


def test_every_task_kind_a_config_takes_has_a_spec_and_the_spec_settles_the_config():
    """task.kind's values are the registry's kinds (tasks/spec.py), and what a config resolves by
    task comes from the kind's spec: its sequence length, its default layout, its data section."""
    import typing

    from cald_scale.config import TaskConfig
    from cald_scale.tasks import TASKS, task_spec

    kinds = typing.get_args(typing.get_type_hints(TaskConfig)["kind"])
    assert set(kinds) == set(TASKS)
    for kind in kinds:
        spec = task_spec(kind)
        cfg = load_run_config(overrides=[f"task.kind={kind}", "train.global_batch_size=3"])
        assert cfg.tokens_per_step(world_size=1) == 3 * spec.seq_len(cfg)
        assert cfg.student.conversion.attention_every == spec.attention_every
        assert spec.data_section in ("data", "classification") and spec.seq_len(cfg) > 0
    with pytest.raises(ValueError, match="task.kind='speech' is no task: one of causal_lm, classification"):
        task_spec("speech")


def test_a_resume_in_another_precision_says_its_starting_point_was_scored_in_the_first(tmp_path, caplog):
    """baseline.json keeps the starting point's scores for good (the converted student is gone once
    trained); a session in another precision says the report compares across the two (helper-84)."""
    import logging

    from cald_scale.train import _warn_if_scored_otherwise

    with caplog.at_level(logging.WARNING, logger="cald_scale"):
        _warn_if_scored_otherwise({"dtype": "float32"}, "float32", tmp_path / "baseline.json")
        _warn_if_scored_otherwise({"teacher": None}, "bfloat16", tmp_path / "baseline.json")  # a run from before the record
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="cald_scale"):
        _warn_if_scored_otherwise({"dtype": "float32"}, "bfloat16", tmp_path / "baseline.json")
    assert "the starting point was scored in float32" in caplog.text and "this session computes in bfloat16" in caplog.text


def test_cache_folders_are_recorded_absolute(tmp_path, monkeypatch):
    """A relative cache folder (the default's) is the folder the run started in: recorded so,
    `cald-scale evaluate RUN` started elsewhere reads the same cache instead of tokenising the
    corpus again there (helper-90)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALD_SCALE_CACHE", raising=False)
    cfg = load_run_config(None, ["data.cache_dir=caches/tokens"])
    assert cfg.data.cache_dir == str(tmp_path / "caches" / "tokens")
    assert load_run_config(None, []).data.cache_dir == str(tmp_path / ".cache" / "cald_scale" / "data")
    encoder = ["task.kind=classification", "teacher.name_or_path=all-MiniLM-L6-v2", "student.conversion.mixer=linformer"]
    assert load_run_config(None, encoder).classification.cache_dir == str(tmp_path / ".cache" / "cald_scale" / "classification")
    # $CALD_SCALE_CACHE (a cluster's shared cache) holds them when set, as it holds teachers and corpora;
    # a folder the run names still wins.
    monkeypatch.setenv("CALD_SCALE_CACHE", "~/shared_cache")
    home = Path("~").expanduser()
    assert load_run_config(None, []).data.cache_dir == str(home / "shared_cache" / "data")
    assert load_run_config(None, encoder).classification.cache_dir == str(home / "shared_cache" / "classification")
    assert load_run_config(None, ["data.cache_dir=caches/tokens"]).data.cache_dir == str(tmp_path / "caches" / "tokens")


def test_a_resumed_run_keeps_the_token_cache_it_recorded_when_the_default_has_moved(tmp_path, monkeypatch, caplog):
    """A run started before $CALD_SCALE_CACHE was set resumes after: the default folder has moved,
    and following it would tokenise the corpus again (helper-101). It keeps the cache it recorded
    while that still exists; a folder the user gives, or a fresh run, takes the new one."""
    import logging

    from cald_scale.train import _check_run_dir, _keep_recorded_caches

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALD_SCALE_CACHE", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = load_run_config(None, [])
    (run_dir / "config.json").write_text(json.dumps(first.to_dict()))
    Path(first.data.cache_dir).mkdir(parents=True)
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "shared"))
    moved = load_run_config(None, [])
    assert moved.data.cache_dir == str(tmp_path / "shared" / "data")
    with caplog.at_level(logging.INFO, logger="cald_scale.train"):
        kept = _keep_recorded_caches(run_dir, moved, resuming=True)
    assert kept.data.cache_dir == first.data.cache_dir and "resuming with the run's recorded cache" in caplog.text
    assert kept.classification.cache_dir == first.classification.cache_dir  # not read by this task: its record stands
    assert _check_run_dir(run_dir, kept, resuming_at=2) == []  # nothing changed
    assert _keep_recorded_caches(run_dir, moved, resuming=False).data.cache_dir == moved.data.cache_dir
    given = load_run_config(None, [f"data.cache_dir={tmp_path / 'mine'}"])
    assert _keep_recorded_caches(run_dir, given, resuming=True).data.cache_dir == str(tmp_path / "mine")
    Path(first.data.cache_dir).rmdir()  # the recorded cache is gone: the new default it is
    assert _keep_recorded_caches(run_dir, moved, resuming=True).data.cache_dir == moved.data.cache_dir
