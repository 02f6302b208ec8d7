"""Evaluation: held-out perplexity, classification metrics, hidden-state drift, lm-eval."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with dropout off, its training mode restored after: a score taken during
    training must not depend on dropout (nor draw from the random streams training uses)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
