"""Lazy, tensor-by-tensor weight loading: safetensors (single, sharded), .bin, renamed keys, mismatches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_teacher

from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import build_student, convert_teacher
from cald_scale.conversion.teacher import TeacherConfig, build_teacher, open_teacher
from cald_scale.conversion.weights import (
    StateDictReader,
    TensorTree,
    WeightsMismatchError,
    load_weights,
    open_weights,
)


def _save_with_tokenizer(model, folder, **kwargs):
    # NOTE: a byte-level BPE, which every family's tokenizer class loads (a WordLevel toy loads
    # as an empty Qwen2Tokenizer for qwen2, which open_teacher refuses).
    from tiny_models import train_tokenizer

    model.save_pretrained(folder, **kwargs)
    train_tokenizer(["a b c"], vocab_size=257).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_teacher_built_from_a_folder_equals_the_saved_model(tmp_path, family):
    model = tiny_teacher(family)
    _save_with_tokenizer(model, tmp_path)
    source, _ = open_teacher(TeacherConfig(name_or_path=str(tmp_path)))
    loaded = build_teacher(source)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_sharded_safetensors_and_bin_read_the_same_tensors(tmp_path):
    model = tiny_teacher("llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reader = open_weights(sharded)
    state = model.state_dict()
    for key in reader.keys():
        assert torch.equal(reader.get(key), state[key]) and reader.shape(key) == tuple(state[key].shape)
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save({k: v.clone() for k, v in state.items()}, binary / "pytorch_model.bin")
    assert torch.equal(open_weights(binary).get("model.norm.weight"), state["model.norm.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        open_weights(tmp_path / "empty")


def test_gpt_neox_checkpoint_names_are_renamed_like_transformers_does(tmp_path):
    model = tiny_teacher("gpt_neox")
    model.save_pretrained(tmp_path)
    assert "embed_out.weight" in open_weights(tmp_path).keys()  # the legacy name on disk
    fresh = tiny_teacher("gpt_neox", seed=1)
    load_weights(fresh, open_weights(tmp_path))
    assert torch.equal(fresh.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_a_checkpoint_of_the_base_model_reads_with_its_prefix_added():
    """Saved from LlamaModel (no ``model.`` prefix): transformers adds the prefix on load, and so
    does the tensor-by-tensor reader, for the teacher and the student alike."""
    teacher = tiny_teacher("llama")
    base = {k: v for k, v in teacher.model.state_dict().items()}  # the keys as LlamaModel saves them
    assert "layers.0.self_attn.q_proj.weight" in base
    fresh = tiny_teacher("llama", seed=1)
    load_weights(fresh, StateDictReader({**base, "lm_head.weight": teacher.lm_head.weight}))
    assert torch.equal(fresh.model.layers[1].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    student = build_student(teacher.config, StateDictReader({**base, "lm_head.weight": teacher.lm_head.weight}), ConversionConfig(), seed=3)
    expected = convert_teacher(teacher, ConversionConfig(), seed=3)
    assert torch.equal(student.mixers()[0].in_proj.weight, expected.mixers()[0].in_proj.weight)


def test_mismatches_are_named_before_anything_is_written():
    model = tiny_teacher("llama")
    before = model.model.norm.weight.clone()
    state = {k: v + 1 for k, v in model.state_dict().items()}
    state.pop("model.layers.0.mlp.up_proj.weight")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(5)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(model, StateDictReader(state))
    message = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in message and "mlp.extra.weight" in message and "model.norm.weight" in message
    assert torch.equal(model.model.norm.weight, before)


def test_tensor_tree_reads_attention_like_a_module():
    model = tiny_teacher("llama")
    tree = TensorTree(StateDictReader(model.state_dict()), "model.layers.1.self_attn.")
    assert torch.equal(tree.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert tree.q_proj.bias is None and tree.nothing is None


@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
def test_student_from_a_checkpoint_equals_the_in_memory_conversion(tmp_path, mixer):
    """Reading the teacher's files tensor by tensor gives the same student as converting the loaded teacher."""
    teacher = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path)
    conversion = ConversionConfig(mixer=mixer, attention_init=mixer == "mamba2")
    from_files = build_student(teacher.config, open_weights(tmp_path), conversion, seed=3)
    in_memory = convert_teacher(teacher, conversion, seed=3)
    a, b = from_files.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Mixers are seeded per layer: another seed, other mixers; the same copied weights.
    other = convert_teacher(teacher, conversion, seed=4)
    assert not torch.equal(other.mixers()[0].in_proj.weight, in_memory.mixers()[0].in_proj.weight)
    assert torch.equal(other.backbone.model.layers[0].mlp.up_proj.weight, in_memory.backbone.model.layers[0].mlp.up_proj.weight)


