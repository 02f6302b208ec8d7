"""Held-out perplexity of a causal LM (run block by block, or whole for a model no family
adapter describes), sharded across ranks."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from ..distill.losses import LossConfig, next_token_nll
from ..distill.stages import LayerwiseModel
from . import eval_mode

__all__ = ["PAD", "WholeModel", "eval_indices", "perplexity", "perplexity_result", "scored_rows"]


PAD = -1
"""An index ``eval_indices`` pads a shard with: the rank runs a forward (ZeRO-3 gathers need every
rank in every forward) that counts for nothing."""


def eval_indices(num_sequences: int, max_sequences: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the first ``min(num_sequences, max_sequences)`` held-out sequences.

    Every rank gets the same number of entries (under ZeRO-3 every rank must run the same
    number of forwards), padded with ``PAD``. So the sequences scored, and the perplexity, do not
    depend on the number of ranks (64 ranks score the default 32). The real ones are spread as
    evenly as they go, so every rank holds one once there are as many as ranks (pipeline mode's
    replicas need a real row each: 32 over 12 in blocks of 3 left the last rank none).
    """
    total = min(num_sequences, max_sequences)
    if total <= 0:
        raise ValueError(
            f"the eval split has {num_sequences} sequences (eval.max_sequences={max_sequences}): nothing to score; "
            "hold out more text (data.eval_fraction, data.eval_corpus) or lower data.seq_len"
        )
    per_rank = -(-total // world_size)
    mine = list(range(rank * total // world_size, (rank + 1) * total // world_size))
    return mine + [PAD] * (per_rank - len(mine))


class WholeModel:
    """A causal LM scored whole, for a model no family adapter describes (a Bamba export): its
    decoder's last hidden state, then the head a chunk of tokens at a time, as ``LayerwiseModel``
    scores (the logits are never whole)."""

    def __init__(self, model: PreTrainedModel, *, head_chunk_tokens: int | None = None):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.chunk_tokens = LossConfig(head_chunk_tokens=head_chunk_tokens).chunk_tokens(self.vocab_size)

    def next_token_nll(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, l) NLL of each next token (0 at the last position)."""
        hidden = self.model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        return next_token_nll(hidden, input_ids, self.model.get_output_embeddings(), chunk_tokens=self.chunk_tokens)


def scored_rows(indices: list[int]) -> tuple[list[int], torch.Tensor]:
    """The rows to run for ``indices`` (a padding entry runs sequence 0) and which of them count."""
    return [max(i, 0) for i in indices], torch.tensor([i != PAD for i in indices])


@torch.no_grad()
def perplexity(
    model: LayerwiseModel | WholeModel,
    dataset,
    indices: list[int],
    micro_batch_size: int,
    device: torch.device,
    *,
    before_batch: Callable[[], None] | None = None,
) -> dict:
    """Token-level perplexity over ``indices`` (summed over all ranks); ``before_batch`` runs before each forward.

    Dropout is off while scoring (the mode is restored after), so a student scored during
    training gets the number ``cald-scale evaluate`` gives, as the teacher does.
    """
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model.model):
        for start in range(0, len(indices), micro_batch_size):
            rows, counts = scored_rows(indices[start : start + micro_batch_size])
            batch = torch.stack([dataset[i]["input_ids"] for i in rows]).to(device)
            if before_batch is not None:
                before_batch()
            per_row = model.next_token_nll(batch).double().sum(1)
            counts = counts.to(device)
            nll += per_row[counts].sum()
            tokens += int(counts.sum()) * (batch.shape[1] - 1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nll)
        dist.all_reduce(tokens)
    return perplexity_result(nll.item(), int(tokens.item()))


def perplexity_result(nll_sum: float, tokens: int) -> dict:
    """{"ppl", "nll" (mean per token), "tokens"} from the summed negative log-likelihood of
    ``tokens`` predicted tokens; a perplexity past float range is inf."""
    mean = nll_sum / tokens
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": tokens}
