"""The converted model in use: a recurrent-state cache for generation (KV only for the layers
that keep attention) and the ``cald-scale generate`` command."""

from .cache import StudentCache
from .graphs import GraphedDecode

__all__ = ["GraphedDecode", "StudentCache"]
