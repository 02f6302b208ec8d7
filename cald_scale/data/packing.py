# Packing: a split's token stream cut into fixed-length sequences, plus the vocab check.
from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
import torch

from cald_scale.data.indexed import IndexedCorpus, TokenStream
from cald_scale.fileio import read_json

__all__ = ["PackedSequences", "check_vocab"]

logger = logging.getLogger(__name__)


class PackedSequences(torch.utils.data.Dataset):
    """Sequence i = tokens [i * seq_len, (i + 1) * seq_len) of the split's token stream
    (its documents concatenated, already eos-separated); the tail shorter than seq_len is
    dropped. Items are {"input_ids", "labels"} int64 tensors of shape [seq_len], labels a
    copy of input_ids (the model shifts).

    `prefix_or_corpus` is an IndexedCorpus (its `split`), or a bare .bin/.idx prefix whose
    whole stream is used (`split` then only names it in messages).

    Reads are memory-mapped, so the corpus is never loaded into RAM. Given `vocab_size`,
    every item is checked against it (a cheap guard for user prefixes whose max token id
    was only sampled). `seq_len_name` is the setting a too-short split's message tells the
    user to lower (a command's `--seq_len` rather than the run's `data.seq_len`).
    """

    def __init__(
        self,
        prefix_or_corpus: IndexedCorpus | str,
        split: Literal["train", "eval"],
        seq_len: int,
        *,
        vocab_size: int | None = None,
        seq_len_name: str = "data.seq_len",
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        corpus = prefix_or_corpus if isinstance(prefix_or_corpus, IndexedCorpus) else None
        if corpus is not None:
            name = corpus.eval_name if split == "eval" and corpus.eval_name else corpus.name
            prefix, sequences, num_tokens = corpus.split(split)
        else:
            name, prefix, sequences, num_tokens = prefix_or_corpus, prefix_or_corpus, None, None
        self.name = name
        self.split = split
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self._stream = TokenStream(prefix, sequences, num_tokens)
        self.num_tokens = self._stream.num_tokens
        self.identity = _identity(prefix, self._stream)
        if self.num_tokens < seq_len:
            raise ValueError(
                _too_short(corpus, name, split, self.num_tokens, seq_len, seq_len_name)
            )
        self.num_sequences = self.num_tokens // seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if idx < 0:
            idx += self.num_sequences
        if not 0 <= idx < self.num_sequences:
            raise IndexError(f"sequence {idx} out of range ({self.num_sequences} sequences)")
        tokens = self._stream.read(idx * self.seq_len, self.seq_len)
        if self.vocab_size is not None:
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise ValueError(
                    f"corpus {self.name}: {self.split} sequence {idx} holds token id {top} >= "
                    f"the model's vocab size {self.vocab_size}: the corpus was tokenised with "
                    "a different tokenizer than the model's"
                )
        input_ids = torch.from_numpy(tokens.astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _too_short(
    corpus: IndexedCorpus | None,
    name: str,
    split: str,
    num_tokens: int,
    seq_len: int,
    seq_len_name: str,
) -> str:
    """Why `split` holds fewer than seq_len tokens, and what to change."""
    short = (
        f"corpus {name}: {split} split has {num_tokens} tokens, fewer than one sequence of "
        f"seq_len={seq_len}"
    )
    if corpus is None:
        return f"{short}; use a larger corpus or a smaller {seq_len_name}"
    cap = corpus.token_caps.get(split)
    if cap is not None and num_tokens >= cap:  # the split was cut at its cap, not short of text
        return f"{short}: data.max_{split}_tokens={cap} cuts it there; raise it or use a smaller {seq_len_name}"
    if split == "train":
        docs = _plural(corpus.num_train_docs, "document")
        return f"{short} ({docs}); use a larger corpus or a smaller {seq_len_name}"
    if corpus.eval_fraction is None:  # a whole other corpus (data.eval_corpus) is held out
        docs = _plural(corpus.num_eval_docs, "document")
        return f"{short} ({docs}); hold out a larger corpus or use a smaller {seq_len_name}"
    num_docs = corpus.num_train_docs + corpus.num_eval_docs
    fraction = f"data.eval_fraction={corpus.eval_fraction:g}"
    if corpus.num_eval_docs == 0 and corpus.eval_fraction > 0:
        return (
            f"corpus {name} has {_plural(num_docs, 'document')}; {fraction} holds out 0 of them "
            "(the train split keeps at least one): split the text into more documents "
            "(data.txt_document_chars for .txt files) or set data.eval_corpus"
        )
    if corpus.num_eval_docs == 0:
        return f"{short}: {fraction} holds out no documents; raise it or set data.eval_corpus"
    held = _plural(corpus.num_eval_docs, "held-out document")
    return (
        f"{short} ({held}: {fraction} of {num_docs}); raise data.eval_fraction, set "
        f"data.eval_corpus or use a smaller {seq_len_name}"
    )


def check_vocab(
    corpus: IndexedCorpus, vocab_size: int, tokenizer_name: str | None = None
) -> int | None:
    """Raise ValueError when the corpus holds token ids the model cannot embed
    (max token id >= vocab_size): the data and the model use different tokenizers.
    Returns the ``vocab_size`` its PackedSequences should check every sequence against: the
    model's where the largest id is only a sample's (a large user prefix), else None."""
    if corpus.max_token_id is None:
        logger.warning("corpus %s is empty: no token ids to check", corpus.name)
        return None
    if corpus.max_token_id >= vocab_size:
        scope = "" if corpus.max_token_id_exact else " (in a sample)"
        raise ValueError(
            f"tokenizer/vocab mismatch: corpus {corpus.name} (tokenised with "
            f"{corpus.tokenizer_name or 'an unknown tokenizer'}, vocab {corpus.vocab_size}) "
            f"holds token id {corpus.max_token_id}{scope}, but the model "
            f"({tokenizer_name or 'unnamed'}) has vocab_size={vocab_size}; tokenise the corpus "
            "with the model's tokenizer (if it was: that tokenizer has more tokens than the model embeds, so it "
            "is not the model's own)"
        )
    if not corpus.max_token_id_exact:
        logger.info(
            "corpus %s: max token id %d < vocab %d on a sample; every sequence read is checked",
            corpus.name, corpus.max_token_id, vocab_size,
        )
    if corpus.vocab_size is not None and corpus.vocab_size > vocab_size:
        logger.warning(
            "corpus %s was tokenised with a %d-token tokenizer (%s) but the model has %d",
            corpus.name, corpus.vocab_size, corpus.tokenizer_name, vocab_size,
        )
    return None if corpus.max_token_id_exact else vocab_size


def _identity(prefix: str, stream: TokenStream) -> dict:
    """Which tokens a split holds, as a resumed run compares them with its first session's: a
    cache's split by the sha256 of its token files (meta.json; the cache may move, and be rebuilt
    under another key when only the corpus file's time changed); a cache from before the digest
    by its key, a user prefix by its path; each with the sequences and tokens read."""
    folder, split = os.path.dirname(prefix), os.path.basename(prefix)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        digest = read_json(meta_path).get(f"{split}_sha256")
        source = f"sha256:{digest}" if digest else f"{os.path.basename(folder)}/{split}"
    else:
        source = os.path.abspath(prefix)
    return {"source": source, "sequences": list(stream.sequence_range), "tokens": stream.num_tokens}
