# Labelled text for sequence classification (the encoder track's task): a built-in dataset
# or local files -> cleaned, de-duplicated, label-stratified fixed splits, cached once.
"""Where the encoder track's (text, label) examples come from and how they are split.

Every split is a pure function of the data's CONTENT and a few settings: rows are cleaned
(empty texts and missing labels skipped and counted), de-duplicated (identical texts never
sit in two splits), and splits the data does not bring as files are carved from train per
class, in the order of a seeded SHA-256 of each text. Nothing depends on file order, dict
or set order, numpy's generators or a library version, so the splits are the same on every
machine. The result is cached as one JSON file named by the content identity; the label
vocabulary is the sorted labels of the train split, saved with it, so label ids never move.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cald_scale.data.classification_sources import (
    BUILTIN_CLASSIFICATION,
    SPLITS,
    Label,
    Row,
    Source,
    columns_of,
    count,
    read_rows,
    resolve_sources,
    source_identity,
)
from cald_scale.engines.preemption import raise_if_preempted
from cald_scale.fileio import atomic_write_text, file_lock, work_cache_dir

__all__ = [
    "BUILTIN_CLASSIFICATION",
    "ClassificationData",
    "ClassificationDataConfig",
    "ClassificationSplit",
    "load_classification_data",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: copies of a text (case, links, "RT @user:") are one text
"""Bump when cleaning, de-duplication or splitting changes: old caches then get a new key."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ClassificationDataConfig:
    """Labelled examples for sequence classification and how they are split and capped.

    The splits (after cleaning and de-duplication) are cached under `cache_dir`, keyed by
    the content of the data files and the settings that decide the splits; `max_length`
    and `max_train_examples` act when the cache is read, so changing them reuses it.
    """

    dataset: str | None = "wiki_topic"
    """What to read. A built-in dataset ("wiki_topic": 12 topics of Wikipedia leads;
    "tweet_sentiment": 3-way tweet sentiment); or local .csv / .tsv / .json / .jsonl /
    .parquet file(s) as a path, glob, comma-separated list or folder. Files named for a
    split (train*, validation* / valid* / val* / dev*, test*) are that split; otherwise all
    files are the train pool. null when `train` names the files instead."""

    train: str | None = None
    """Explicit train file(s) (path, glob, list or folder); replaces `dataset`, which must
    then be null."""

    validation: str | None = None
    """Explicit validation file(s). Unset: carved from train by `validation_fraction`."""

    test: str | None = None
    """Explicit test file(s). Unset: carved from train by `test_fraction`."""

    text_column: str | None = None
    """Column holding the text. null: the built-in's own ("extract" for wiki_topic, "text"
    for tweet_sentiment); required for files."""

    label_column: str | None = None
    """Column holding the label (strings or integers). null: the built-in's own ("topic",
    "sentiment"); required for files."""

    text_pair_column: str | None = None
    """Optional second text (sentence-pair tasks), e.g. "title" for wiki_topic; tokenised as
    the pair's second segment and part of the de-duplication key."""

    max_length: int = 128
    """Tokens per example after truncation (special tokens included); batches pad to their
    longest example, not to this."""

    validation_fraction: float = 0.1
    """Share of each class carved from train into validation when no validation files are
    given (then > 0: a classification run scores validation and test; 0 carves none)."""

    test_fraction: float = 0.1
    """Share of each class carved from train into test when no test files are given (then
    > 0, as for validation)."""

    seed: int = 0
    """Salt of the per-text hash that orders each class before the carve (and picks the
    `max_train_examples` subset). Not the training seed: fixed, so splits never change
    between runs."""

    unknown_labels: Literal["error", "skip"] = "error"
    """Validation / test examples whose label never occurs in train: "error" names them,
    "skip" drops them and counts them in the stats."""

    max_train_examples: int | None = None
    """Cap on train examples for quick runs (None: all), taken per class in proportion to
    its size (largest remainder), so the subset stays stratified."""

    max_eval_examples: int | None = None
    """Cap on validation and on test examples (None: all, the default: results quote whole
    splits), stratified like `max_train_examples`; for CI-sized checks only."""

    cache_dir: str | None = None
    """Folder holding the cached splits (one JSON file per key) and `datasets`' own cache.
    None: ``$CALD_SCALE_CACHE/classification`` when that is set, else
    ``.cache/cald_scale/classification`` under the working folder."""

    def __post_init__(self) -> None:
        for name in ("dataset", "train", "validation", "test", "text_column", "label_column", "text_pair_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"classification.{name} must be null or a non-empty string, got {value!r}")
        if (self.dataset is None) == (self.train is None):
            raise ValueError(
                "set exactly one of classification.dataset and classification.train "
                f"(got dataset={self.dataset!r}, train={self.train!r}); to use explicit split "
                "files set dataset: null"
            )
        bare = self.dataset is not None and not any(c in self.dataset for c in "/.*?[~") and not os.path.exists(self.dataset)
        if bare and self.dataset not in BUILTIN_CLASSIFICATION:  # a name, not a path: a built-in misspelt
            close = difflib.get_close_matches(self.dataset.lower(), BUILTIN_CLASSIFICATION, n=1, cutoff=0.6)
            raise ValueError(
                f"classification.dataset={self.dataset!r} is neither a built-in dataset ({', '.join(sorted(BUILTIN_CLASSIFICATION))}) "
                f"nor an existing file or folder" + (f": did you mean {close[0]}?" if close else "")
            )
        if self.train is not None or self.dataset not in BUILTIN_CLASSIFICATION:
            missing = [n for n in ("text_column", "label_column") if getattr(self, n) is None]
            if missing:
                raise ValueError(
                    f"classification.{' and classification.'.join(missing)} must be set for data "
                    f"files (built-in datasets {sorted(BUILTIN_CLASSIFICATION)} have defaults)"
                )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"classification.max_length must be an int >= 2, got {self.max_length!r}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"classification.{name} must be a number in [0, 1), got {value!r}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"classification.validation_fraction + test_fraction must be < 1, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"classification.seed must be an int >= 0, got {self.seed!r}")
        if self.unknown_labels not in ("error", "skip"):
            raise ValueError(f"classification.unknown_labels must be 'error' or 'skip', got {self.unknown_labels!r}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"classification.{name} must be null or an int >= 1, got {value!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"classification.cache_dir must be null or a non-empty path, got {self.cache_dir!r}")
        self.cache_dir = work_cache_dir(self.cache_dir, "classification")


# ---------------------------------------------------------------------------------------
# De-duplication and splitting (content-addressed, so independent of row order)
# ---------------------------------------------------------------------------------------


def _dedup_key(text: str, pair: str | None) -> str:
    # NOTE: whitespace-normalised, so texts that differ only in spacing count as one. A row's
    # identity: its hash places it in a carved split and orders its split.
    key = " ".join(text.split())
    return key if pair is None else key + "\x1f" + " ".join(pair.split())


_LINK = re.compile(r"https?://\S*")
_RETWEET = re.compile(r"^RT @\w+:\s*")


def _copy_key(text: str, pair: str | None) -> str:
    """What copies of one text share however they were posted: spacing, case, links (a t.co
    link cut at another length) and a retweet's leading "RT @user:" aside. Copies must fall in
    one split: a retweet in test of a tweet in train is no held-out text."""

    def plain(t: str) -> str:
        spaced = " ".join(t.split())
        return " ".join(_RETWEET.sub("", _LINK.sub("", spaced)).split()).casefold() or spaced  # a link alone stays itself

    return plain(text) if pair is None else plain(text) + "\x1f" + plain(pair)


def _dedupe(rows: list[Row], split: str, stats: dict[str, int]) -> dict[str, Row]:
    """One row per text and its copies (``_copy_key``): copies with the same label collapse to
    one, texts seen with different labels are dropped altogether (no right answer to learn).
    The row kept is keyed by its own ``_dedup_key``."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(_copy_key(row[0], row[1]), []).append(row)
    kept: dict[str, Row] = {}
    for group in groups.values():
        if len({label for _, _, label in group}) > 1:
            count(stats, f"{split}_skipped_conflicting_label", len(group))
            continue
        if len(group) > 1:
            count(stats, f"{split}_skipped_duplicate", len(group) - 1)
        # NOTE: min over the copies: order-independent.
        row = min(group, key=lambda row: (row[0], row[1] or ""))
        kept[_dedup_key(row[0], row[1])] = row
    return kept


def _hash_order(keys: Sequence[str], seed: int) -> list[str]:
    """`keys` sorted by a seeded SHA-256: a shuffle that is the same on every machine."""
    salt = f"{seed}\x00".encode()
    return sorted(keys, key=lambda key: hashlib.sha256(salt + key.encode("utf-8")).digest())


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _carve(train: dict[str, Row], fractions: dict[str, float], seed: int) -> dict[str, dict[str, Row]]:
    """Carve held-out splits off `train`, per class: each class in hash order gives its
    first round(n * fraction) texts to each split in `fractions` (in order), always
    leaving at least one text of every class in train."""
    by_class: dict[Label, list[str]] = {}
    for key, (_, _, label) in train.items():
        by_class.setdefault(label, []).append(key)
    carved: dict[str, dict[str, Row]] = {split: {} for split in fractions}
    for label in sorted(by_class):
        keys = _hash_order(by_class[label], seed)
        sizes = {split: _round_half_up(len(keys) * f) for split, f in fractions.items()}
        for split in reversed(list(sizes)):  # trim the last-named split first
            excess = sum(sizes.values()) - (len(keys) - 1)
            if excess > 0:
                sizes[split] -= min(excess, sizes[split])
        start = 0
        for split, size in sizes.items():
            for key in keys[start : start + size]:
                carved[split][key] = train.pop(key)
            start += size
    return carved


# ---------------------------------------------------------------------------------------
# The dataset, its cache and its train cap
# ---------------------------------------------------------------------------------------


@dataclass
class ClassificationSplit:
    """One split: texts (and pairs) with integer label ids into `ClassificationData.labels`."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray
    """(n,) int64 label ids."""

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self, num_labels: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ClassificationSplit:
        idx = [int(i) for i in indices]
        pairs = [self.text_pairs[i] for i in idx] if self.text_pairs is not None else None
        return ClassificationSplit([self.texts[i] for i in idx], pairs, self.labels[idx])


@dataclass
class ClassificationData:
    """The splits of a classification dataset, its label vocabulary and what was skipped."""

    name: str
    labels: list[Label]
    """Label vocabulary: the sorted labels of the train split; label id i is labels[i]."""
    splits: dict[str, ClassificationSplit]
    """"train" always; "validation" / "test" unless their fraction is 0 and no files give them."""
    stats: dict[str, int]
    """Counts to log: rows read, skipped (empty text, missing / unknown label, duplicate,
    conflicting label, cross-split duplicate, max_train_examples), examples per split."""
    key: str
    """Cache key: changes whenever the data or a split setting changes."""

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label_names(self) -> list[str]:
        """The labels as strings (for a model config's id2label)."""
        return [str(label) for label in self.labels]

    def __getitem__(self, split: str) -> ClassificationSplit:
        if split not in self.splits:
            raise KeyError(f"dataset {self.name!r} has no {split!r} split; it has {list(self.splits)}")
        return self.splits[split]


def _cache_key(cfg: ClassificationDataConfig, sources: dict[str, Source]) -> str:
    carved = {split: getattr(cfg, f"{split}_fraction") for split in ("test", "validation") if split not in sources}
    identity = {
        "format": FORMAT_VERSION,
        "sources": {split: source_identity(source) for split, source in sources.items()},
        "columns": columns_of(cfg),
        "carved": carved,
        "seed": cfg.seed,
        "unknown_labels": cfg.unknown_labels,
    }
    name = cfg.dataset or cfg.train
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.splitext(os.path.basename(name.rstrip("/").split(",")[0]))[0])
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{slug.strip('._')[:40] or 'dataset'}-{digest}"


def _empty_split_error(name: str, split: str, stats: dict[str, int], sources: dict[str, Source], cfg: ClassificationDataConfig) -> ValueError:
    if split in sources:
        causes = {k[len(split) + 1 :]: v for k, v in sorted(stats.items()) if k.startswith(split + "_")}
        return ValueError(
            f"the {split} split of {name!r} ({sources[split].describe()}) is empty after filtering: {causes}"
        )
    return ValueError(
        f"the {split} split carved from train of {name!r} is empty: {stats['num_train_before_carve']} "
        f"train examples with {split}_fraction={getattr(cfg, f'{split}_fraction')} round to 0 in every "
        f"class; use more data, a larger fraction, or {split} files"
    )


def _build(cfg: ClassificationDataConfig, sources: dict[str, Source], key: str) -> dict[str, Any]:
    """Read, clean, de-duplicate and split: the content of the cache file."""
    name = cfg.dataset or cfg.train
    columns = columns_of(cfg)
    stats: dict[str, int] = {}

    # 1. Rows of each split the data brings, de-duplicated within it, then across splits
    #    (a held-out text already in train -- or in validation, for test -- is dropped).
    splits: dict[str, dict[str, Row]] = {}
    for split in SPLITS:
        if split in sources:
            rows = read_rows(sources[split], split, columns, cfg.cache_dir, stats)
            splits[split] = _dedupe(rows, split, stats)
    seen: set[str] = set()
    for split in SPLITS:
        if split not in splits:
            continue
        copies = {k: _copy_key(row[0], row[1]) for k, row in splits[split].items()}
        repeats = [k for k, copy in copies.items() if copy in seen]
        for k in repeats:
            del splits[split][k]
        if repeats:
            count(stats, f"{split}_skipped_cross_split_duplicate", len(repeats))
        seen.update(copies.values())

    # 2. Label types must agree across splits (strings and ints do not sort together).
    kinds = {split: {type(label).__name__ for _, _, label in rows.values()} for split, rows in splits.items()}
    if len(set().union(*kinds.values())) > 1:
        raise ValueError(
            f"labels of {name!r} (column {columns[1]!r}) mix strings and integers: {kinds}; "
            "make the label column one type"
        )

    # 3. Carve the missing held-out splits from train, per class in hash order.
    stats["num_train_before_carve"] = len(splits["train"])
    fractions = {s: getattr(cfg, f"{s}_fraction") for s in ("test", "validation") if s not in splits and getattr(cfg, f"{s}_fraction") > 0}
    splits.update(_carve(splits["train"], fractions, cfg.seed))

    # 4. Label vocabulary from train; held-out labels train never saw are an error or a skip.
    labels = sorted({label for _, _, label in splits["train"].values()})
    if len(labels) < 2:
        raise ValueError(
            f"the train split of {name!r} holds {len(labels)} label(s) ({labels}) in column {columns[1]!r}: a classifier "
            "needs two or more (with one, its loss is zero and every score 100%); check classification.label_column"
        )
    vocab = set(labels)
    for split in ("validation", "test"):
        if split not in splits:
            continue
        unknown = {k: row for k, row in splits[split].items() if row[2] not in vocab}
        if not unknown:
            continue
        if cfg.unknown_labels == "error":
            names = sorted({row[2] for row in unknown.values()})
            raise ValueError(
                f"label(s) {names} occur in the {split} split of {name!r} "
                f"({sources[split].describe() if split in sources else 'carved from train'}; "
                f"{len(unknown)} example(s)) but never in train, so no model trained on it can "
                f"predict them; set classification.unknown_labels: skip to drop those examples"
            )
        for k in unknown:
            del splits[split][k]
        count(stats, f"{split}_skipped_unknown_label", len(unknown))

    # 5. Every split that exists must hold examples.
    for split in SPLITS:
        if split in splits and not splits[split]:
            raise _empty_split_error(name, split, stats, sources, cfg)

    # 6. Each split in hash order (not grouped by class, not in file order).
    ids = {label: i for i, label in enumerate(labels)}
    content: dict[str, Any] = {}
    for split in SPLITS:
        if split not in splits:
            continue
        rows = [splits[split][k] for k in _hash_order(list(splits[split]), cfg.seed)]
        content[split] = {"text": [r[0] for r in rows], "label": [ids[r[2]] for r in rows]}
        if columns[2] is not None:
            content[split]["text_pair"] = [r[1] for r in rows]
        stats[f"num_{split}"] = len(rows)
    stats["num_labels"] = len(labels)
    return {"format": FORMAT_VERSION, "key": key, "name": name, "labels": labels, "stats": stats, "splits": content}


def _cap_split(split: ClassificationSplit, num_labels: int, cap: int) -> ClassificationSplit:
    """At most `cap` examples, per class in proportion (largest remainder; ties to the
    lower label id), each class's first ones in the stored (hash) order."""
    counts = split.class_counts(num_labels)
    if cap >= len(split):
        return split
    exact = counts * cap / len(split)
    quota = np.floor(exact).astype(np.int64)
    remainder_order = sorted(range(num_labels), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in remainder_order[: cap - int(quota.sum())]:
        quota[c] += 1
    taken = np.zeros(num_labels, dtype=np.int64)
    keep = []
    for i, label in enumerate(split.labels):
        if taken[label] < quota[label]:
            taken[label] += 1
            keep.append(i)
    return split.subset(keep)


def load_classification_data(cfg: ClassificationDataConfig) -> ClassificationData:
    """The splits of `cfg`, built once into `cfg.cache_dir/<key>.json` and then read.

    Safe on every rank at once: one process builds under a file lock while the others
    wait, then all read the same file (on nodes without a shared file system each builds
    its own, identical copy). `max_train_examples` is applied after the read.
    """
    sources = resolve_sources(cfg)
    key = _cache_key(cfg, sources)
    path = os.path.join(cfg.cache_dir, f"{key}.json")
    if not os.path.isfile(path):
        with file_lock(os.path.join(cfg.cache_dir, f".{key}.lock"), interrupt=lambda: raise_if_preempted(f"waiting for another process to build {path}")):
            if not os.path.isfile(path):
                content = _build(cfg, sources, key)
                atomic_write_text(path, json.dumps(content), durable=True)
                logger.info("cached classification splits of %r: %s -> %s", content["name"], content["stats"], path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        splits = {
            split: ClassificationSplit(
                texts=part["text"], text_pairs=part.get("text_pair"), labels=np.asarray(part["label"], dtype=np.int64)
            )
            for split, part in content["splits"].items()
        }
        stats = dict(content["stats"])
        labels = content["labels"]
    except (ValueError, KeyError, TypeError) as err:  # written atomically, so damaged after the fact
        raise ValueError(
            f"classification cache {path} is damaged ({type(err).__name__}: {err}); delete it and the next start rebuilds it"
        ) from err
    if cfg.max_train_examples is not None:
        capped = _cap_split(splits["train"], len(labels), cfg.max_train_examples)
        stats["train_skipped_max_train_examples"] = len(splits["train"]) - len(capped)
        stats["num_train"] = len(capped)
        splits["train"] = capped
    if cfg.max_eval_examples is not None:
        for name in ("validation", "test"):
            if name in splits:
                capped = _cap_split(splits[name], len(labels), cfg.max_eval_examples)
                stats[f"{name}_skipped_max_eval_examples"] = len(splits[name]) - len(capped)
                stats[f"num_{name}"] = len(capped)  # as num_train: what is scored
                splits[name] = capped
    return ClassificationData(name=content["name"], labels=labels, splits=splits, stats=stats, key=key)
