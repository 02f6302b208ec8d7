# Tokenise a corpus ONCE into megatron indexed datasets (train / eval) under a cache key:
# rank 0 builds part by part (a killed build resumes), the other ranks wait on the file
# system, outside any collective.
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import CorpusSource, load_documents, resolve_corpus
from cald_scale.data.megatron import megatron_indexed
from cald_scale.engines.preemption import raise_if_preempted
from cald_scale.fileio import atomic_write_text, file_lock, fsync_path, process_gone, process_identity, read_json, sha256_of, tag_cache_dir, wait_for_file, write_failure_note

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["cache_key", "build_cache", "wait_for_cache", "is_complete", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the cache layout or tokenisation changes: old caches then get a new key."""

Split = Literal["train", "eval"]

_SPLITS: tuple[Split, ...] = ("eval", "train")  # NOTE: eval first, so caps stop early
META = "meta.json"
_PARTIAL = ".partial-"
_OWNER = "builder.json"  # in an unlocked build's partial folder: the process building it (fileio.process_identity)
_FAILED = ".failed-"
_DOCS_PER_BATCH = 128
_PART_DOCS = 4096
"""Documents per part of a build: the unit a killed build resumes from."""


# ---------------------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
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
    identity = {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": _sha(blob)[:16],
    }
    if backend is None:
        # A slow tokenizer's vocab does not pin its rules: its name stands in for them. A fast
        # one's spec does, so the same tokenizer from another folder (a copy, the exported
        # student's, a new venv's GGUF conversion) shares the cache.
        identity["name_or_path"] = str(getattr(tokenizer, "name_or_path", ""))
    return identity


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
        "tokenizer": tokenizer_identity(tokenizer),
        **_split_settings(cfg, source),
    }
    return f"{_slug(source.name)}-{_sha(json.dumps(identity, sort_keys=True))[:16]}"


# ---------------------------------------------------------------------------------------
# Building the cache (rank 0 only, part by part, moved into place when complete)
# ---------------------------------------------------------------------------------------


def _num_eval_docs(num_docs: int, eval_fraction: float) -> int:
    """Held-out documents: round(fraction x docs), at least 1 and leaving at least 1 train."""
    if eval_fraction <= 0 or num_docs < 2:
        return 0
    return min(max(1, round(num_docs * eval_fraction)), num_docs - 1)


def _warn_if_mostly_held_out(name: str, meta: dict[str, Any], eval_fraction: float) -> None:
    """Say so when far more than ``eval_fraction`` of the tokens went to the held-out split.

    NOTE: the split is by document, so a corpus of few documents of unequal size can hold out
    most of its text (a 20 kB .txt file cut into two documents held out 81%), and training
    then sees the rest, unsaid."""
    train, held_out = meta["num_train_tokens"], meta["num_eval_tokens"]
    share = held_out / max(train + held_out, 1)
    if eval_fraction > 0 and share > 2 * eval_fraction + 0.05:
        logger.warning(
            "corpus %r: %.0f%% of its tokens are held out (%d of %d documents; data.eval_fraction=%g splits by "
            "document): training sees %d tokens. Cut a .txt file into more documents (a smaller "
            "data.txt_document_chars), or hold out other text (data.eval_corpus)",
            name, 100 * share, meta["num_eval_docs"], meta["num_train_docs"] + meta["num_eval_docs"], eval_fraction, train,
        )


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Batch-tokenise without special tokens (BOS / CLS are not document separators)."""
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]


def is_complete(folder: str) -> bool:
    # NOTE: meta.json is written last and the folder appears by an atomic rename, so a
    # folder with meta.json is complete.
    return os.path.isfile(os.path.join(folder, META))


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
    num_tokens, num_docs, empty, max_id, start, batch = 0, 0, 0, -1, 0, 1
    while start < len(order) and (cap is None or tokens_before + num_tokens < cap):
        # NOTE: batches grow 1, 2, 4, ... so a small cap tokenises little more than it keeps.
        texts = texts_of(order[start : start + batch])
        start, batch = start + batch, min(2 * batch, _DOCS_PER_BATCH)
        for ids in _encode(tokenizer, texts):
            if not ids:
                empty += 1
                continue
            if cap is not None and tokens_before + num_tokens >= cap:
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
    meta = {"tokens": num_tokens, "docs": num_docs, "empty": empty, "max_id": max_id}
    parts.finish(index, meta)
    return meta


def _join_parts(indexed_dataset, parts: _Parts, count: int, prefix: str, dtype) -> str:
    """Concatenate a split's first `count` parts into prefix.{bin,idx}; returns their sha256.

    On a large corpus this copies the whole split once (minutes), so a preemption signal stops
    it between parts; the parts stay, and the requeued job joins them again from the first.
    """
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    try:
        for i in range(count):
            builder.add_index(parts.prefix(i))
            raise_if_preempted(f"joining the {parts.split} split's parts ({i + 1} of {count} done)")
        builder.finalize(prefix + ".idx")
    finally:
        builder.data_file.close()
    # NOTE: on disk before meta.json (written durably) says the cache is complete: a node that
    # lost power after it must not find the meta over token files that never left the page cache.
    for ext in (".bin", ".idx"):
        fsync_path(prefix + ext)
    return sha256_of(prefix + ".bin", prefix + ".idx")


