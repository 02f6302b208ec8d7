# megatron-core's indexed dataset (.bin/.idx), imported on first use.
from __future__ import annotations

import warnings

__all__ = ["megatron_indexed"]


def megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported on first use (megatron.core is slow
    to import, and its import warns about optional Transformer Engine / Apex kernels and
    its own deprecations, none of which concern data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset
