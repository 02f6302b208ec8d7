"""`cald-scale evaluate`: teacher and student perplexity on the same tokens, run in-process
on a tiny teacher and its converted student (CPU, no hub)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tiny_models import save_tiny_teacher, train_tokenizer
from transformers import AutoModelForCausalLM

from cald_scale import evaluate as evaluate_module
from cald_scale.cli import main
from cald_scale.conversion.modeling import ConversionConfig
from cald_scale.conversion.surgery import convert_teacher
from cald_scale.conversion.teacher import TeacherConfig, load_teacher
from cald_scale.data import BUILTIN_CORPORA, DataConfig, PackedSequences, build_indexed_dataset, held_out_sequences
from cald_scale.distill.stages import LayerwiseModel
from cald_scale.eval.perplexity import perplexity

SEQ_LEN, NUM_SEQUENCES, BATCH = 32, 4, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher folder, student folder, text file, tokenizer): a 2-layer llama teacher, its
    Mamba2 student exported like a run's, and a few Shakespeare works as one .txt file."""
    root = tmp_path_factory.mktemp("evaluate")
    works = BUILTIN_CORPORA["shakespeare"].load()[:3]
    tokenizer = train_tokenizer(works[:2], vocab_size=400)
    teacher_dir = save_tiny_teacher(root / "teacher", "llama", tokenizer, layers=2)
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    student = convert_teacher(teacher, ConversionConfig(), teacher_name_or_path=str(teacher_dir))
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    text = root / "plays.txt"
    text.write_text("\n\n".join(work[:20000] for work in works))
    return teacher_dir, root / "student", str(text), tokenizer


def _direct_ppl(model, corpus: str, tokenizer, data: DataConfig) -> dict:
    sequences = held_out_sequences(corpus, tokenizer, data, max_tokens=NUM_SEQUENCES * SEQ_LEN, is_rank0=True)
    return perplexity(LayerwiseModel(model), sequences, list(range(NUM_SEQUENCES)), BATCH, torch.device("cpu"))


def _hf_ppl(model, corpus: str, tokenizer, data: DataConfig) -> float:
    """The oracle outside our scoring: exp of transformers' own mean next-token loss over the same sequences."""
    sequences = held_out_sequences(corpus, tokenizer, data, max_tokens=NUM_SEQUENCES * SEQ_LEN, is_rank0=True)
    batch = torch.stack([sequences[i]["input_ids"] for i in range(NUM_SEQUENCES)])
    with torch.no_grad():
        return math.exp(model(input_ids=batch, labels=batch).loss.item())


def _options(out) -> list[str]:
    return ["--max_sequences", str(NUM_SEQUENCES), "--seq_len", str(SEQ_LEN), "--batch_size", str(BATCH), "--json", str(out)]


def test_student_folder_scores_teacher_and_student_on_the_same_tokens(models, tmp_path, monkeypatch, capsys):
    teacher_dir, student_dir, text, tokenizer = models
    monkeypatch.chdir(tmp_path)  # the default data.cache_dir is relative
    out = tmp_path / "ppl.json"
    assert main(["evaluate", str(student_dir), "--corpus", text, "--corpus", text, *_options(out)]) == 0

    result = json.loads(out.read_text())
    assert (result["teacher"], result["seq_len"]) == (str(teacher_dir), SEQ_LEN)
    [row] = result["results"]  # a repeated corpus is scored once
    assert row["corpus"] == text and row["sequences"] == NUM_SEQUENCES
    assert row["tokens"] == row["teacher"]["tokens"] == row["student"]["tokens"] == NUM_SEQUENCES * (SEQ_LEN - 1)

    data = DataConfig(seq_len=SEQ_LEN)
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    assert row["teacher"]["ppl"] == pytest.approx(_direct_ppl(teacher, text, tokenizer, data)["ppl"], rel=1e-6)
    assert row["teacher"]["ppl"] == pytest.approx(_hf_ppl(teacher.eval(), text, tokenizer, data), rel=1e-4)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    assert row["student"]["ppl"] == pytest.approx(_hf_ppl(student, text, tokenizer, data), rel=1e-4)
    assert row["student"]["ppl"] != pytest.approx(row["teacher"]["ppl"], rel=1e-3)
    assert row["ratio"] == pytest.approx(row["student"]["ppl"] / row["teacher"]["ppl"])

    table = capsys.readouterr().out.splitlines()
    assert [cell.strip() for cell in table[0].split("|")] == ["corpus", "tokens", "teacher ppl", "student ppl", "ratio"]
    assert table[1].startswith(text) and f"{row['ratio']:.3f}" in table[1]


