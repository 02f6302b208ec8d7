"""Linear-time token mixers that replace a Transformer's self-attention.

Causal (decoders, generation): Mamba, Mamba2. Bidirectional (encoders; ``causal = False``):
Linformer, BiMamba2. Modules here know nothing about distribution; ``build_mixer`` is the one
entry point.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from cald_scale.mixers.bimamba2 import BiMamba2Mixer
from cald_scale.mixers.config import BiMamba2Config, LinformerConfig, Mamba2Config, MambaConfig
from cald_scale.mixers.linformer import LengthProjection, LinformerSelfAttention
from cald_scale.mixers.mamba import MambaMixer, MambaState
from cald_scale.mixers.mamba2 import Mamba2Mixer, Mamba2State

__all__ = [
    "MIXER_KINDS",
    "BiMamba2Config",
    "BiMamba2Mixer",
    "LengthProjection",
    "LinformerConfig",
    "LinformerSelfAttention",
    "Mamba2Config",
    "Mamba2Mixer",
    "Mamba2State",
    "MambaConfig",
    "MambaMixer",
    "MambaState",
    "build_mixer",
]

MixerKind = Literal["mamba2", "mamba", "linformer", "bimamba2"]
MixerConfig = Mamba2Config | MambaConfig | LinformerConfig | BiMamba2Config
MIXER_KINDS: dict[str, tuple[type, type]] = {
    "mamba2": (Mamba2Config, Mamba2Mixer),
    "mamba": (MambaConfig, MambaMixer),
    "linformer": (LinformerConfig, LinformerSelfAttention),
    "bimamba2": (BiMamba2Config, BiMamba2Mixer),
}
"""kind -> (config class, mixer class); ``mixer_class.causal`` says whether a decoder can use it."""


def build_mixer(
    kind: MixerKind,
    config: MixerConfig,
    hidden_size: int,
    layer_idx: int = 0,
    *,
    shared_projection: LengthProjection | None = None,
) -> nn.Module:
    """Build the mixer of ``kind`` from its config.

    ``shared_projection``: for a Linformer with ``sharing="layer"``, the one
    :class:`LengthProjection` every layer uses (``LengthProjection.for_config(config)``).
    """
    if kind not in MIXER_KINDS:
        raise ValueError(f"unknown mixer kind {kind!r}; supported: {sorted(MIXER_KINDS)}")
    config_cls, mixer_cls = MIXER_KINDS[kind]
    if not isinstance(config, config_cls):
        raise TypeError(f"mixer {kind!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    if kind == "linformer":
        return mixer_cls(config, hidden_size, layer_idx=layer_idx, shared_projection=shared_projection)
    if shared_projection is not None:
        raise ValueError(f"shared_projection is a Linformer option; mixer {kind!r} takes none")
    return mixer_cls(config, hidden_size, layer_idx=layer_idx)
