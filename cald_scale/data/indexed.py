# Tokenise a corpus ONCE into megatron indexed datasets (train / eval) under a cache key,
# or open a user's existing .bin/.idx prefix read-only; plus a token-stream reader over them.
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import CorpusSource, load_documents, resolve_corpus
from cald_scale.fileio import atomic_write_text, file_lock, fsync_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IndexedCorpus", "TokenStream", "build_indexed_dataset", "cache_key", "held_out_corpus"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the cache layout or tokenisation changes: old caches then get a new key."""

Split = Literal["train", "eval"]

_SPLITS: tuple[Split, ...] = ("eval", "train")  # NOTE: eval first, so caps stop early
_META = "meta.json"
_PARTIAL = ".partial-"
_FAILED = ".failed-"
_DOCS_PER_BATCH = 128
_PART_DOCS = 4096
"""Documents per part of a build: the unit a killed build resumes from."""
_MAX_ID_WINDOWS = 64
_MAX_ID_WINDOW_TOKENS = 16384


def _megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported on first use (megatron.core is slow
    to import, and its import warns about optional Transformer Engine / Apex kernels and
    its own deprecations, none of which concern data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedCorpus:
    """A tokenised corpus: where each split's tokens live and how many there are.

    Each split is the token stream of sequences [first, last) of a megatron indexed dataset
    (documents concatenated, eos-separated when built here), cut to `num_*_tokens`.
    A cache built here has separate train / eval prefixes covering all their sequences;
    a user prefix serves both splits, eval being its last documents; with data.eval_corpus
    the eval split lives in that corpus's own cache or prefix.
    """

    name: str
    """The corpus as configured (data.corpus), for messages."""
    train_prefix: str
    eval_prefix: str
    train_sequences: tuple[int, int]
    """[first, last) sequence indices of the train split inside train_prefix."""
    eval_sequences: tuple[int, int]
    num_train_tokens: int
    num_eval_tokens: int
    num_train_docs: int
    num_eval_docs: int
    max_token_id: int | None
    """Largest token id (None if the corpus is empty)."""
    max_token_id_exact: bool
    """False when max_token_id comes from a sample (a large user prefix)."""
    vocab_size: int | None
    """Size of the tokenizer that produced the tokens (None if unknown)."""
    tokenizer_name: str | None
    meta_path: str | None
    """The cache's meta.json (None for a user prefix)."""
    eval_fraction: float | None = None
    """data.eval_fraction that held the eval documents out of `name`; None when the eval
    split is a whole other corpus (`eval_name`). For messages."""
    eval_name: str | None = None
    """The corpus the eval split comes from when it is not `name` (data.eval_corpus)."""

    def split(self, split: Split) -> tuple[str, tuple[int, int], int]:
        """(prefix, [first, last) sequences, number of tokens) of `split`."""
        if split == "train":
            return self.train_prefix, self.train_sequences, self.num_train_tokens
        if split == "eval":
            return self.eval_prefix, self.eval_sequences, self.num_eval_tokens
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


# ---------------------------------------------------------------------------------------
# Reading: a token stream over a range of sequences
# ---------------------------------------------------------------------------------------


class TokenStream:
    """Tokens [0, num_tokens) of the concatenated sequences [first, last) of an indexed
    dataset (all of them by default), read through memory-mapped `IndexedDataset.get`
    calls; `max_tokens` cuts the stream short.

    NOTE: megatron writes sequence_pointers as cumulative byte offsets (sum of the
    previous lengths x itemsize), and reads them memory-mapped: they ARE the cumulative
    length index, so a token offset maps to (sequence, offset) by a binary search
    without building any array in RAM, even for the 300B-token Pile.
    """

    def __init__(
        self, prefix: str, sequences: tuple[int, int] | None = None, max_tokens: int | None = None
    ):
        self.prefix = prefix
        self._sequences = sequences
        self._max_tokens = max_tokens
        self._open()

    def _open(self) -> None:
        # NOTE: an empty split (eval_fraction=0) has an empty .bin, which cannot be mapped.
        empty = os.path.getsize(self.prefix + ".bin") == 0
        self._ds = None if empty else _megatron_indexed().IndexedDataset(self.prefix, mmap=True)
        if self._ds is None:
            self._first = self._last = self._base = 0
            self.dtype = np.dtype(np.int64)
            self.total_tokens = self.num_tokens = 0
            return
        num_sequences = len(self._ds)
        first, last = self._sequences if self._sequences is not None else (0, num_sequences)
        if not 0 <= first <= last <= num_sequences:
            raise ValueError(
                f"sequences [{first}, {last}) out of range for {self.prefix!r} "
                f"({num_sequences} sequences)"
            )
        self._first, self._last = first, last
        self.dtype = np.dtype(self._ds.index.dtype)
        self._lengths = self._ds.sequence_lengths
        self._pointers = self._ds.index.sequence_pointers
        if first == last:
            self._base, total = 0, 0
        else:
            self._base = int(self._pointers[first])
            end = int(self._pointers[last - 1]) + int(self._lengths[last - 1]) * self.dtype.itemsize
            total = (end - self._base) // self.dtype.itemsize
        self.total_tokens = total
        self.num_tokens = total if self._max_tokens is None else min(total, self._max_tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream (a fresh, writable array)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"tokens [{start}, {start + length}) outside the stream of {self.num_tokens}"
            )
        out = np.empty(length, dtype=self.dtype)
        if length == 0:
            return out
        byte = self._base + start * self.dtype.itemsize
        pointers = self._pointers[self._first : self._last]
        seq = self._first + int(np.searchsorted(pointers, byte, side="right")) - 1
        offset = (byte - int(self._pointers[seq])) // self.dtype.itemsize
        filled = 0
        while filled < length:
            take = min(length - filled, int(self._lengths[seq]) - offset)
            if take > 0:
                out[filled : filled + take] = self._ds.get(seq, offset, take)
                filled += take
            seq, offset = seq + 1, 0
        return out

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: pickle (DataLoader workers) the location only, and re-map it on load.
        return {"prefix": self.prefix, "sequences": self._sequences, "max_tokens": self._max_tokens}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self._sequences = state["sequences"]
        self._max_tokens = state["max_tokens"]
        self._open()


def _max_token_id(stream: TokenStream) -> tuple[int | None, bool]:
    """(largest token id, exact?) of a stream: exact when small, else over evenly spaced
    windows."""
    n = stream.num_tokens
    if n == 0:
        return None, True
    if n <= _MAX_ID_WINDOWS * _MAX_ID_WINDOW_TOKENS:
        return int(stream.read(0, n).max()), True
    starts = np.linspace(0, n - _MAX_ID_WINDOW_TOKENS, _MAX_ID_WINDOWS).astype(np.int64)
    return max(int(stream.read(int(s), _MAX_ID_WINDOW_TOKENS).max()) for s in starts), False


# ---------------------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A fast tokenizer's full spec: vocab, merges, normalizer, pre-tokenizer, added tokens.
        # NOTE: padding / truncation are call-time settings transformers mutates: left out.
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": _sha(blob)[:16],
    }


