# Tokenised corpora as megatron indexed datasets: open the cache of a corpus (built once by
# data/tokenise.py) or a user's existing .bin/.idx prefix read-only, and read token streams
# over their splits.
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import CorpusSource, resolve_corpus, shared_text
from cald_scale.data.megatron import IndexedFile
from cald_scale.data.tokenise import META, _num_eval_docs, _whole_corpus, build_cache, cache_key, is_complete, wait_for_cache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IndexedCorpus", "TokenStream", "build_indexed_dataset", "cache_key", "held_out_corpus"]

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]

_MAX_ID_WINDOWS = 64
_MAX_ID_WINDOW_TOKENS = 16384


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
    token_caps: dict[str, int | None] = field(default_factory=dict)
    """The caps a cache's splits were tokenised to ("train": data.max_train_tokens, "eval":
    data.max_eval_tokens), for messages."""

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
    dataset (all of them by default), read through memory-mapped `get`
    calls (`IndexedFile`, megatron's format); `max_tokens` cuts the stream short.

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
        self._ds = None if empty else IndexedFile(self.prefix)
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
        self.dtype = self._ds.dtype
        self._lengths = self._ds.sequence_lengths
        self._pointers = self._ds.sequence_pointers
        if first == last:
            self._base, total = 0, 0
        else:
            self._base = int(self._pointers[first])
            end = int(self._pointers[last - 1]) + int(self._lengths[last - 1]) * self.dtype.itemsize
            total = (end - self._base) // self.dtype.itemsize
        self.total_tokens = total
        self.num_tokens = total if self._max_tokens is None else min(total, self._max_tokens)

    @property
    def sequence_range(self) -> tuple[int, int]:
        """[first, last) of the sequences this stream reads."""
        return self._first, self._last

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


_META_KEYS = (
    "dtype", "num_train_tokens", "num_eval_tokens", "num_train_docs", "num_eval_docs", "max_token_id", "vocab_size",
    "tokenizer", "eval_fraction",
)


def _read_cache_meta(folder: str) -> dict[str, Any]:
    """The cache's meta.json, checked against its token files: a damaged cache is named as one
    (with the way out), not read as an empty split or a JSON error without a path."""
    meta_path = os.path.join(folder, META)
    damaged = f"data cache {folder} is damaged ({{}}); delete that folder and the next start rebuilds it"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        missing = [key for key in _META_KEYS if key not in meta]
        if missing:
            raise ValueError(f"it lacks {missing}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected = {split: meta[f"num_{split}_tokens"] * itemsize for split in ("train", "eval")}
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(damaged.format(f"{META} is unreadable: {err}")) from err
    for split, size in expected.items():
        path = os.path.join(folder, split + ".bin")
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual != size or not os.path.isfile(os.path.join(folder, split + ".idx")):
            found = "missing" if actual is None else f"{actual} bytes"
            raise ValueError(damaged.format(f"{split}.bin is {found}, {META} says {size}; or {split}.idx is missing"))
    return meta


def _open_cache(folder: str, name: str) -> IndexedCorpus:
    meta_path = os.path.join(folder, META)
    meta = _read_cache_meta(folder)
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
        token_caps={"train": meta.get("max_train_tokens"), "eval": meta.get("max_eval_tokens")},
    )


def _open_user_prefix(
    cfg: DataConfig, source: CorpusSource, tokenizer: PreTrainedTokenizerBase | None
) -> IndexedCorpus:
    """A user's .bin/.idx used read-only: eval = its last eval_fraction of documents."""
    prefix = source.paths[0]
    if os.path.getsize(prefix + ".bin") == 0:
        raise ValueError(f"corpus {source.name!r}: the indexed dataset {prefix}.bin is empty")
    ds = IndexedFile(prefix)
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
        # The held-out corpus first: one that shares text with the training corpus is refused
        # before that is tokenised.
        held_out = held_out_corpus(
            cfg, cfg.eval_corpus, tokenizer,
            max_tokens=cfg.max_eval_tokens, is_rank0=is_rank0, wait_timeout_s=wait_timeout_s,
        )
        train = _build_or_open(_whole_corpus(cfg), tokenizer, is_rank0, wait_timeout_s)
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


def _check_apart(held_out: str, train: str) -> None:
    try:
        shared = shared_text(resolve_corpus(held_out), resolve_corpus(train))
    except (FileNotFoundError, ValueError):  # e.g. a run scored on a machine without its training corpus
        return
    if shared:
        raise ValueError(
            f"corpus {held_out!r} is scored as held-out text but shares text with data.corpus {train!r}, which the run "
            f"trains on ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}): its perplexity would be on training "
            "text. Give a corpus apart from data.corpus (data.eval_corpus, eval.other_corpora, --corpus), or use "
            "data.corpus's own held-out split (data.eval_fraction)"
        )


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
    nothing out, so tokenisation stops near `max_tokens`. A corpus that shares text with
    `cfg.corpus`, which trains, is refused: its score would not be held out."""
    _check_apart(corpus, cfg.corpus)
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
        if is_complete(folder):
            logger.info("reusing the tokenised corpus %s", folder)
        else:
            logger.info("tokenising corpus %r into %s", cfg.corpus, folder)
            build_cache(cfg, source, tokenizer, folder, key)
    else:
        wait_for_cache(cfg.cache_dir, key, cfg.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
    # NOTE: the key holds the tokenizer's spec, so this run's tokenizer made these tokens whichever
    # folder first wrote the cache (meta.json names that one): messages name this run's.
    return replace(_open_cache(folder, source.name), tokenizer_name=str(tokenizer.name_or_path))
