"""`cald-scale generate` / `cald-scale export`, and the context limit of models with attention."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import save_tiny_teacher, tiny_teacher, train_tokenizer, with_memory

from cald_scale.cli import main
from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.generation.context import check_context, max_context

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    teacher_dir = save_tiny_teacher(root / "teacher", "llama", tokenizer)
    out = {"teacher": teacher_dir}
    for name, family, kept in (("student", "llama", []), ("hybrid", "llama", [1]), ("neox", "gpt_neox", [])):
        teacher = tiny_teacher(family, vocab=len(tokenizer))
        student = with_memory(convert_teacher(teacher, ConversionConfig(attention_layers=kept), teacher_name_or_path=str(teacher_dir)))
        student.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_generate_student_and_teacher_side_by_side(folders, tmp_path):
    out = tmp_path / "gen.json"
    argv = ["generate", str(folders["student"]), "--prompt", "To be", "--prompt", "Whether 'tis nobler in",
            "--max_new_tokens", "6", "--teacher", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["the student"] * 2 + ["the teacher"] * 2
    assert all(r["new_tokens"] == 6 for r in rows)
    student, teacher = rows[0]["cache_bytes"], rows[2]["cache_bytes"]
    assert student["kv"] == 0 and student["recurrent"] > 0  # mixers only: a state, no KV
    assert teacher["kv"] > 0 and teacher["recurrent"] == 0


def test_a_bamba_export_and_another_hf_model_are_named_as_what_they_are(folders, tmp_path):
    """The output names what PATH holds (a plain HF folder was labelled "the student"); a Bamba
    export finds its teacher as its student does (the name its config records)."""
    bamba = tmp_path / "bamba"
    assert main(["export", str(folders["student"]), "--bamba", str(bamba)]) == 0
    out = tmp_path / "gen.json"
    assert main(["generate", str(bamba), "--prompt", "To be", "--max_new_tokens", "3", "--teacher", "--json", str(out)]) == 0
    assert [r["model"] for r in json.loads(out.read_text())] == ["the Bamba export", "the teacher"]
    assert main(["generate", str(folders["teacher"]), "--prompt", "To be", "--max_new_tokens", "3", "--json", str(out)]) == 0
    assert [r["model"] for r in json.loads(out.read_text())] == ["the model"]


def test_a_model_saved_without_its_language_model_head_is_refused(tmp_path, capsys):
    """A bare encoder (BertModel, what the encoder track takes as a teacher) loaded as a causal LM
    gets a new random head, and generated noise with status 0."""
    from transformers import BertConfig, BertModel

    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "To be"]) == 2
    err = capsys.readouterr().err
    assert f"{folder} holds a BertModel (bert), not a causal LM" in err and "Traceback" not in err


def test_a_static_kv_cache_gives_the_same_completions_preallocated(folders, tmp_path):
    """--kv-cache static: the teacher's and a hybrid's kept layers' KV preallocated for the whole
    generation and written in place; the same tokens."""
    rows = {}
    for kind in ("dynamic", "static"):
        out = tmp_path / f"{kind}.json"
        argv = ["generate", str(folders["hybrid"]), "--prompt", "To be", "--prompt", "Whether 'tis nobler in",
                "--max_new_tokens", "6", "--teacher", str(folders["teacher"]), "--kv-cache", kind, "--json", str(out)]
        assert main(argv) == 0
        rows[kind] = json.loads(out.read_text())
    assert [r["completion"] for r in rows["static"]] == [r["completion"] for r in rows["dynamic"]]
    for kind in ("dynamic", "static"):
        assert [r["kv_cache"] for r in rows[kind]] == [kind] * 4  # what the caches were, read off them
        assert all(r["cache_bytes"]["kv"] > 0 for r in rows[kind])


def test_generate_times_prefill_and_decode_apart(folders, tmp_path):
    """The summary's decode rate is the batch's decode steps over their time, without the prefill."""
    out = tmp_path / "gen.json"
    argv = ["generate", str(folders["hybrid"]), "--prompt", "To be", "--prompt", "Whether 'tis nobler in", "--max_new_tokens", "5", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    row = rows[0]
    assert row["batch"] == 2 and row["decode_steps"] == 4 and row["prefill_s"] > 0 and row["decode_s"] > 0
    assert row["decode_tokens_per_s"] == pytest.approx(2 * 4 / row["decode_s"])
    assert row["prefill_s"] + row["decode_s"] <= row["seconds"]
    assert row["cache_bytes_per_sequence"] == sum(row["cache_bytes"].values()) / 2


def test_new_tokens_stop_at_the_end_of_sequence():
    import torch

    from cald_scale.generate import _ended_lengths

    new = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert _ended_lengths(new, 2) == [2, 4, 1]
    assert _ended_lengths(new, [7, 2]) == [2, 3, 1]
    assert _ended_lengths(new, None) == [4, 4, 4]


def test_generate_and_evaluate_refuse_bad_options_in_one_line(folders, tmp_path, capsys):
    import torch

    student = str(folders["student"])
    cases = [
        (["generate", student, "--prompt", "  "], "--prompt 1 is empty"),
        (["generate", student, "--prompt", "x", "--temperature", "0.5"], "--temperature applies to sampling: add --do_sample"),
        (["generate", student, "--prompt", "x", "--top_p", "1.5"], "must be in (0, 1]"),
        (["generate", student, "--prompt", "x", "--device", "foo"], "'foo' is not a torch device"),
        (["generate", student, "--prompt", "x", "--teacher", str(tmp_path / "nope")], "does not exist"),
        (["generate", str(tmp_path / "nowhere"), "--prompt", "x"], "nowhere does not exist"),
        (["generate", student, "--prompt", "x", "--json", str(tmp_path)], "is a folder: name the file to write"),
        (["export", student, "--bamba", str(tmp_path / "b"), "--device", "cpu"], "unrecognized arguments"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", student, "--prompt", "x", "--device", "cuda"], "sees no CUDA device"))
        cases.append((["evaluate", student, "--device", "cuda:0"], "sees no CUDA device"))
    for argv, message in cases:
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse's own usage errors
            status = stop.code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("cald-scale")]
        assert status == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, (argv, err)


def test_a_student_loads_whole_in_the_dtype_asked(folders, tmp_path):
    """Every parameter (the copied backbone too, not only the mixers) follows from_pretrained's
    dtype, whatever dtype the teacher's config names; both ways round, and through the command."""
    import cald_scale  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(folders["hybrid"], dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16.save_pretrained(tmp_path / "bf16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    argv = ["generate", str(folders["hybrid"]), "--prompt", "To be", "--max_new_tokens", "3", "--dtype", "bfloat16", "--json", str(tmp_path / "g.json")]
    assert main(argv) == 0
    row = json.loads((tmp_path / "g.json").read_text())[0]
    assert row["decode_steps"] == 2 and row["dtype"] == "bfloat16"
    # The default (auto) on CPU: float32, whatever the folder was saved in.
    assert main(argv[:-4] + ["--json", str(tmp_path / "auto.json")]) == 0
    assert json.loads((tmp_path / "auto.json").read_text())[0]["dtype"] == "float32"


def test_auto_dtype_on_a_gpu_is_the_precision_the_model_trained_in(folders, tmp_path):
    """--dtype auto on a GPU: a run's compute dtype (its folder or its student/, as evaluate scores
    it), another folder's saved dtype; float32 on CPU; a dtype given is kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from cald_scale.generate import resolve_dtype

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(folders["teacher"]), "dtype": "bfloat16"}, "data": {}}))
    (run / "student" / "config.json").write_text((folders["student"] / "config.json").read_text())
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype("auto", run, cuda) == resolve_dtype("auto", run / "student", cuda) == "bfloat16"
    assert resolve_dtype("auto", run, cpu) == "float32" and resolve_dtype("float16", run, cuda) == "float16"
    # Run from inside its student/ ("."): the same answer. A run config another version wrote,
    # with a data key this one lacks, still says its precision (generate reads no data).
    with pytest.MonkeyPatch.context() as inside:
        inside.chdir(run / "student")
        assert resolve_dtype("auto", ".", cuda) == "bfloat16"
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": "x", "dtype": "bfloat16"}, "data": {"a_future_key": 1}}))
    assert resolve_dtype("auto", run, cuda) == "bfloat16"
    import cald_scale  # noqa: F401

    AutoModelForCausalLM.from_pretrained(folders["hybrid"], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(folders["hybrid"]).save_pretrained(tmp_path / "fp32")
    assert resolve_dtype("auto", tmp_path / "bf16", "cuda") == "bfloat16" and resolve_dtype("auto", tmp_path / "fp32", "cuda") == "float32"


def test_context_beyond_the_teachers_positions_is_refused_for_attention_only(folders, tmp_path, capsys):
    import cald_scale  # noqa: F401
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(folders["student"])
    hybrid = AutoModelForCausalLM.from_pretrained(folders["hybrid"])
    teacher = AutoModelForCausalLM.from_pretrained(folders["teacher"])
    assert max_context(student) is None and max_context(teacher) == max_context(hybrid) == 512
    check_context(student, 100_000)
    with pytest.raises(ValueError, match="exceeds the teacher's max_position_embeddings \\(512\\)"):
        check_context(teacher, 513, "the teacher")
    # Through the command: from a prompt longer than 512 positions the student generates, the teacher is refused.
    prompt = " ".join(TEXT * 20)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(folders["student"])(prompt)["input_ids"]) > 512
    argv = ["generate", str(folders["student"]), "--prompt", prompt, "--max_new_tokens", "4"]
    assert main(argv + ["--json", str(tmp_path / "long.json")]) == 0
    assert json.loads((tmp_path / "long.json").read_text())[0]["new_tokens"] == 4
    capsys.readouterr()
    assert main(argv + ["--teacher"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("cald-scale")]
    assert len(errors) == 1 and "max_position_embeddings (512)" in errors[0] and "Traceback" not in captured.err
    assert "--max_new_tokens adds 4" in errors[0]
    assert "=== student" not in captured.out  # refused before the student generated anything (its completion is not lost half-way)


def test_export_command_writes_bamba_and_refuses_gpt_neox(folders, tmp_path, capsys):
    assert main(["export", str(folders["hybrid"]), "--bamba", str(tmp_path / "bamba")]) == 0
    config = json.loads((tmp_path / "bamba" / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["attn_layer_indices"] == [1]
    assert main(["export", str(folders["neox"]), "--bamba", str(tmp_path / "neox")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cald-scale")]
    assert len(errors) == 1 and "gpt_neox" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "neox").exists()


def test_graphed_decode_gives_generates_completion_and_refuses_what_it_cannot_replay(folders, tmp_path, capsys):
    """`generate_text(cuda_graph=True)` (what --cuda-graph picks on CUDA) completes a left-padded
    batch as `model.generate` does, greedy and sampled with a seed, holding the same state; on CPU
    its step runs the graph's eager bookkeeping; a hybrid's kept attention over a preallocated KV
    cache, whatever --kv-cache says. `--cuda-graph on` refuses a CPU device by name; auto on CPU
    decodes through generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cald_scale  # noqa: F401
    from cald_scale.generate import generate_text

    prompts = ["To be", "Whether 'tis nobler in the mind"]
    for kind in ("student", "hybrid"):
        student = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
        tokenizer = AutoTokenizer.from_pretrained(folders[kind])
        for sampling in ({}, {"do_sample": True, "top_p": 0.9}):
            rows = {}
            for graph in (False, True):
                torch.manual_seed(3)
                rows[graph] = generate_text(student, tokenizer, prompts, max_new_tokens=5, cuda_graph=graph, **sampling)
            assert [r["completion"] for r in rows[True]] == [r["completion"] for r in rows[False]], (kind, sampling)
            assert rows[True][0]["cache_bytes"]["recurrent"] == rows[False][0]["cache_bytes"]["recurrent"] > 0
        assert rows[True][0]["kv_cache"] == ("static" if kind == "hybrid" else None)
        assert (rows[True][0]["cache_bytes"]["kv"] > 0) == (kind == "hybrid")

    for folder, reason in ((folders["hybrid"], "--device cuda"), (folders["student"], "--device cuda")):
        assert main(["generate", str(folder), "--prompt", "To be", "--max_new_tokens", "2", "--cuda-graph", "on"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cald-scale")]
        assert len(errors) == 1 and reason in errors[0], errors
    assert main(["generate", str(folders["student"]), "--prompt", "To be", "--max_new_tokens", "2", "--json", str(tmp_path / "g.json")]) == 0


def test_the_command_list_gives_each_subcommand_a_whole_sentence(capsys):
    """`cald-scale --help` lists every subcommand with its docstring's first paragraph, not a
    first line cut mid-sentence."""
    from cald_scale.cli import COMMANDS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = " ".join(capsys.readouterr().out.split())
    for name in COMMANDS:
        assert name in listing
    assert "any corpus, or side by side on lm-eval-harness tasks." in listing


def test_the_teacher_generates_with_its_own_tokenizer(folders, tmp_path):
    """--teacher with another vocabulary: each model reads the prompt with its own tokenizer (the
    student's ids, up to 299, would index past this teacher's 120-row embedding)."""
    other = save_tiny_teacher(tmp_path / "other_teacher", "llama", train_tokenizer(TEXT, vocab_size=120))
    out = tmp_path / "g.json"
    argv = ["generate", str(folders["student"]), "--prompt", "Whether 'tis nobler", "--max_new_tokens", "3", "--teacher", str(other), "--json", str(out)]
    assert main(argv) == 0
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"the student", "the teacher"} and rows["the teacher"]["decode_steps"] == 2


def test_generate_text_leaves_the_callers_tokenizer_as_it_was(folders):
    import cald_scale  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cald_scale.generate import generate_text

    tokenizer = AutoTokenizer.from_pretrained(folders["student"])
    tokenizer.padding_side, tokenizer.pad_token = "right", None
    model = AutoModelForCausalLM.from_pretrained(folders["student"]).eval()
    rows = generate_text(model, tokenizer, ["To be", "Whether 'tis nobler in the mind"], max_new_tokens=2)
    assert len(rows) == 2 and (tokenizer.padding_side, tokenizer.pad_token) == ("right", None)


def test_wrong_kinds_of_folder_are_named(folders, tmp_path, capsys):
    """A training checkpoint (a tag, or the checkpoints/ folder), a classifier, and --cuda-graph on
    for a model that is no cald_scale student: one line each, saying what the folder is."""
    tag = tmp_path / "runs" / "r" / "checkpoints" / "step_8"
    tag.mkdir(parents=True)
    (tag / "cald_manifest.json").write_text("{}")
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text('{"model_type": "cald_classifier"}')
    bamba = tmp_path / "bamba"
    assert main(["export", str(folders["student"]), "--bamba", str(bamba)]) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",\n}')
    # A student whose weight file was cut short (a copy interrupted): named before any model loads
    # (evaluate once scored the whole teacher first, then failed in safetensors with a traceback).
    cut, cut_header = tmp_path / "cut", tmp_path / "cut_header"
    for folder, size in ((cut, -100), (cut_header, 1000)):
        shutil.copytree(folders["student"], folder)
        weights = folder / "model.safetensors"
        with open(weights, "r+b") as handle:
            handle.truncate(size if size > 0 else weights.stat().st_size + size)
    lfs = tmp_path / "lfs"  # a clone made without git-lfs: a pointer where the weights should be
    shutil.copytree(folders["student"], lfs)
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    cases = [
        (["generate", str(lfs), "--prompt", "x"], f"{lfs / 'model.safetensors'} is truncated or not a safetensors file (a git-lfs pointer: fetch the file with `git lfs pull`)"),
        (["generate", str(cut), "--prompt", "x"], f"{cut / 'model.safetensors'} is truncated: tensor"),
        (["evaluate", str(cut), "--corpus", "shakespeare"], f"{cut / 'model.safetensors'} is truncated: tensor"),
        (["export", str(cut), "--bamba", str(tmp_path / "b5")], f"{cut / 'model.safetensors'} is truncated: tensor"),
        (["generate", str(cut_header), "--prompt", "x"], f"{cut_header / 'model.safetensors'} is truncated or not a safetensors file: its header needs"),
        (["generate", str(broken), "--prompt", "x"], f"{broken / 'config.json'} is not valid JSON"),
        (["export", str(broken), "--bamba", str(tmp_path / "b4")], f"{broken / 'config.json'} is not valid JSON"),
        (["generate", str(tag), "--prompt", "x"], f"holds training checkpoints (DeepSpeed's partitioned state), not a model folder: give the run folder ({tmp_path / 'runs' / 'r'})"),
        (["generate", str(tag.parent), "--prompt", "x"], f"give the run folder ({tmp_path / 'runs' / 'r'})"),
        (["export", str(tag), "--bamba", str(tmp_path / "b2")], "holds training checkpoints"),
        (["generate", str(classifier), "--prompt", "x"], "is a sequence classifier: `cald-scale generate` works on causal LMs"),
        (["export", str(classifier), "--bamba", str(tmp_path / "b3")], "is a sequence classifier: `cald-scale export` works on causal LMs"),
        (["generate", str(bamba), "--prompt", "x", "--cuda-graph", "on"], "only a cald_scale student decodes as a CUDA graph; this is a bamba model"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("cald-scale")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (argv, err)


def test_a_teacher_that_ends_turns_on_other_tokens_passes_them_on(tmp_path, folders):
    """An instruct teacher's generation_config.json (end-of-turn tokens beyond config.json's
    eos) is read by the teacher built from its config, and a Bamba export keeps the student's."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    import cald_scale  # noqa: F401
    from cald_scale.conversion.teacher import TeacherConfig, load_teacher
    from cald_scale.export.bamba import to_bamba

    teacher_dir = tmp_path / "instruct"
    shutil.copytree(folders["teacher"], teacher_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=[0, 7, 9]).save_pretrained(teacher_dir)
    teacher, _, source = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    assert source.generation_config().eos_token_id == teacher.generation_config.eos_token_id == [0, 7, 9]
    student = AutoModelForCausalLM.from_pretrained(folders["student"])
    student.generation_config = source.generation_config()
    assert to_bamba(student).generation_config.eos_token_id == [0, 7, 9]


def test_a_student_folder_without_its_tokenizer_is_named(folders, tmp_path, capsys):
    """helper-77: a student copied without its tokenizer files drew transformers' advice to
    install sentencepiece or tiktoken; the message names the folder and the files."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folders["student"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt"))
    assert main(["generate", str(bare), "--prompt", "To be", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cald-scale")]
    assert len(errors) == 1 and f"{bare} holds no tokenizer" in errors[0] and "Traceback" not in err, err[-2000:]