def _slug(name: str) -> str:
    base = os.path.basename(name.rstrip("/").split(",")[0]) or name
    return re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.splitext(base)[0]).strip("._")[:40] or "corpus"


def _split_settings(cfg: DataConfig, source: CorpusSource) -> dict[str, Any]:
    """The data settings that decide which tokens land in which split (cache key and meta)."""
    settings = {
        "text_field": cfg.text_field,
        "append_eos": cfg.append_eos,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
        "max_train_tokens": cfg.max_train_tokens,
        "max_eval_tokens": cfg.max_eval_tokens,
    }
    # NOTE: only where it cuts documents, so the keys of every other corpus stay as they were.
    if source.builder == "text":
        settings["txt_document_chars"] = cfg.txt_document_chars
    return settings


def _whole_corpus(cfg: DataConfig) -> DataConfig:
    """With data.eval_corpus, data.corpus is tokenised whole into its train split."""
    if cfg.eval_corpus is None:
        return cfg
    return replace(cfg, eval_corpus=None, eval_fraction=0.0, max_eval_tokens=None)


def cache_key(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, source: CorpusSource | None = None
) -> str:
    """Folder name of the tokenised `cfg.corpus`: a readable slug plus a hash of everything
    the tokens depend on (corpus identity, tokenizer identity, text_field, append_eos,
    eval_fraction, seed, token caps, txt_document_chars for .txt files). seq_len is left
    out: packing happens at read time. With data.eval_corpus this is the folder of
    data.corpus tokenised whole; the eval corpus has its own (see `held_out_corpus`), so
    changing it never re-tokenises the training text."""
    cfg = _whole_corpus(cfg)
    source = source or resolve_corpus(cfg.corpus)
    identity = {
        "format": FORMAT_VERSION,
        "corpus": source.identity(),
        "tokenizer": _tokenizer_identity(tokenizer),
        **_split_settings(cfg, source),
    }
    return f"{_slug(source.name)}-{_sha(json.dumps(identity, sort_keys=True))[:16]}"


