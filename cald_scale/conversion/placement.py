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
import logging
from typing import Callable, ContextManager, Sequence

import torch
from transformers import PretrainedConfig

from .weights import Assign, copy_assign

__all__ = ["Placement", "PLAIN", "rotary_in_float32"]

logger = logging.getLogger("cald_scale.conversion")


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
    kept: Callable[[torch.Tensor], "tuple[int, int] | None"] = lambda tensor: None
    """The range ``[start, stop)`` of a tensor's flattened full value that this process keeps of
    what ``assign`` writes into it; None: all of it. What lies outside need not be computed."""
    unwritten: Callable[[torch.nn.Module], list[str]] = lambda model: []
    """The parameters of a model built here that ``assign`` never wrote: nothing may be left as
    constructed (ZeRO-3 constructs without initialising, or agreeing across ranks)."""

    def check_written(self, model: torch.nn.Module, what: str) -> None:
        """Refuse a model built here with a parameter no ``assign`` wrote, by name."""
        if missing := self.unwritten(model):
            raise RuntimeError(
                f"{what}: {len(missing)} parameter(s) were never written after construction ({', '.join(missing[:6])}): "
                "built without values (no initialisation, no broadcast from rank 0), they have none to train from"
            )


PLAIN = Placement(
    name="plain",
    construct=lambda config: contextlib.nullcontext(),
    assign=copy_assign,
    gather=lambda params: contextlib.nullcontext(),
    shape_of=lambda t: tuple(t.shape),
)


@torch.no_grad()
def rotary_in_float32(model: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Give ``model``'s rotary embeddings their float32 frequencies back; returns how many.

    transformers computes a rotary module's ``inv_freq`` (and ``original_inv_freq``) in float32
    whatever the model's dtype, and keeps it so (``Module.to`` would round it, moving every
    position's angle). ``deepspeed.zero.Init`` casts every float tensor made inside it to the
    engines' dtype, buffers included, so a model built there in bf16 computes other angles than
    the one a user loads. Each rotary module is built again outside, from its config, and its
    float32 buffers are taken.

    With ``device``, every rotary module is rebuilt there, rounded or not: pipeline stages
    build on the CPU and move only the pieces they own, so their rotary tables move here.
    """
    restored = 0
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        rounded = {n: b for n, b in module.named_buffers(recurse=False) if b.is_floating_point() and b.dtype != torch.float32}
        if not rounded and device is None:
            continue
        try:
            fresh = type(module)(module.config)
        except (AttributeError, TypeError) as err:  # a rotary module not built from its config alone
            if rounded:
                logger.warning("%s (%s): its rotary frequencies stay in %s, as built (%s)", name, type(module).__name__, next(iter(rounded.values())).dtype, err)
            if device is not None:
                module.to(device)  # moves, keeps each buffer's dtype
            continue
        for buffer_name, buffer in fresh.named_buffers(recurse=False):
            if buffer_name in rounded or device is not None:
                target = device if device is not None else rounded[buffer_name].device
                setattr(module, buffer_name, buffer.to(device=target))
        restored += 1
    return restored