def test_safetensors_reader_matches_the_library_and_names_truncation(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2, 2)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = open_weights(tmp_path)
    expected = load_file(tmp_path / "model.safetensors")
    for key in tensors:
        got = reader.get(key)
        assert got.dtype == expected[key].dtype and torch.equal(got, expected[key]) and reader.shape(key) == tuple(expected[key].shape)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    truncated = open_weights(tmp_path)
    with pytest.raises(WeightsMismatchError, match="truncated"):
        for key in tensors:
            truncated.get(key)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsMismatchError, match="not a safetensors file"):
        open_weights(tmp_path)


def test_a_range_of_a_flattened_tensor_is_read_alone_from_safetensors_and_bin(tmp_path):
    """A ZeRO-3 rank reads its partition's range of each tensor (engines/partitioned.py): the range
    equals the flattened tensor's, in every dtype and file format, clamped at the tensor's end.
    Of a safetensors file only the range's bytes are read: a file cut just after it still reads it."""
    from safetensors.torch import save_file

    from cald_scale.conversion.weights import RenamedReader, StoredTensor

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 3, 2)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    for reader in (open_weights(tmp_path), open_weights(tmp_path / "bin"), StateDictReader(tensors)):
        for key, value in tensors.items():
            flat = value.reshape(-1)
            for start, stop in ((0, flat.numel()), (1, 4), (value.numel() - 2, value.numel() + 5), (3, 3)):
                got = reader.get_flat(key, start, stop)
                assert got.dtype == value.dtype and torch.equal(got, flat[start:stop]), (type(reader).__name__, key, start, stop)
    # Read straight into a destination of the file's dtype; another dtype reads a range, then converts.
    for key, value in tensors.items():
        flat = value.reshape(-1)
        into = torch.full((3,), 7, dtype=value.dtype)
        assert open_weights(tmp_path).read_flat_into(key, 1, into) and torch.equal(into, flat[1:4])
        assert not open_weights(tmp_path).read_flat_into(key, 1, torch.zeros(3, dtype=torch.float64))
        converted = torch.zeros(3, dtype=torch.float64)
        StoredTensor(open_weights(tmp_path), key).read_flat_into(converted, 1)
        assert torch.equal(converted, flat[1:4].double())
    # A reader without get_flat (a user's own) reads the tensor whole and slices it.
    plain = StoredTensor(RenamedReader(StateDictReader(tensors), torch.nn.Module()), "c")
    assert plain.shape == (2, 3, 2) and torch.equal(plain.read_flat(2, 9), tensors["c"].reshape(-1)[2:9])
    data = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last = max(tensors, key=lambda k: header[k]["data_offsets"][1])  # the tensor at the file's end
    flat, size = tensors[last].reshape(-1), tensors[last].element_size()
    (tmp_path / "model.safetensors").write_bytes(data[: -2 * size])  # its last two elements gone
    cut = open_weights(tmp_path)
    assert torch.equal(cut.get_flat(last, 0, flat.numel() - 2), flat[:-2])
    with pytest.raises(WeightsMismatchError, match="truncated"):
        cut.get_flat(last, 1, flat.numel() - 1)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_checkpoints_with_the_rotary_buffers_of_old_transformers_load(tmp_path, family):
    """Checkpoints saved before transformers 4.31 (Pythia, Llama-2 era) hold every layer's
    rotary inv_freq: transformers drops them, and so do the teacher and a hybrid student."""
    from safetensors.torch import load_file, save_file

    model = tiny_teacher(family)
    _save_with_tokenizer(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    layer = "model.layers.0.self_attn" if family == "llama" else "gpt_neox.layers.0.attention"
    weights[f"{layer}.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source, _ = open_teacher(TeacherConfig(name_or_path=str(tmp_path)))
    loaded = build_teacher(source)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    build_student(model.config, open_weights(tmp_path), ConversionConfig(attention_layers=[0]))  # its kept layer reads the same tensors


def test_a_gpt2_checkpoint_as_published_loads_as_teacher_and_student(tmp_path):
    """openai-community/gpt2's file: keys without the ``transformer.`` prefix, no lm_head (tied),
    and every layer's old causal-mask buffers ``attn.bias`` and ``attn.masked_bias``, which
    transformers skips; one unexpected masked_bias refused the whole teacher."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    _save_with_tokenizer(model, tmp_path)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("lm_head")}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source, _ = open_teacher(TeacherConfig(name_or_path=str(tmp_path)))
    loaded = build_teacher(source).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    build_student(model.config, open_weights(tmp_path), ConversionConfig(attention_layers=[0]))


def test_a_folder_with_mistrals_consolidated_weights_reads_the_transformers_ones():
    """Mistral's repos hold consolidated.safetensors beside model.safetensors: the same weights
    under other names, which transformers never reads; mixed in, they were unexpected keys."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        model = tiny_teacher("llama")
        model.save_pretrained(folder)
        save_file({"layers.0.attention.wq.weight": torch.ones(2, 2)}, Path(folder) / "consolidated.safetensors")
        assert "layers.0.attention.wq.weight" not in set(open_weights(folder).keys())
        load_weights(tiny_teacher("llama"), open_weights(folder))


def test_a_teachers_weights_are_identified_by_content_not_by_path(tmp_path):
    """What a resumed run compares (train.py's teacher.json): the same weights copied elsewhere or
    named by another spelling of their path are the same teacher; weights saved anew over the same
    geometry (another seed: a teacher fine-tuned further) are not, in one shard of several too.
    A resume against the new weights is refused in one line; an older run is recorded, not refused."""
    import shutil

    from cald_scale.conversion.weights import weights_fingerprint
    from cald_scale.engines.distributed import DistEnv
    from cald_scale.train import _check_same_teacher

    folder = tmp_path / "teacher"
    tiny_teacher("llama", seed=0).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    first = weights_fingerprint(folder)
    shutil.copytree(folder, tmp_path / "copy")
    assert weights_fingerprint(tmp_path / "copy") == weights_fingerprint(f"{folder}/../teacher/") == first
    tiny_teacher("llama", seed=1).save_pretrained(folder, max_shard_size="40KB")
    again = weights_fingerprint(folder)
    assert [(name, size) for name, size, _ in again] == [(name, size) for name, size, _ in first]  # the same geometry
    assert all(a[2] != b[2] for a, b in zip(again, first))
    # One tensor changed in a file larger than the slices read (one layer fine-tuned, one norm
    # rescaled), in safetensors and in .bin files: each changes the digest.
    model = tiny_teacher("llama", vocab=32768, seed=0)  # 8 MiB: the layers sit among 8 MiB of embedding
    for safe in (True, False):
        whole = tmp_path / f"whole_{safe}"
        model.save_pretrained(whole, safe_serialization=safe)
        before = weights_fingerprint(whole)
        assert before[0][1] > 8 << 20  # most bytes lie outside the slices read
        for name, change in (("model.layers.1.mlp.down_proj.weight", lambda t: t + 1e-3), ("model.layers.2.input_layernorm.weight", lambda t: t * 1.5)):
            edited = copy.deepcopy(model)
            with torch.no_grad():
                edited.get_parameter(name).copy_(change(edited.get_parameter(name)))
            edited.save_pretrained(tmp_path / "edited", safe_serialization=safe)
            assert weights_fingerprint(tmp_path / "edited") != before, (safe, name)
            shutil.rmtree(tmp_path / "edited")

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _check_same_teacher(run_dir, env, {"weights": first}, resumed_at=None)
    _check_same_teacher(run_dir, env, {"weights": first}, resumed_at=4)
    with pytest.raises(ValueError, match=r"the teacher or student.init_from of run .* changed since it started \(its newest checkpoint is at step 4\): weights was .*restore it, or start a new run"):
        _check_same_teacher(run_dir, env, {"weights": again}, resumed_at=4)
    (run_dir / "teacher.json").unlink()  # a run from before the record: this session's teacher is recorded
    _check_same_teacher(run_dir, env, {"weights": again}, resumed_at=4)
    assert json.loads((run_dir / "teacher.json").read_text()) == {"weights": again}