def test_run_folder_defaults_to_its_own_eval_split(models, tmp_path):
    teacher_dir, student_dir, text, tokenizer = models
    run = tmp_path / "runs" / "r1"
    shutil.copytree(student_dir, run / "student")
    data = {"corpus": text, "seq_len": SEQ_LEN, "eval_fraction": 0.2, "txt_document_chars": 8192, "cache_dir": str(tmp_path / "cache")}
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}, "data": data, "eval": {"micro_batch_size": BATCH}}))
    out = tmp_path / "ppl.json"
    assert main(["evaluate", str(run), "--max_sequences", str(NUM_SEQUENCES), "--json", str(out)]) == 0

    [row] = json.loads(out.read_text())["results"]
    assert row["corpus"] == text
    student = evaluate_module.AutoModelForCausalLM.from_pretrained(student_dir)
    expected = _direct_ppl(student, text, tokenizer, DataConfig(**data))
    assert row["student"] == pytest.approx(expected, rel=1e-6)  # the run's eval split, seq_len and batch

    # The run's own student/ folder is scored as the run is (its split, not the defaults', which
    # may hold documents the run trained on).
    assert main(["evaluate", str(run / "student"), "--max_sequences", str(NUM_SEQUENCES), "--json", str(out)]) == 0
    [via_student] = json.loads(out.read_text())["results"]
    assert via_student["student"] == row["student"] and via_student["corpus"] == text

    # --no_teacher: the student alone, through `python -m cald_scale.evaluate`'s main
    assert evaluate_module.main([str(run), "--no_teacher", "--max_sequences", "2", "--json", str(out)]) == 0
    [alone] = json.loads(out.read_text())["results"]
    assert alone["teacher"] is None and alone["ratio"] is None and alone["tokens"] == 2 * (SEQ_LEN - 1)


def test_a_run_whose_corpus_changed_since_is_not_scored_on_a_new_split(models, tmp_path, capsys):
    """The run's data.json records its held-out split; a corpus changed since (text appended) is
    split anew, with documents the run trained on among the new "held-out" ones: evaluate scored
    them without a word, as resuming the run refuses. Another corpus is still scored."""
    teacher_dir, student_dir, text, tokenizer = models
    corpus = tmp_path / "plays.txt"
    shutil.copy(text, corpus)
    run = tmp_path / "runs" / "r2"
    shutil.copytree(student_dir, run / "student")
    data = {"corpus": str(corpus), "seq_len": SEQ_LEN, "eval_fraction": 0.2, "txt_document_chars": 8192, "cache_dir": str(tmp_path / "cache")}
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}, "data": data, "eval": {"micro_batch_size": BATCH}}))
    def record(run, data):  # what training writes: the identity of the run's own held-out split
        split = PackedSequences(build_indexed_dataset(DataConfig(**data), tokenizer, is_rank0=True), "eval", SEQ_LEN)
        (run / "data.json").write_text(json.dumps({"train": {}, "heldout": split.identity}))

    record(run, data)
    out = tmp_path / "ppl.json"
    assert main(["evaluate", str(run), "--max_sequences", str(NUM_SEQUENCES), "--json", str(out)]) == 0
    # A run held out a whole other corpus (data.eval_corpus): scored on a few sequences of it, the
    # split is still the run's (evaluate once tokenised it to its own cap and refused it as changed).
    apart = tmp_path / "apart.txt"
    apart.write_text("Another play, held out whole. " * 3000)
    other_run = tmp_path / "runs" / "r3"
    shutil.copytree(student_dir, other_run / "student")
    other = {**data, "eval_corpus": str(apart)}
    (other_run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}, "data": other, "eval": {"micro_batch_size": BATCH}}))
    record(other_run, other)
    assert main(["evaluate", str(other_run), "--no_teacher", "--max_sequences", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["corpus"] == str(apart)

    corpus.write_text(corpus.read_text() + "\n\n" + "Enter a new scene, with new words. " * 2000)
    assert main(["evaluate", str(run), "--max_sequences", str(NUM_SEQUENCES), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the held-out split of {str(corpus)!r} is not the one run {run} kept apart" in err and "Restore the corpus" in err
    assert main(["evaluate", str(run), "--corpus", text, "--max_sequences", str(NUM_SEQUENCES), "--json", str(out)]) == 0


def test_errors_are_one_line_with_status_2(models, tmp_path, capsys, monkeypatch):
    _, student_dir, _, _ = models
    monkeypatch.chdir(tmp_path)  # the default data.cache_dir is relative
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"teacher": {}, "data": {}}))
    short = tmp_path / "short.txt"
    short.write_text("A few words of text.\n")
    cases = [
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(tmp_path / "unfinished")], "has no student/"),
        ([str(student_dir), "--corpus", "shakspeare"], "unknown corpus 'shakspeare'"),
        # the command's own option is named, not the training job's data.seq_len
        ([str(student_dir), "--corpus", str(short), "--no_teacher"], "use a smaller --seq_len"),
    ]
    # A teacher that tokenises otherwise, the student itself, weights that do not fit their config.
    other = save_tiny_teacher(tmp_path / "other_teacher", "llama", train_tokenizer(["other words entirely"] * 50, vocab_size=300), layers=2)
    teacher_dir = models[0]
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    cases += [
        ([str(student_dir), "--teacher", str(other)], "tokenises differently from the student"),
        ([str(student_dir), "--teacher", str(student_dir)], "is a converted student, not a teacher"),
        ([str(student_dir), "--teacher", str(broken)], "missing"),
        ([str(student_dir), "--json", str(tmp_path)], "is a folder: name the file to write"),
    ]
    capsys.readouterr()  # the set-up's own output
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 2
        # (a first tokenisation may show `datasets`' progress bars above the error)
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "examples/s]" not in line]
        assert len(err) == 1 and err[0].startswith("cald-scale evaluate: error:") and message in err[0]


