# Held-out scoring of any corpus: the run's own eval split, or text of another corpus the
# run never trains on (a second, other-domain held-out set), as fixed-length sequences.
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from cald_scale.data.config import DataConfig
from cald_scale.data.corpora import resolve_corpus
from cald_scale.data.indexed import build_indexed_dataset, held_out_corpus
from cald_scale.data.packing import PackedSequences, check_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["held_out_sequences", "same_corpus"]


def held_out_sequences(
    corpus: str,
    tokenizer: PreTrainedTokenizerBase | None,
    data_cfg: DataConfig,
    *,
    max_tokens: int | None,
    is_rank0: bool,
    seq_len_name: str = "data.seq_len",
    vocab_size: int | None = None,
    model_name: str | None = None,
) -> PackedSequences:
    """Sequences of `data_cfg.seq_len` held-out tokens of `corpus` (at most `max_tokens`).

    `corpus` is the run's data.corpus (however spelled): its own eval split, from the run's
    cache (built whole if missing). Anything else data.corpus accepts: a seeded document
    shuffle of that corpus, tokenised with `data_cfg`'s settings only up to `max_tokens`
    and cached like any corpus (so a large corpus is not tokenised whole to score a few
    thousand tokens). `seq_len_name` is what a too-short corpus's message says to lower.
    `vocab_size`: the model's; its token ids are checked against it (every sequence read, where
    the corpus's largest id is only a sample's: a large user prefix).
    """
    if same_corpus(corpus, data_cfg.corpus):
        if data_cfg.eval_corpus is not None:
            raise ValueError(
                f"corpus {corpus!r} trains whole in this run (data.eval_corpus is set): it has "
                "no held-out text; score data.eval_corpus instead"
            )
        held_out = build_indexed_dataset(data_cfg, tokenizer, is_rank0=is_rank0)
    elif data_cfg.eval_corpus is not None and same_corpus(corpus, data_cfg.eval_corpus):
        # The run's held-out corpus as the run tokenised it (its cap, its cache), then cut: the same
        # split the run recorded, whatever is scored of it.
        held_out = held_out_corpus(data_cfg, data_cfg.eval_corpus, tokenizer, max_tokens=data_cfg.max_eval_tokens, is_rank0=is_rank0)
    else:
        held_out = held_out_corpus(
            data_cfg, corpus, tokenizer, max_tokens=max_tokens, is_rank0=is_rank0
        )
    if max_tokens is not None:
        held_out = replace(held_out, num_eval_tokens=min(held_out.num_eval_tokens, max_tokens))
    checked = check_vocab(held_out, vocab_size, model_name) if vocab_size is not None else None
    return PackedSequences(held_out, "eval", data_cfg.seq_len, seq_len_name=seq_len_name, vocab_size=checked)


def same_corpus(corpus: str, run_corpus: str) -> bool:
    """Whether two data.corpus values name the same text (however spelled)."""
    if corpus.strip() == run_corpus.strip():
        return True
    try:
        return resolve_corpus(corpus).identity() == resolve_corpus(run_corpus).identity()
    except (FileNotFoundError, ValueError):  # e.g. the run's corpus is not on this machine
        return False
