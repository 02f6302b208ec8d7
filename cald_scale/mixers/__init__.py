"""Linear-time token mixers (Mamba, Mamba2) that replace a Transformer's self-attention.

Modules here know nothing about distribution; ``build_mixer`` is the one entry point.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from cald_scale.mixers.config import Mamba2Config, MambaConfig
from cald_scale.mixers.mamba import MambaMixer, MambaState
from cald_scale.mixers.mamba2 import Mamba2Mixer, Mamba2State

__all__ = [
    "MIXER_KINDS",
    "Mamba2Config",
    "Mamba2Mixer",
    "Mamba2State",
    "MambaConfig",
    "MambaMixer",
    "MambaState",
    "build_mixer",
]

MixerKind = Literal["mamba2", "mamba"]
MIXER_KINDS: dict[str, tuple[type, type]] = {"mamba2": (Mamba2Config, Mamba2Mixer), "mamba": (MambaConfig, MambaMixer)}


def build_mixer(kind: MixerKind, config: Mamba2Config | MambaConfig, hidden_size: int, layer_idx: int = 0) -> nn.Module:
    """Build the mixer of ``kind`` ("mamba2" or "mamba") from its config."""
    if kind not in MIXER_KINDS:
        raise ValueError(f"unknown mixer kind {kind!r}; supported: {sorted(MIXER_KINDS)}")
    config_cls, mixer_cls = MIXER_KINDS[kind]
    if not isinstance(config, config_cls):
        raise TypeError(f"mixer {kind!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    return mixer_cls(config, hidden_size, layer_idx=layer_idx)