def _write_splits(
    cfg: DataConfig, source: CorpusSource, tokenizer: PreTrainedTokenizerBase, folder: str
) -> dict[str, Any]:
    """Tokenise the documents into folder/{train,eval}.{bin,idx}; return meta.json's content.

    Work goes part by part (`_PART_DOCS` documents each, eval first), so a build that was
    killed resumes from its last finished part; the parts are then concatenated with
    megatron's IndexedDatasetBuilder.add_index.
    """
    indexed_dataset = megatron_indexed()
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
    max_id, empty = -1, 0
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
            empty += part.get("empty", 0)  # NOTE: parts written before the count have none
            index += 1
            # A preemption signal stops the build between parts: the requeued job resumes from them.
            raise_if_preempted(f"tokenising the corpus ({split} part {index} done)")
        if resumed:
            logger.info("resumed the %s split from %d finished part(s)", split, resumed)
        # The split's content, which a resumed run compares (packing.py's identity): a cache rebuilt
        # under another key (the corpus file touched, copied anew) holds the same split if this agrees.
        meta[f"{split}_sha256"] = _join_parts(indexed_dataset, parts, index, os.path.join(folder, split), dtype)
        meta[f"num_{split}_tokens"] = num_tokens
        meta[f"num_{split}_docs"] = num_docs
    if max_id < 0:
        raise ValueError(f"corpus {source.name!r} has no text to tokenise")
    if empty:  # e.g. jsonl rows whose text is null: the corpus is smaller than its row count says
        rows = source.builder not in (None, "text")  # records with a text field, not plain text files
        logger.warning(
            "corpus %r: %d document(s) have no text (%s) and are left out", source.name, empty,
            f"empty, or a null or missing {cfg.text_field!r} field" if rows else "empty",
        )
    if max_id > np.iinfo(dtype).max:
        raise ValueError(f"token id {max_id} does not fit the cache dtype {np.dtype(dtype).name}")
    if cfg.max_train_tokens is None or meta["num_train_tokens"] < cfg.max_train_tokens:  # (a cap the user set is no surprise)
        _warn_if_mostly_held_out(source.name, meta, cfg.eval_fraction)
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


def build_cache(
    cfg: DataConfig,
    source: CorpusSource,
    tokenizer: PreTrainedTokenizerBase,
    folder: str,
    key: str,
) -> None:
    """Build in `.partial-<key>` beside `folder` (resuming what a killed build finished),
    write meta.json last, then rename. One builder at a time per key (a file lock: a
    second process waits, then finds the cache complete)."""
    tag_cache_dir(cfg.cache_dir)
    partial = os.path.join(cfg.cache_dir, f"{_PARTIAL}{key}")
    try:
        # NOTE: the wait for another builder (a prepare-data, another job) stops on a preemption
        # signal too, and says so to the ranks waiting for this one.
        with file_lock(partial + ".lock", interrupt=lambda: raise_if_preempted(f"waiting for another process to build {folder}")) as locked:
            if is_complete(folder):
                return
            if not locked:  # no locks on this file system: a builder started beside this one must not share its folder
                _remove_dead_partials(partial)
                partial = f"{partial}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
                atomic_write_text(os.path.join(partial, _OWNER), json.dumps(process_identity()))
            os.makedirs(partial, exist_ok=True)
            meta = _write_splits(cfg, source, tokenizer, partial)
            meta["key"] = key
            shutil.rmtree(os.path.join(partial, "parts"))
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(partial, _OWNER))
            _write_json(os.path.join(partial, META), meta)
            if locked and os.path.isdir(folder):
                logger.warning("replacing an incomplete data cache (no %s): %s", META, folder)
                shutil.rmtree(folder)
            try:
                os.rename(partial, folder)
            except OSError:
                if locked or not is_complete(folder):
                    raise
                # NOTE: unlocked, nothing of another builder's is deleted: its cache, in place first, is used.
                shutil.rmtree(partial)
                return
            fsync_path(cfg.cache_dir)  # the rename itself
    except BaseException as err:
        write_failure_note(_failure_path(cfg.cache_dir, key), err, job=_job_token())
        raise


def _remove_dead_partials(partial: str) -> None:
    """Remove the partial folders of unlocked builds (``<partial>.<host>.<pid>.<token>``) whose
    builder is known to be gone (``fileio.process_gone``: the same boot and pid namespace, the
    process ended): killed, they are never resumed. Any other (another node's or container's,
    one without its owner file) is left alone."""
    prefix = os.path.basename(partial) + "."
    folder = os.path.dirname(partial)
    for name in os.listdir(folder):
        if not name.startswith(prefix) or name.endswith(".lock"):
            continue
        try:
            owner = read_json(os.path.join(folder, name, _OWNER))
        except (OSError, ValueError):
            continue
        if process_gone(owner):
            logger.info("removing %s: the unlocked build that wrote it (pid %s) is gone", name, owner.get("pid"))
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _failure_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_FAILED}{key}")


def _job_token() -> str:
    """The same on every rank of one launch, different for the next (engines/distributed.py
    sets it): a failure note of an earlier launch, a requeued job's or a plain rerun's, is ignored."""
    return os.environ.get("CALD_LAUNCH_ID", "")


def wait_for_cache(cache_dir: str, key: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Wait for rank 0 to finish the cache `key` (see fileio.wait_for_file: no collective is
    open while it tokenises, however long that takes)."""
    folder = os.path.join(cache_dir, key)
    wait_for_file(
        os.path.join(folder, META), failure_note=_failure_path(cache_dir, key), job=_job_token(), what=f"build the data cache {folder}",
        timeout_s=timeout_s, poll_s=poll_s, hint=" (data.wait_timeout_s; prepare it beforehand with `cald-scale prepare-data`)",
        interrupt=raise_if_preempted,
    )