def test_a_context_beyond_the_teachers_positions_is_refused_for_it_alone(models, tmp_path, capsys):
    """The tiny teacher has 512 positions: scoring 600-token sequences is refused for it (one line
    naming the limit and the way out); the student of mixers alone scores them."""
    teacher_dir, student_dir, text, _ = models
    long = ["--corpus", text, "--seq_len", "600", "--max_sequences", "1"]
    assert main(["evaluate", str(student_dir), *long]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the teacher's max_position_embeddings (512)" in err[0] and "--no_teacher" in err[0]
    out = tmp_path / "alone.json"
    assert main(["evaluate", str(student_dir), *long, "--no_teacher", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["teacher"] is None and row["tokens"] == 599 and row["student"]["ppl"] > 1


def test_a_classifier_is_refused_in_one_line(tmp_path):
    from cald_scale.evaluate import resolve_target

    (tmp_path / "config.json").write_text('{"model_type": "cald_classifier"}')
    with pytest.raises(ValueError, match="is a sequence classifier: `cald-scale evaluate` works on causal LMs"):
        resolve_target(tmp_path)


def test_the_student_is_scored_in_the_runs_dtype_with_or_without_its_teacher(models, tmp_path):
    """A bf16 run's student is scored in bf16 alone too (its perplexity must not depend on
    --no_teacher); --teacher NAME drops the run's GGUF file name, which belonged to the old path."""
    from cald_scale.evaluate import resolve_target

    teacher_dir, student_dir, _, _ = models
    run = tmp_path / "run"
    shutil.copytree(student_dir, run / "student")
    teacher = {"name_or_path": "some/gguf_folder", "gguf_file": "model.Q8_0.gguf", "dtype": "bfloat16"}
    (run / "config.json").write_text(json.dumps({"teacher": teacher, "data": {}}))
    assert resolve_target(run).dtype == resolve_target(run, no_teacher=True).dtype == "bfloat16"
    assert evaluate_module._load_student(resolve_target(run, no_teacher=True)).dtype == torch.bfloat16
    overridden = resolve_target(run, teacher=str(teacher_dir)).teacher
    assert (overridden.name_or_path, overridden.gguf_file, overridden.dtype) == (str(teacher_dir), None, "bfloat16")
    with pytest.raises(ValueError, match="--teacher .* and --no_teacher contradict each other"):
        resolve_target(run, teacher=str(teacher_dir), no_teacher=True)
    assert resolve_target(student_dir, no_teacher=True).dtype == "float32"  # an exported student alone
    # The run's held-out count too, so the command repeats the run's own scores by default.
    (run / "config.json").write_text(json.dumps({"teacher": {**teacher, "dtype": "auto"}, "data": {}, "eval": {"max_sequences": 4}}))
    assert (resolve_target(run).max_sequences, resolve_target(run).dtype) == (4, "float32")  # "auto" outside training: float32
    assert resolve_target(student_dir, no_teacher=True).max_sequences == 32


@pytest.mark.parametrize("text", ["nan", "-1", "0", "1.5", "inf"])
def test_limit_refuses_what_is_no_count_or_fraction(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="whole number of docs or a fraction"):
        evaluate_module._limit(text)


def test_report_headline_shows_every_eval_set_at_four_significant_digits():
    """The run report's rows for the other eval sets read like its held-out rows ("n/a" for no teacher)."""
    from cald_scale.eval.report import format_cell
    from cald_scale.tasks.lm import LanguageModelingTask

    scores = lambda ppl: {"heldout": {"ppl": ppl, "tokens": 10}, "wiki": {"ppl": 10 * ppl, "tokens": 10}}  # noqa: E731
    guided = dict(LanguageModelingTask.summary(scores(17.895116014129723), scores(3.917e4), scores(58.12), None)["headline"])
    assert format_cell(guided["wiki ppl: teacher / student"]) == "179.0 / 581.2"  # the same digits on both sides
    assert format_cell(guided["held-out ppl: converted student, before training"]) == "3.917e+04"
    unguided = dict(LanguageModelingTask.summary(None, scores(3.917e4), scores(58.12), None)["headline"])
    assert format_cell(unguided["wiki ppl: teacher / student"]) == "n/a / 581.2"


def test_a_diverged_student_has_no_improvement_and_the_report_stays_strict_json(tmp_path):
    """A NaN perplexity after training was reported as an infinite improvement, and report.json
    held the non-standard NaN (jq and strict readers refuse the file)."""
    from cald_scale.eval.report import format_cell, write_report
    from cald_scale.tasks.lm import LanguageModelingTask

    scores = lambda ppl: {"heldout": {"ppl": ppl, "tokens": 10}}  # noqa: E731
    diverged = LanguageModelingTask.summary(scores(17.9), scores(3.917e4), scores(float("nan")), None)
    assert diverged["ppl_improvement_x"] is None and dict(diverged["headline"])["improvement (before / after)"] is None
    assert LanguageModelingTask.summary(scores(17.9), scores(3.917e4), scores(39.17), None)["ppl_improvement_x"] == pytest.approx(1000.0)
    report = {
        "teacher": "t", "teacher_source": "s", "mixer": "mamba2", "steps": 2, "tokens_seen": 10, "train_tokens_per_s": 1.0, "train_seconds": 10.0,
        "wall_seconds_this_session": 30.0, "nan_skipped": 0, "world_size": 2, "student_dir": "x", "memory": {"cpu_max_rss_bytes": 2**30},
        "peak_memory": {"cpu_max_rss_bytes": 3 * 2**30}, **diverged, "scored_in": {"starting_point": "float32", "end": "bfloat16"},
    }
    write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert saved["ppl_student_after"] is None and saved["ppl_improvement_x"] is None
    table = (tmp_path / "report.md").read_text()
    assert "| peak RSS, largest rank, all sessions (GiB) | 3.000 |" in table and "| training seconds (all sessions) | 10.00 |" in table
    assert format_cell(1000.0) == "1,000" and format_cell((17.9, 47.93)) == "17.90 / 47.93" and format_cell(2.5e6) == "2,500,000"
    assert "| precision scored in: starting point / end | float32 / bfloat16 |" in table


def test_held_out_shards_score_the_same_sequences_on_any_number_of_ranks(models):
    """The default 32 sequences on 64 ranks (it was an error), 7 on 2: equal-length shards whose
    real entries are every sequence once; a padding entry runs a forward that counts for nothing."""
    from cald_scale.eval.perplexity import PAD, eval_indices

    for total, world in ((32, 64), (7, 2), (8, 2), (5, 1), (32, 12), (9, 8)):
        shards = [eval_indices(100, total, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert sorted(i for s in shards for i in s if i != PAD) == list(range(total))
        if total >= world:  # every rank a real row (pipeline replicas need one each)
            assert all(any(i != PAD for i in s) for s in shards), (total, world, shards)
    with pytest.raises(ValueError, match="nothing to score"):
        eval_indices(0, 32, 0, 2)
    # Padded rows are run and dropped: the score is that of the real rows alone.
    teacher_dir, _, text, tokenizer = models
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    data = DataConfig(corpus=text, seq_len=SEQ_LEN)
    sequences = held_out_sequences(text, tokenizer, data, max_tokens=NUM_SEQUENCES * SEQ_LEN, is_rank0=True)
    model = LayerwiseModel(teacher)
    plain = perplexity(model, sequences, [0, 1, 2], BATCH, torch.device("cpu"))
    padded = perplexity(model, sequences, [0, 1, 2, PAD], BATCH, torch.device("cpu"))
    assert padded == pytest.approx(plain, rel=1e-12) and plain["tokens"] == 3 * (SEQ_LEN - 1)


def test_perplexity_scores_with_dropout_off_and_restores_the_training_mode(models):
    """A student scored during training is in training mode: its perplexity must be the one
    `cald-scale evaluate` gives (dropout off), the same at every call, and training goes on
    in training mode after it."""
    teacher_dir, _, text, tokenizer = models
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    teacher.config.attention_dropout = 0.5  # a teacher config with dropout (GPT-2, OPT and fine-tuned ones have it)
    for layer in teacher.model.layers:
        layer.self_attn.attention_dropout = 0.5
    data = DataConfig(corpus=text, seq_len=SEQ_LEN)
    sequences = held_out_sequences(text, tokenizer, data, max_tokens=NUM_SEQUENCES * SEQ_LEN, is_rank0=True)
    model = LayerwiseModel(teacher.train())
    with torch.no_grad():  # the dropout is real: a training-mode forward differs from call to call
        ids = sequences[0]["input_ids"][None]
        assert not torch.equal(model.logits(ids), model.logits(ids))
    scores = [perplexity(model, sequences, list(range(NUM_SEQUENCES)), BATCH, torch.device("cpu"))["ppl"] for _ in range(2)]
    assert teacher.training  # restored
    expected = perplexity(LayerwiseModel(teacher.eval()), sequences, list(range(NUM_SEQUENCES)), BATCH, torch.device("cpu"))["ppl"]
    assert scores == [expected, expected]


def test_perplexity_takes_the_logits_a_chunk_at_a_time_and_matches_whole_logits(models):
    """Eval never holds b x l x vocab logits (with a 150k vocabulary they dwarf the batch), and
    chunking changes nothing: each next token's NLL equals the CE of the whole logits."""
    from cald_scale.distill.losses import lm_cross_entropy, next_token_nll

    teacher_dir, _, _, _ = models
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    model = LayerwiseModel(teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = lm_cross_entropy(model.logits(ids), ids, reduction="none").view(3, 16)
        hidden = model.last_hidden(ids)
        seen = []
        head = lambda h: (seen.append(h.shape[0]), model.head(h))[1]  # noqa: E731
        chunked = next_token_nll(hidden, ids, head, chunk_tokens=5)
    assert max(seen) == 5 and sum(seen) == 3 * 17
    torch.testing.assert_close(chunked[:, :-1], whole, rtol=1e-5, atol=1e-6)
    assert torch.all(chunked[:, -1] == 0)  # the last position predicts nothing
    torch.testing.assert_close(model.next_token_nll(ids), chunked, rtol=1e-5, atol=1e-6)  # the linear-head path


def test_eval_takes_the_runs_head_chunk_tokens(models, tmp_path):
    """loss.head_chunk_tokens, which a user lowers when a chunk of logits does not fit, holds for
    evaluation too (during training, and for `cald-scale evaluate` of the run's student)."""
    from cald_scale.distill.losses import LossConfig
    from cald_scale.evaluate import resolve_target

    teacher_dir, student_dir, _, _ = models
    teacher, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)))
    seen = []

    class Spied(LayerwiseModel):
        head_weight = None  # the path that calls the head module on each chunk

        def head(self, hidden):
            seen.append(hidden.shape[0])
            return super().head(hidden)

    ids = torch.randint(0, teacher.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    assert LayerwiseModel(teacher).chunk_tokens == LossConfig().chunk_tokens(teacher.config.vocab_size)
    nll = Spied(teacher, head_chunk_tokens=7).next_token_nll(ids)
    assert seen == [7] * 7 + [2]
    torch.testing.assert_close(nll, LayerwiseModel(teacher).next_token_nll(ids), rtol=1e-5, atol=1e-6)
    run = tmp_path / "run"
    shutil.copytree(student_dir, run / "student")
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}, "data": {}, "loss": {"head_chunk_tokens": 7}}))
    assert resolve_target(run).head_chunk_tokens == 7
    assert resolve_target(student_dir, no_teacher=True).head_chunk_tokens is None


