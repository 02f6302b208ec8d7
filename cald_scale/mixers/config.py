"""Configs of the linear-time token mixers (keyword-only, serializable with dataclasses.asdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

from cald_scale.mixers.ops.dispatch import Kernel as KernelChoice

__all__ = ["KernelChoice", "Mamba2Config", "MambaConfig"]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _pair(name: str, value) -> tuple[float, float]:
    """Accept a 2-sequence (lists come back from JSON/YAML) and return it as a tuple."""
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (float(v) for v in value)
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high


def _check_dt_init(cfg) -> None:
    _positive("dt_min", cfg.dt_min)
    _positive("dt_init_floor", cfg.dt_init_floor)
    if cfg.dt_max < cfg.dt_min:
        raise ValueError(f"dt_max ({cfg.dt_max}) must be >= dt_min ({cfg.dt_min})")
    if cfg.kernel not in get_args(KernelChoice):
        raise ValueError(f"kernel must be one of {get_args(KernelChoice)}, got {cfg.kernel!r}")


@dataclass(kw_only=True)
class Mamba2Config:
    """Mamba2 (SSD) mixer; the geometry of transformers' BambaMixer."""

    d_state: int = 64
    """State size n per head (also the width of B and C per group)."""
    head_dim: int = 64
    """Channels p per head."""
    num_heads: int | None = None
    """Number of SSM heads; None means expand * hidden_size // head_dim."""
    expand: int = 1
    """Inner width = expand * hidden_size; must equal num_heads * head_dim."""
    n_groups: int = 1
    """Number of B/C groups; must divide num_heads (head i reads group i // (num_heads // n_groups))."""
    d_conv: int = 4
    """Width of the depthwise causal convolution over x, B, C."""
    conv_bias: bool = True
    """Whether the convolution has a bias."""
    proj_bias: bool = False
    """Whether in_proj and out_proj have biases."""
    chunk_size: int = 64
    """Chunk length of the chunked SSD scan (a speed knob; results do not depend on it)."""
    dt_min: float = 0.001
    """Lower end of the log-uniform initial time step."""
    dt_max: float = 0.1
    """Upper end of the log-uniform initial time step."""
    dt_init_floor: float = 1e-4
    """Initial time steps are clamped to at least this value."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """-A is initialised uniformly in this range (A_log = log of it)."""
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    """The time step softplus(dt + dt_bias) is clamped into this range."""
    norm_eps: float = 1e-5
    """Epsilon of the gated RMS norm."""
    kernel: KernelChoice = "auto"
    """Scan implementation: auto (cuda if available, else chunked), ref, chunked, cuda."""

    def __post_init__(self) -> None:
        for name in ("d_state", "head_dim", "expand", "n_groups", "d_conv", "chunk_size"):
            _positive(name, getattr(self, name))
        if self.num_heads is not None:
            _positive("num_heads", self.num_heads)
            if self.num_heads % self.n_groups:
                raise ValueError(f"n_groups ({self.n_groups}) must divide num_heads ({self.num_heads})")
        _check_dt_init(self)
        self.A_init_range = _pair("A_init_range", self.A_init_range)
        if self.A_init_range[0] <= 0:
            raise ValueError(f"A_init_range must be positive (it is -A), got {self.A_init_range}")
        self.time_step_limit = _pair("time_step_limit", self.time_step_limit)
        if self.time_step_limit[0] < 0:
            raise ValueError(f"time_step_limit must be non-negative, got {self.time_step_limit}")
        _positive("norm_eps", self.norm_eps)

    def resolved_num_heads(self, hidden_size: int) -> int:
        """num_heads for a given hidden size; raises ValueError if the geometry does not fit."""
        inner = self.expand * hidden_size
        num_heads = self.num_heads if self.num_heads is not None else inner // self.head_dim
        if num_heads * self.head_dim != inner:
            raise ValueError(
                f"num_heads * head_dim ({num_heads} * {self.head_dim}) must equal "
                f"expand * hidden_size ({self.expand} * {hidden_size})"
            )
        if num_heads % self.n_groups:
            raise ValueError(f"n_groups ({self.n_groups}) must divide num_heads ({num_heads})")
        return num_heads


@dataclass(kw_only=True)
class MambaConfig:
    """Mamba (v1, selective scan) mixer; the parameter names of mamba_ssm's Mamba."""

    d_state: int = 16
    """State size n per channel."""
    expand: int = 2
    """Inner width d_inner = expand * hidden_size."""
    d_conv: int = 4
    """Width of the depthwise causal convolution over x."""
    dt_rank: int | None = None
    """Rank of the time-step projection; None means ceil(hidden_size / 16)."""
    conv_bias: bool = True
    """Whether the convolution has a bias."""
    proj_bias: bool = False
    """Whether in_proj and out_proj have biases."""
    dt_min: float = 0.001
    """Lower end of the log-uniform initial time step."""
    dt_max: float = 0.1
    """Upper end of the log-uniform initial time step."""
    dt_init_floor: float = 1e-4
    """Initial time steps are clamped to at least this value."""
    dt_scale: float = 1.0
    """Scale of the dt_proj weight init (std = dt_scale / sqrt(dt_rank))."""
    kernel: KernelChoice = "auto"
    """Scan implementation: auto (cuda if available, else chunked = fast CPU scan), ref, chunked, cuda."""

    def __post_init__(self) -> None:
        for name in ("d_state", "expand", "d_conv"):
            _positive(name, getattr(self, name))
        if self.dt_rank is not None:
            _positive("dt_rank", self.dt_rank)
        _positive("dt_scale", self.dt_scale)
        _check_dt_init(self)

    def resolved_dt_rank(self, hidden_size: int) -> int:
        """dt_rank for a given hidden size."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(hidden_size / 16)