# ---------------------------------------------------------------------------------------
# Building the cache (rank 0 only, atomically)
# ---------------------------------------------------------------------------------------


def _num_eval_docs(num_docs: int, eval_fraction: float) -> int:
    """Held-out documents: round(fraction x docs), at least 1 and leaving at least 1 train."""
    if eval_fraction <= 0 or num_docs < 2:
        return 0
    return min(max(1, round(num_docs * eval_fraction)), num_docs - 1)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Batch-tokenise without special tokens (BOS / CLS are not document separators)."""
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]


def _is_complete(folder: str) -> bool:
    # NOTE: meta.json is written last and the folder appears by an atomic rename, so a
    # folder with meta.json is complete.
    return os.path.isfile(os.path.join(folder, _META))


def _write_json(path: str, content: dict[str, Any]) -> None:
    """A reader sees all of it or nothing, and it survives a crash."""
    atomic_write_text(path, json.dumps(content, indent=2), durable=True)


class _Parts:
    """The finished parts of one split of a build in progress: `parts/<split>-NNNNN.{bin,idx,json}`.

    A part is the tokens of documents [i * _PART_DOCS, (i + 1) * _PART_DOCS) of the split's
    order; its json (with the sizes of its .bin/.idx) is written last, so a part without a
    json, or whose files do not match it, was cut short and is tokenised again.
    """

    def __init__(self, folder: str, split: Split):
        self.root = os.path.join(folder, "parts")
        self.split = split
        os.makedirs(self.root, exist_ok=True)

    def prefix(self, index: int) -> str:
        return os.path.join(self.root, f"{self.split}-{index:05d}")

    def done(self, index: int) -> dict[str, Any] | None:
        prefix = self.prefix(index)
        try:
            with open(prefix + ".json") as f:
                meta = json.load(f)
            sizes = [os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")]
        except (OSError, ValueError):
            return None
        return meta if sizes == [meta["bin_bytes"], meta["idx_bytes"]] else None

    def finish(self, index: int, meta: dict[str, Any]) -> None:
        prefix = self.prefix(index)
        for ext in (".bin", ".idx"):
            fsync_path(prefix + ext)
        sizes = {"bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx")}
        _write_json(prefix + ".json", {**meta, **sizes})


def _write_part(
    indexed_dataset, parts: _Parts, index: int, texts_of, order: np.ndarray, cap: int | None,
    tokens_before: int, tokenizer: PreTrainedTokenizerBase, dtype, eos: int | None,
) -> dict[str, Any]:
    """Tokenise part `index` of a split (documents `order`, one per sequence) up to the cap."""
    prefix = parts.prefix(index)
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    num_tokens, num_docs, max_id, start, batch = 0, 0, -1, 0, 1
    while start < len(order) and (cap is None or tokens_before + num_tokens < cap):
        # NOTE: batches grow 1, 2, 4, ... so a small cap tokenises little more than it keeps.
        texts = texts_of(order[start : start + batch])
        start, batch = start + batch, min(2 * batch, _DOCS_PER_BATCH)
        for ids in _encode(tokenizer, texts):
            if not ids or (cap is not None and tokens_before + num_tokens >= cap):
                continue
            if eos is not None:
                ids.append(eos)
            if cap is not None:
                ids = ids[: cap - tokens_before - num_tokens]
            array = np.asarray(ids, dtype=np.int64)
            max_id = max(max_id, int(array.max()))
            builder.add_document(array, [len(array)])
            num_tokens += len(array)
            num_docs += 1
    builder.finalize(prefix + ".idx")
    meta = {"tokens": num_tokens, "docs": num_docs, "max_id": max_id}
    parts.finish(index, meta)
    return meta


def _write_splits(
    cfg: DataConfig, source: CorpusSource, tokenizer: PreTrainedTokenizerBase, folder: str
) -> dict[str, Any]:
    """Tokenise the documents into folder/{train,eval}.{bin,idx}; return meta.json's content.

    Work goes part by part (`_PART_DOCS` documents each, eval first), so a build that was
    killed resumes from its last finished part; the parts are then concatenated with
    megatron's IndexedDatasetBuilder.add_index.
    """
    indexed_dataset = _megatron_indexed()
    vocab_size = len(tokenizer)
    dtype = indexed_dataset.DType.optimal_dtype(vocab_size)
    eos = tokenizer.eos_token_id
    if cfg.append_eos and eos is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos token to separate documents; "
            "set one or set data.append_eos=False"
        )

    # 1. Split DOCUMENTS by a seeded shuffle; both splits are written in shuffled order.
    docs = load_documents(cfg, source)
    order = np.random.default_rng(cfg.seed).permutation(len(docs))
    num_eval = _num_eval_docs(len(docs), cfg.eval_fraction)
    if cfg.eval_fraction > 0 and num_eval == 0:
        logger.warning(
            "corpus %r has %d document(s): data.eval_fraction=%g holds out none, so it has no "
            "eval split (see data.txt_document_chars and data.eval_corpus)",
            source.name, len(docs), cfg.eval_fraction,
        )
    orders = {"eval": order[:num_eval], "train": order[num_eval:]}
    caps = {"eval": cfg.max_eval_tokens, "train": cfg.max_train_tokens}

    # 2. Tokenise each split part by part until its cap, one document per sequence.
    meta: dict[str, Any] = {}
    max_id = -1
    t0 = logged = time.perf_counter()
    for split in _SPLITS:
        parts, split_order, cap = _Parts(folder, split), orders[split], caps[split]
        num_tokens, num_docs, index, resumed = 0, 0, 0, 0
        while index * _PART_DOCS < len(split_order) and (cap is None or num_tokens < cap):
            part = parts.done(index)
            if part is not None:
                resumed += 1
            else:
                chunk = split_order[index * _PART_DOCS : (index + 1) * _PART_DOCS]
                part = _write_part(
                    indexed_dataset, parts, index, docs.take, chunk, cap, num_tokens, tokenizer, dtype,
                    eos if cfg.append_eos else None,
                )
                if time.perf_counter() - logged > 30:  # progress of a long build, twice a minute
                    logged = time.perf_counter()
                    logger.info(
                        "tokenised %s part %d of %d (%d tokens so far, %.0f s)", split, index + 1,
                        -(-len(split_order) // _PART_DOCS), num_tokens + part["tokens"], logged - t0,
                    )
            num_tokens, num_docs, max_id = num_tokens + part["tokens"], num_docs + part["docs"], max(max_id, part["max_id"])
            index += 1
        if resumed:
            logger.info("resumed the %s split from %d finished part(s)", split, resumed)
        builder = indexed_dataset.IndexedDatasetBuilder(os.path.join(folder, split + ".bin"), dtype=dtype)
        for i in range(index):
            builder.add_index(parts.prefix(i))
        builder.finalize(os.path.join(folder, split + ".idx"))
        meta[f"num_{split}_tokens"] = num_tokens
        meta[f"num_{split}_docs"] = num_docs
    if max_id < 0:
        raise ValueError(f"corpus {source.name!r} has no text to tokenise")
    if max_id > np.iinfo(dtype).max:
        raise ValueError(f"token id {max_id} does not fit the cache dtype {np.dtype(dtype).name}")
    logger.info(
        "tokenised corpus %r: %d train / %d eval tokens in %.1f s",
        source.name, meta["num_train_tokens"], meta["num_eval_tokens"], time.perf_counter() - t0,
    )
    return {
        "format": FORMAT_VERSION,
        "corpus": source.name,
        **meta,
        "max_token_id": max_id,
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "tokenizer": str(tokenizer.name_or_path),
        **_split_settings(cfg, source),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _build(
    cfg: DataConfig,
    source: CorpusSource,
    tokenizer: PreTrainedTokenizerBase,
    folder: str,
    key: str,
) -> None:
    """Build in `.partial-<key>` beside `folder` (resuming what a killed build finished),
    write meta.json last, then rename. One builder at a time per key (a file lock: a
    second process waits, then finds the cache complete)."""
    os.makedirs(cfg.cache_dir, exist_ok=True)
    partial = os.path.join(cfg.cache_dir, f"{_PARTIAL}{key}")
    with file_lock(partial + ".lock"):
        if _is_complete(folder):
            return
        try:
            os.makedirs(partial, exist_ok=True)
            meta = _write_splits(cfg, source, tokenizer, partial)
            meta["key"] = key
            shutil.rmtree(os.path.join(partial, "parts"))
            _write_json(os.path.join(partial, _META), meta)
            if os.path.isdir(folder):
                logger.warning("replacing an incomplete data cache (no %s): %s", _META, folder)
                shutil.rmtree(folder)
            os.rename(partial, folder)
        except BaseException as err:
            _write_failure(cfg.cache_dir, key, err)
            raise


def _failure_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_FAILED}{key}")


def _job_token() -> str:
    """The same on every rank of one job, different for the next job (a stale failure note is ignored)."""
    return ":".join(os.environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"))


def _write_failure(cache_dir: str, key: str, err: BaseException) -> None:
    """Tell the ranks waiting for this cache that rank 0 gave up (they stop instead of waiting)."""
    try:
        _write_json(_failure_path(cache_dir, key), {"job": _job_token(), "error": f"{type(err).__name__}: {err}"})
    except OSError:
        pass


def _failure_of_this_job(path: str) -> str | None:
    try:
        with open(path) as f:
            note = json.load(f)
    except (OSError, ValueError):
        return None
    return note.get("error") if note.get("job") == _job_token() else None


def _wait_for(folder: str, failure: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Poll the file system for the finished cache: no collective is open while rank 0
    tokenises, however long that takes (a barrier would hit the NCCL/gloo timeout)."""
    deadline = time.monotonic() + timeout_s
    while not _is_complete(folder):
        if (error := _failure_of_this_job(failure)) is not None:
            raise RuntimeError(f"rank 0 could not build the data cache {folder}: {error}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for rank 0 to build the data cache {folder} "
                "(data.wait_timeout_s; prepare it beforehand with `cald-scale prepare-data`)"
            )
        time.sleep(poll_s)


