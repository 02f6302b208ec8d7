"""Where a model's tensors live while it is built: whole on this process, or partitioned.

Conversion code is written once against a ``Placement``: it builds modules inside
``placement.construct(config)``, writes full-size values with ``placement.assign`` and reads
full-size values inside ``placement.gather(params)``. The plain placement does the obvious
thing; the ZeRO-3 placement (``engines/partitioned.py``) builds under
``deepspeed.zero.Init`` and keeps only this rank's partition of every tensor written,
so no rank ever holds a whole model. Conversion itself never imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Sequence

import torch
from transformers import PretrainedConfig

from .weights import Assign, copy_assign

__all__ = ["Placement", "PLAIN"]


@dataclasses.dataclass(frozen=True)
class Placement:
    name: str
    """"plain" or "zero3" (for messages and logs)."""
    construct: Callable[[PretrainedConfig], ContextManager]
    """Context in which a model of ``config``'s family is constructed (``deepspeed.zero.Init``
    for ZeRO-3)."""
    assign: Assign
    """Writes a full-size value into a (possibly partitioned) parameter or buffer."""
    gather: Callable[[Sequence[torch.Tensor]], ContextManager]
    """Context in which the given parameters hold their full values (read-only)."""
    shape_of: Callable[[torch.Tensor], tuple[int, ...]]
    """The full shape of a (possibly partitioned) tensor."""


PLAIN = Placement(
    name="plain",
    construct=lambda config: contextlib.nullcontext(),
    assign=copy_assign,
    gather=lambda params: contextlib.nullcontext(),
    shape_of=lambda t: tuple(t.shape),
)
