"""Teacher sources: local folder, GGUF, hub id, and the errors for each kind of bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from ports import free_port
from tiny_models import tiny_teacher

from cald_scale.conversion import teacher as teacher_mod
from cald_scale.conversion.teacher import (
    TeacherConfig,
    load_teacher,
    open_teacher,
    resolve_teacher_source,
)


def test_missing_teacher_path_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_teacher(TeacherConfig(name_or_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(TeacherConfig(name_or_path="./relative/missing"))


def test_a_relative_path_of_several_parts_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """The encoder recipe's teacher (runs/encoder/wiki_std/student) before the Std. run made it: a
    missing path, not a hub lookup's error; owner/name stays a hub id."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="teacher path 'runs/encoder/wiki_std/student' does not exist"):
        resolve_teacher_source(TeacherConfig(name_or_path="runs/encoder/wiki_std/student"))
    assert resolve_teacher_source(TeacherConfig(name_or_path="HuggingFaceTB/SmolLM2-135M"))[0] == "hub"


def test_a_gguf_file_name_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="teacher.gguf_file='m.Q8_0.gguf' names a file inside a local folder"):
        resolve_teacher_source(TeacherConfig(name_or_path="someone/some-gguf-repo", gguf_file="m.Q8_0.gguf"))


def test_a_file_that_is_not_gguf_is_named(tmp_path, monkeypatch):
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.fail("the gguf and accelerate packages are project dependencies (the built-in teacher is a GGUF)")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"teacher GGUF file {junk} could not be read"):
        load_teacher(TeacherConfig(name_or_path=str(junk)))


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(TeacherConfig(name_or_path=str(tmp_path)))


def test_a_quantized_checkpoint_is_refused_by_name(tmp_path):
    """MXFP4 gpt-oss, FP8 Qwen3: packed tensors fit no float model, and failed as a list of
    unexpected keys once weights were read (helper-101). Refused from config.json, by its method."""
    teacher = tiny_teacher("llama")
    teacher.config.quantization_config = {"quant_method": "mxfp4"}
    teacher.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a quantized checkpoint \(mxfp4 in its config.json\).*de-quantised copy"):
        load_teacher(TeacherConfig(name_or_path=str(tmp_path)))


def test_gguf_without_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(teacher_mod.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImportError, match="pip install gguf"):
        load_teacher(TeacherConfig(name_or_path=str(fake)))


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    """A relative folder given from another working directory reads as a hub id too: the message
    also says which local folder is absent (helper-77)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_teacher_source(TeacherConfig(name_or_path="EleutherAI/pythia-1b"))[0] == "hub"
    with pytest.raises(OSError, match=rf"there is no local folder {tmp_path / 'EleutherAI' / 'pythia-1b'} either .*local HF folder or a .gguf"):
        load_teacher(TeacherConfig(name_or_path="EleutherAI/pythia-1b"))


def test_local_folder_loads_frozen(tmp_path):
    model = tiny_teacher("llama")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a")), eos_token="<eos>")
    tok.save_pretrained(tmp_path)
    loaded, tokenizer, source = load_teacher(TeacherConfig(name_or_path=str(tmp_path)))
    assert source.folder == tmp_path and source.kind == "folder" and tokenizer.pad_token == "<eos>"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_builtin_smollm2_teacher_is_real():
    """The default teacher: de-quantised once into the cache, then a real LM (low perplexity on English)."""
    model, tokenizer, source = load_teacher(TeacherConfig())
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.exp(loss).item() < 30


def test_a_waypoint_list_is_checked_whole_and_one_bad_waypoint_keeps_its_own_error(tmp_path):
    from cald_scale.conversion.weights import WeightsMismatchError
    from cald_scale.engines.teacher import check_waypoints

    good, other = tmp_path / "good", tmp_path / "two_layers"
    tiny_teacher("llama", layers=3).save_pretrained(good)
    tiny_teacher("llama", layers=2).save_pretrained(other)
    config = tiny_teacher("llama", layers=3).config
    missing = tmp_path / "missing"
    check_waypoints([good, good], config)  # nothing to say
    with pytest.raises(FileNotFoundError, match=f"teacher checkpoint {missing} does not exist"):
        check_waypoints([good, missing], config)
    with pytest.raises(WeightsMismatchError, match="2 of the 3 waypoints cannot guide this run") as err:
        check_waypoints([missing, good, other], config)
    assert str(missing) in str(err.value) and f"{other} does not match the teacher (num_hidden_layers: 2 vs 3)" in str(err.value)
    assert f"{good} " not in str(err.value) and not str(err.value).endswith(str(good))



_TRAJECTORY_NAN = r"""
import os, sys