def _open_cache(folder: str, name: str) -> IndexedCorpus:
    meta_path = os.path.join(folder, _META)
    with open(meta_path) as f:
        meta = json.load(f)
    return IndexedCorpus(
        name=name,
        train_prefix=os.path.join(folder, "train"),
        eval_prefix=os.path.join(folder, "eval"),
        train_sequences=(0, meta["num_train_docs"]),
        eval_sequences=(0, meta["num_eval_docs"]),
        num_train_tokens=meta["num_train_tokens"],
        num_eval_tokens=meta["num_eval_tokens"],
        num_train_docs=meta["num_train_docs"],
        num_eval_docs=meta["num_eval_docs"],
        max_token_id=meta["max_token_id"],
        max_token_id_exact=True,
        vocab_size=meta["vocab_size"],
        tokenizer_name=meta["tokenizer"],
        meta_path=meta_path,
        eval_fraction=meta["eval_fraction"],
    )


def _open_user_prefix(
    cfg: DataConfig, source: CorpusSource, tokenizer: PreTrainedTokenizerBase | None
) -> IndexedCorpus:
    """A user's .bin/.idx used read-only: eval = its last eval_fraction of documents."""
    prefix = source.paths[0]
    if os.path.getsize(prefix + ".bin") == 0:
        raise ValueError(f"corpus {source.name!r}: the indexed dataset {prefix}.bin is empty")
    ds = _megatron_indexed().IndexedDataset(prefix, mmap=True)
    doc_starts = ds.document_indices  # sequence index where each document starts, then the end
    num_docs = len(doc_starts) - 1
    num_eval = _num_eval_docs(num_docs, cfg.eval_fraction)
    boundary = int(doc_starts[num_docs - num_eval])
    train_seqs, eval_seqs = (0, boundary), (boundary, len(ds))
    train = TokenStream(prefix, train_seqs, cfg.max_train_tokens)
    held_out = TokenStream(prefix, eval_seqs, cfg.max_eval_tokens)
    maxima = [_max_token_id(train), _max_token_id(held_out)]
    known = [m for m, _ in maxima if m is not None]
    return IndexedCorpus(
        name=source.name,
        train_prefix=prefix,
        eval_prefix=prefix,
        train_sequences=train_seqs,
        eval_sequences=eval_seqs,
        num_train_tokens=train.num_tokens,
        num_eval_tokens=held_out.num_tokens,
        num_train_docs=num_docs - num_eval,
        num_eval_docs=num_eval,
        max_token_id=max(known) if known else None,
        max_token_id_exact=all(exact for _, exact in maxima),
        vocab_size=None,  # NOTE: a user prefix does not record its tokenizer
        tokenizer_name=None,
        meta_path=None,
        eval_fraction=cfg.eval_fraction,
    )