def test_a_student_records_its_local_teacher_absolute(models, monkeypatch):
    """`convert_teacher(teacher, conv, "teacher")` recorded "teacher" as given; evaluate started
    in another folder then scored against whatever "teacher" named there (helper-90)."""
    from tiny_models import tiny_teacher

    teacher_dir = models[0]
    monkeypatch.chdir(teacher_dir.parent)
    student = convert_teacher(tiny_teacher("llama", layers=1), ConversionConfig(), teacher_name_or_path=teacher_dir.name)
    assert student.config.teacher_name_or_path == str(teacher_dir)
    hub = convert_teacher(tiny_teacher("llama", layers=1), ConversionConfig(), teacher_name_or_path="someone/not-here")
    assert hub.config.teacher_name_or_path == "someone/not-here"  # a hub id stays one


def test_a_bamba_export_is_scored_beside_its_teacher_as_its_student_is(models, tmp_path, monkeypatch):
    """A Bamba export names its teacher as the student does and scores its perplexity (whole, not
    block by block: no family adapter describes Bamba); inside a run, on the run's own split. The
    same weights: the student's numbers."""
    from cald_scale.export.bamba import export_bamba

    teacher_dir, student_dir, text, tokenizer = models
    monkeypatch.chdir(tmp_path)
    bamba = export_bamba(student_dir, tmp_path / "bamba")
    scores = {}
    for name, folder in (("student", student_dir), ("bamba", bamba)):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", str(folder), "--corpus", text, *_options(out)]) == 0
        result = json.loads(out.read_text())
        assert result["teacher"] == str(teacher_dir)
        [scores[name]] = result["results"]
    assert scores["bamba"]["student"]["tokens"] == scores["student"]["student"]["tokens"] == NUM_SEQUENCES * (SEQ_LEN - 1)
    assert scores["bamba"]["student"]["ppl"] == pytest.approx(scores["student"]["student"]["ppl"], rel=1e-5)
    assert scores["bamba"]["teacher"] == scores["student"]["teacher"]

    # A run's bamba/ (output.export_bamba): scored as the run and its student/ are.
    run = tmp_path / "runs" / "r1"
    shutil.copytree(student_dir, run / "student")
    shutil.copytree(bamba, run / "bamba")
    data = {"corpus": text, "seq_len": SEQ_LEN, "eval_fraction": 0.2, "txt_document_chars": 8192, "cache_dir": str(tmp_path / "cache")}
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}, "data": data, "eval": {"micro_batch_size": BATCH}}))
    by_folder = {}
    for folder in (run, run / "bamba"):
        out = tmp_path / "in_run.json"
        assert main(["evaluate", str(folder), "--max_sequences", str(NUM_SEQUENCES), "--no_teacher", "--json", str(out)]) == 0
        [by_folder[folder.name]] = json.loads(out.read_text())["results"]
    assert by_folder["bamba"]["corpus"] == by_folder["r1"]["corpus"] == text
    assert by_folder["bamba"]["student"]["ppl"] == pytest.approx(by_folder["r1"]["student"]["ppl"], rel=1e-5)


def test_a_bamba_export_that_names_no_teacher_says_what_to_pass(models, tmp_path, capsys):
    """Exports from before Bamba folders recorded their teacher."""
    from cald_scale.export.bamba import export_bamba

    bamba = export_bamba(models[1], tmp_path / "bamba")
    config = json.loads((bamba / "config.json").read_text())
    del config["teacher_name_or_path"]
    (bamba / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["evaluate", str(bamba), "--corpus", models[2]]) == 2
    err = capsys.readouterr().err
    assert f"bamba model {bamba} does not name its teacher (teacher_name_or_path) (exported before Bamba folders recorded it): pass --teacher NAME_OR_PATH or --no_teacher" in err
    assert "Traceback" not in err