import deepspeed
import torch
from tiny_models import tiny_teacher

from cald_scale.distill.stages import LayerwiseModel
from cald_scale.engines.teacher import ManagedTeacher

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
model = tiny_teacher("llama", layers=2)
config = {"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "zero_optimization": {"stage": 3}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
managed = ManagedTeacher(engine, LayerwiseModel(engine.module), None, "base")
batch = {"input_ids": torch.randint(0, 256, (1, 16))}
engine.module.eval()  # as build_teacher leaves it: the forwards that guide the student
modes = []
engine.module.model.layers[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
print("FIRST:", managed.train_step(batch), engine.global_steps)
print("MODES:", modes, engine.module.training, engine.module.model.layers[0].training)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0):
    engine.module.model.norm.weight.data.fill_(float("nan"))  # its own loss is NaN from here
print("SECOND:", managed.train_step(batch))
print("STEPS:", engine.global_steps)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    print("NAN_TENSORS:", sorted(n for n, p in engine.module.named_parameters() if torch.isnan(p).any()))
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


def test_a_trajectory_teacher_step_on_a_non_finite_loss_leaves_its_weights_as_they_were(tmp_path):
    """A real ZeRO-3 teacher engine whose own loss turns NaN: applied, the NaN would reach every
    weight on every rank for good (and the next checkpoint). DeepSpeed (0.19) takes a step whose
    gradient norm is not finite for an overflow, in any dtype, and skips it: no tensor but the one
    made NaN here is touched, and the run goes on (the NaN shows as the step's teacher_ce)."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    tests = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tests}:{tests.parent}"}
    proc = subprocess.run([sys.executable, "-c", _TRAJECTORY_NAN, str(port)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-4000:]
    first = next(line for line in out.splitlines() if line.startswith("FIRST:")).split()
    assert float(first[1]) > 0 and first[2] == "1"
    assert "MODES: [True] False False" in out  # dropout on for its own fine-tuning step, off after it
    assert "SECOND: nan" in out and "NAN_TENSORS: ['model.norm.weight']" in out


_TRAJECTORY_RELOAD = r"""
import os, sys

import deepspeed
import torch

import cald_scale.engines.ds_config as ds_config
ds_config.bf16_available = lambda: True  # bf16 engines run on CPU too; the GPU's default precision

from cald_scale.config import load_run_config
from cald_scale.conversion.teacher import open_teacher
from cald_scale.engines.distributed import init_distributed
from cald_scale.engines.models import build_models

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
env = init_distributed()
phases = "phases=[{name: a, steps: 1, guidance: trajectory}, {name: b, steps: 1, guidance: target}, {name: c, steps: 1, guidance: trajectory}]"
cfg = load_run_config(overrides=[f"teacher.name_or_path={sys.argv[1]}", "train.global_batch_size=2", "train.max_steps=3", phases,
                                 "student.trainable=all", "student.conversion.attention_every=0"])
ds = ds_config.resolve_ds_config(ds_config.load_ds_config(sys.argv[3]), cfg.train, env.world_size)
source, _ = open_teacher(cfg.teacher)
teacher = build_models(cfg, ds, source, cfg.plan(1)).managed_teacher
params = list(teacher.engine.module.parameters())

def weights():
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().float().flatten().clone() for p in params])

batch = {"input_ids": torch.randint(0, source.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))}
base = weights()
teacher.set_lr(1e-2, 0.0)
for _ in range(5):
    teacher.train_step(batch)
trained = weights()
teacher.load(str(source.folder))  # the base teacher again, as a target phase between two trajectory phases loads it
teacher.train_step(batch)
after = weights()
print("BF16:", ds["bf16"]["enabled"])
print("FROM_BASE:", float((after - base).abs().max()), "FROM_TRAINED:", float((after - trained).abs().max()))
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