def build_indexed_dataset(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    is_rank0: bool,
    wait_timeout_s: float | None = None,
) -> IndexedCorpus:
    """Tokenise `cfg.corpus` once into `cfg.cache_dir/<key>/{train,eval}` and open it.

    Only rank 0 tokenises (resuming a build that was killed); the other ranks poll the file
    system for the finished cache (up to `wait_timeout_s`, default data.wait_timeout_s),
    outside any collective, and stop when rank 0 reports a failure.
    A megatron prefix (PREFIX.bin + PREFIX.idx) is opened as is on every rank, with no
    tokenisation and no copy; `tokenizer` is then unused and may be None (call
    `check_vocab` against the model). With `cfg.eval_corpus`, the train split is all of
    `cfg.corpus` and the eval split is `held_out_corpus(cfg, cfg.eval_corpus, ...)`.
    """
    if cfg.eval_corpus is not None:
        train = _build_or_open(_whole_corpus(cfg), tokenizer, is_rank0, wait_timeout_s)
        held_out = held_out_corpus(
            cfg, cfg.eval_corpus, tokenizer,
            max_tokens=cfg.max_eval_tokens, is_rank0=is_rank0, wait_timeout_s=wait_timeout_s,
        )
        maxima = [m for m in (train.max_token_id, held_out.max_token_id) if m is not None]
        return replace(
            train,
            eval_prefix=held_out.eval_prefix,
            eval_sequences=held_out.eval_sequences,
            num_eval_tokens=held_out.num_eval_tokens,
            num_eval_docs=held_out.num_eval_docs,
            max_token_id=max(maxima, default=None),
            max_token_id_exact=train.max_token_id_exact and held_out.max_token_id_exact,
            vocab_size=train.vocab_size or held_out.vocab_size,
            tokenizer_name=train.tokenizer_name or held_out.tokenizer_name,
            eval_fraction=None,
            eval_name=held_out.name,
        )
    return _build_or_open(cfg, tokenizer, is_rank0, wait_timeout_s)


