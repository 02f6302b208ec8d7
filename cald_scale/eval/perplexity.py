"""Held-out perplexity of a layerwise-run causal LM, sharded across ranks."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from ..distill.losses import lm_cross_entropy
from ..distill.stages import LayerwiseModel

__all__ = ["eval_indices", "perplexity"]


def eval_indices(num_sequences: int, max_sequences: int, rank: int, world_size: int) -> list[int]:
    """Equal-sized shards: under ZeRO-3 every rank must run the same number of forwards."""
    per_rank = min(num_sequences, max_sequences) // world_size
    if per_rank == 0 and max_sequences < world_size:
        raise ValueError(
            f"eval.max_sequences={max_sequences} is fewer than one sequence per rank ({world_size} ranks)"
        )
    if per_rank == 0:
        raise ValueError(
            f"eval split has {num_sequences} sequences, fewer than one per rank ({world_size} ranks); "
            "hold out more text (data.eval_fraction, data.eval_corpus) or lower data.seq_len"
        )
    return list(range(rank * per_rank, (rank + 1) * per_rank))


@torch.no_grad()
def perplexity(
    model: LayerwiseModel,
    dataset,
    indices: list[int],
    micro_batch_size: int,
    device: torch.device,
    *,
    before_batch: Callable[[], None] | None = None,
) -> dict:
    """Token-level perplexity over ``indices`` (summed over all ranks); ``before_batch`` runs before each forward."""
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(indices), micro_batch_size):
        batch = torch.stack([dataset[i]["input_ids"] for i in indices[start : start + micro_batch_size]]).to(device)
        if before_batch is not None:
            before_batch()
        nll += lm_cross_entropy(model.logits(batch), batch, reduction="sum").double()
        tokens += batch[:, 1:].numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nll)
        dist.all_reduce(tokens)
    mean = (nll / tokens).item()
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": int(tokens.item())}