def test_a_trajectory_teacher_given_the_base_weights_again_steps_from_them_in_bf16(tmp_path):
    """In bf16 the teacher's optimizer keeps fp32 master weights apart from the partitions a load
    writes: its next step copied the trained weights back (the base was gone after one step; in
    fp32 on CPU the master is the partition itself, so CPU and GPU runs of one recipe disagreed)."""
    import subprocess
    import sys
    from pathlib import Path

    from tiny_models import save_tiny_teacher, train_tokenizer

    folder = save_tiny_teacher(tmp_path / "teacher", "llama", train_tokenizer(["to be or not to be"] * 8, vocab_size=300), layers=2)
    port = free_port()
    tests = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tests}:{tests.parent}"}
    proc = subprocess.run([sys.executable, "-c", _TRAJECTORY_RELOAD, str(folder), str(port), str(tests.parent / "ds_configs" / "zero3.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "BF16: True" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("FROM_BASE:")).split()
    from_base, from_trained = float(line[1]), float(line[3])
    assert from_base < from_trained, (from_base, from_trained)  # one step from the base, not from the trained weights


def test_a_gguf_teacher_is_cached_by_content_not_by_where_it_was_installed(tmp_path):
    """Each new venv installs the same GGUF file anew (another path, another mtime): the same
    de-quantised folder serves it. A file rewritten in place with other weights (only in the
    middle: a fine-tune that kept embedding and head) is another folder."""
    import os
    import shutil

    cache = str(tmp_path / "cache")
    first = tmp_path / "venv1" / "model.Q4.gguf"
    first.parent.mkdir()
    first.write_bytes(os.urandom(3 << 20))
    second = tmp_path / "venv2" / "model.Q4.gguf"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    os.utime(second, (1, 1))
    assert teacher_mod._gguf_cache_folder(first, cache) == teacher_mod._gguf_cache_folder(second, cache)
    changed = bytearray(second.read_bytes())
    changed[len(changed) // 2] ^= 1
    second.write_bytes(bytes(changed))
    assert teacher_mod._gguf_cache_folder(first, cache) != teacher_mod._gguf_cache_folder(second, cache)


def test_a_teacher_folder_saved_without_its_tokenizer_is_named_not_its_corpus(tmp_path):
    """transformers builds an empty tokenizer for a folder without tokenizer files, which encoded
    every corpus to nothing ("corpus ... has no text to tokenise"); one with more tokens than the
    model embeds is named when the teacher opens."""
    import logging

    from tiny_models import save_tiny_teacher, train_tokenizer

    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    folder = save_tiny_teacher(tmp_path / "teacher", "qwen2", tokenizer)
    open_teacher(TeacherConfig(name_or_path=str(folder)))
    for name in folder.glob("tokenizer*"):
        name.unlink()
    with pytest.raises(ValueError, match=r"its tokenizer encodes text to no tokens .*tokenizer files .* are missing"):
        open_teacher(TeacherConfig(name_or_path=str(folder)))

    small = save_tiny_teacher(tmp_path / "small", "llama", tokenizer)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": len(tokenizer) - 10}))
    logger = logging.getLogger("cald_scale.teacher")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        open_teacher(TeacherConfig(name_or_path=str(small)))
    finally:
        logger.removeHandler(handler)
    assert any(f"its tokenizer has {len(tokenizer)} tokens but the model embeds {len(tokenizer) - 10}" in r.getMessage() for r in records)


def test_a_context_longer_than_the_teachers_positions_is_refused_when_the_task_opens(tmp_path):
    """data.seq_len past the teacher's max_position_embeddings trained on layer targets the
    teacher was never trained to give (and `cald-scale evaluate` refused the finished run)."""
    from tiny_models import save_tiny_teacher, train_tokenizer

    from cald_scale.config import load_run_config
    from cald_scale.tasks import open_task

    folder = save_tiny_teacher(tmp_path / "teacher", "llama", train_tokenizer(["a b c d e f"] * 10, vocab_size=280))
    common = [f"teacher.name_or_path={folder}", f"data.cache_dir={tmp_path / 'data'}"]
    with pytest.raises(ValueError, match=r"a context of 1024 tokens exceeds the teacher's max_position_embeddings \(512\).*lower data.seq_len"):
        open_task(load_run_config(overrides=[*common, "data.seq_len=1024"]), is_main=True)
    assert open_task(load_run_config(overrides=[*common, "data.seq_len=512"]), is_main=True).source.folder == folder
    with pytest.raises(ValueError, match="exceeds the teacher's max_position_embeddings"):  # kept attention layers
        open_task(load_run_config(overrides=[*common, "data.seq_len=1024", "phases=[{name: u, guidance: none}]"]), is_main=True)
    # Unguided, mixers alone: nothing in the run has positions.
    unguided = ["phases=[{name: u, guidance: none}]", "student.conversion.attention_every=0"]
    assert open_task(load_run_config(overrides=[*common, "data.seq_len=1024", *unguided]), is_main=True).source.folder == folder


def test_gguf_converters_without_locks_keep_whichever_finishes_first(tmp_path, monkeypatch):
    """On a file system that takes no locks every rank converts a GGUF teacher at once: one must
    neither clear another's temp folder (it did: the other then failed mid-write) nor fail when
    the other's folder is already in place (the rename onto it: ENOTEMPTY)."""
    from tiny_models import tiny_teacher, train_tokenizer

    target = tmp_path / "teachers" / "model-abc"
    other_rank = target.parent / f".{target.name}.tmp-other-rank"
    (other_rank / "sub").mkdir(parents=True)
    model, tokenizer = tiny_teacher("llama"), train_tokenizer(["a small corpus of text"] * 8, 64)

    def load_model(*args, **kwargs):
        # Another rank finishes its conversion while this one loads.
        target.mkdir()
        (target / "config.json").write_text('{"model_type": "llama"}')
        (target / "model.safetensors").write_text("theirs")
        return model

    monkeypatch.setattr(teacher_mod, "_require_gguf", lambda: None)
    monkeypatch.setattr(teacher_mod.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(teacher_mod.AutoModelForCausalLM, "from_pretrained", load_model)
    teacher_mod._convert_gguf(tmp_path / "model.gguf", target, locked=False)
    assert (target / "model.safetensors").read_text() == "theirs" and other_rank.is_dir()
    assert sorted(p.name for p in target.parent.iterdir()) == [other_rank.name, target.name]  # this one's temp folder removed
    shutil.rmtree(target)
    # Under the lock nobody else writes there: a failed rename is an error, and temp folders
    # beside the target are a killed converter's (cleared).
    with pytest.raises(OSError):
        teacher_mod._convert_gguf(tmp_path / "model.gguf", target, locked=True)
    assert not other_rank.exists()


def test_a_family_without_sdpa_runs_eager_under_the_default_kernel(tmp_path):
    """teacher.attn_implementation defaults to sdpa, which transformers refuses to build for
    Gemma2 (and GPT-Neo, XGLM): such a teacher ran only with the setting changed by hand, and a
    copied student's evaluate had no setting to change. It runs eager; llama keeps sdpa."""
    from tiny_models import save_tiny_teacher, train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(["a b c d e f"] * 10, vocab_size=280)
    folder = tmp_path / "gemma2"
    config = AutoConfig.for_model(
        "gemma2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, _, source = load_teacher(TeacherConfig(name_or_path=str(folder)))
    assert source.config._attn_implementation == "eager" and model.config._attn_implementation == "eager"
    llama = save_tiny_teacher(tmp_path / "llama", "llama", tokenizer)
    assert open_teacher(TeacherConfig(name_or_path=str(llama)))[0].config._attn_implementation == "sdpa"


def test_a_student_keeping_its_teachers_position_table_is_refused_past_it_even_unguided(tmp_path):
    """A GPT-2 student keeps the teacher's absolute position table: unguided and of mixers alone
    it still has no row past n_positions, so that context is refused when the task opens."""
    from tiny_models import train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from cald_scale.config import load_run_config
    from cald_scale.tasks import open_task

    tokenizer = train_tokenizer(["a b c d e f"] * 10, vocab_size=280)
    folder = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    unguided = [f"teacher.name_or_path={folder}", f"data.cache_dir={tmp_path / 'data'}", "phases=[{name: u, guidance: none}]", "student.conversion.attention_every=0"]
    with pytest.raises(ValueError, match=r"256 tokens exceeds the teacher's max_position_embeddings \(128\): its position table has that many rows"):
        open_task(load_run_config(overrides=[*unguided, "data.seq_len=256"]), is_main=True)
    assert open_task(load_run_config(overrides=[*unguided, "data.seq_len=128"]), is_main=True).source.folder == folder


def test_a_converted_student_as_init_from_is_refused_by_what_it_is(tmp_path):
    """student.init_from names a model to convert; a trained student given there failed as an
    unconvertible family ('cald_student': no attention module ...)."""
    from tiny_models import save_tiny_teacher, train_tokenizer

    from cald_scale.config import load_run_config
    from cald_scale.config_loader import ConfigError
    from cald_scale.conversion.modeling import ConversionConfig
    from cald_scale.conversion.surgery import convert_teacher
    from cald_scale.tasks import open_task

    tokenizer = train_tokenizer(["a b c d e f"] * 10, vocab_size=280)
    folder = save_tiny_teacher(tmp_path / "teacher", "llama", tokenizer)
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(folder)))
    convert_teacher(teacher, ConversionConfig()).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    overrides = [f"teacher.name_or_path={folder}", f"data.cache_dir={tmp_path / 'data'}", f"student.init_from={tmp_path / 'student'}"]
    with pytest.raises(ConfigError, match=r"student.init_from .*student' is a converted cald_scale student: .*resuming its run"):
        open_task(load_run_config(overrides=overrides), is_main=True)