def held_out_corpus(
    cfg: DataConfig,
    corpus: str,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    max_tokens: int | None,
    is_rank0: bool,
    wait_timeout_s: float | None = None,
) -> IndexedCorpus:
    """All of `corpus` as an eval split (and no train split): a seeded shuffle of its
    documents (a prefix: its own order) cut to `max_tokens`, tokenised under `cfg`'s other
    settings. It is cached like any corpus, as the train split of a build that holds
    nothing out, so tokenisation stops near `max_tokens`."""
    whole = _build_or_open(
        replace(
            cfg, corpus=corpus, eval_corpus=None, eval_fraction=0.0,
            max_train_tokens=max_tokens, max_eval_tokens=None,
        ),
        tokenizer, is_rank0, wait_timeout_s,
    )
    first = whole.train_sequences[0]
    return replace(
        whole,
        train_sequences=(first, first),
        num_train_tokens=0,
        num_train_docs=0,
        eval_prefix=whole.train_prefix,
        eval_sequences=whole.train_sequences,
        num_eval_tokens=whole.num_train_tokens,
        num_eval_docs=whole.num_train_docs,
        eval_fraction=None,
    )


def _build_or_open(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    is_rank0: bool,
    wait_timeout_s: float | None,
) -> IndexedCorpus:
    """One corpus (cfg.eval_corpus unused): a user prefix opened, or text tokenised once."""
    source = resolve_corpus(cfg.corpus)
    if source.kind == "indexed":
        return _open_user_prefix(cfg, source, tokenizer)
    if tokenizer is None:
        raise ValueError(f"corpus {cfg.corpus!r} is text: build_indexed_dataset needs a tokenizer")

    key = cache_key(cfg, tokenizer, source)
    folder = os.path.join(cfg.cache_dir, key)
    if is_rank0:
        if _is_complete(folder):
            logger.info("reusing the tokenised corpus %s", folder)
        else:
            logger.info("tokenising corpus %r into %s", cfg.corpus, folder)
            _build(cfg, source, tokenizer, folder, key)
    else:
        _wait_for(folder, _failure_path(cfg.cache_dir, key), cfg.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
    return _open_cache(folder, source.name)
