"""Hidden-state drift: how far fine-tuning moved a teacher's hidden states, layer by layer.

The CALD paper links the benefit of trajectory guidance to this drift: when the fine-tuned
teacher's hidden states sit far from the pretrained one's, a student that follows the
teacher along its fine-tuning has more to gain. Drift is the mean cosine distance
(1 - cos) between the two models' hidden states at the same real (unpadded) tokens.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


__all__ = ["hidden_state_drift"]


@torch.no_grad()
def hidden_state_drift(before, after, batches: Iterable[dict]) -> dict:
    """Mean cosine distance per block output between two layerwise views of the same
    architecture (``distill.stages.layerwise``), over the real tokens of ``batches``.

    Returns ``{"per_layer": [d_1 .. d_L], "mean": mean over layers, "tokens": n}``; the
    embedding output is left out (both models' embeddings are compared through block 1).
    """
    if before.num_layers != after.num_layers:
        raise ValueError(f"drift needs the same depth: {before.num_layers} vs {after.num_layers} blocks")
    sums = torch.zeros(before.num_layers, dtype=torch.float64)
    tokens = 0
    for module in (before.model, after.model):
        module.eval()
    for batch in batches:
        mask = before.token_mask(batch)
        states = []
        for view in (before, after):
            hidden = view.embed(batch)  # the whole batch, as in training (a sentence pair's segments)
            ctx = view.context(hidden, batch)
            keep = mask.bool() if mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            outs = []
            for i in range(view.num_layers):
                hidden = view.block(i, hidden, ctx)
                outs.append(hidden[keep].float())
            states.append(outs)
        for i, (a, b) in enumerate(zip(*states)):
            sums[i] += (1.0 - F.cosine_similarity(a, b, dim=-1)).double().sum()
        tokens += int(keep.sum())
    per_layer = (sums / max(tokens, 1)).tolist()
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "tokens": tokens}
