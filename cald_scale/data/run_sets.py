# The datasets of one run: its train split, its own held-out split and the other-domain
# held-out sets, built (or opened) exactly as the training job and `prepare-data` need them.
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from cald_scale.data.config import DataConfig
from cald_scale.data.heldout import held_out_sequences
from cald_scale.data.indexed import IndexedCorpus, build_indexed_dataset
from cald_scale.data.packing import PackedSequences, check_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["RunDatasets", "open_run_datasets"]


@dataclass(frozen=True)
class RunDatasets:
    corpus: IndexedCorpus
    train: PackedSequences
    evals: dict[str, PackedSequences]
    """"heldout" (the corpus's own held-out split), then each other corpus by name."""


def open_run_datasets(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    other_corpora: Sequence[str],
    max_eval_sequences: int,
    vocab_size: int,
    model_name: str,
    is_rank0: bool,
) -> RunDatasets:
    """Tokenise (rank 0, resumable) or open every corpus the run reads; other ranks wait
    for rank 0 outside any collective. Each other-domain set is cut to the tokens the
    evaluation reads, so a large corpus is not tokenised whole to score a few sequences."""
    corpus = build_indexed_dataset(cfg, tokenizer, is_rank0=is_rank0)
    checked = check_vocab(corpus, vocab_size, model_name)  # where the largest id is a sample's: every sequence
    evals = {"heldout": PackedSequences(corpus, "eval", cfg.seq_len, vocab_size=checked)}
    max_eval_tokens = (max_eval_sequences + 1) * cfg.seq_len
    for name in other_corpora:
        evals[name] = held_out_sequences(
            name, tokenizer, cfg, max_tokens=max_eval_tokens, is_rank0=is_rank0, vocab_size=vocab_size, model_name=model_name,
        )
    return RunDatasets(corpus=corpus, train=PackedSequences(corpus, "train", cfg.seq_len, vocab_size=checked), evals=evals)
