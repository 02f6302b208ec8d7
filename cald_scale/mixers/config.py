"""Configs of the linear-time token mixers (keyword-only, serializable with dataclasses.asdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from cald_scale.mixers.ops.dispatch import Kernel as KernelChoice

__all__ = ["BiMamba2Config", "KernelChoice", "LinformerConfig", "LinformerSharing", "Mamba2Config", "MambaConfig"]


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
    """Number of SSM heads; None means the inner width // head_dim."""
    expand: int = 1
    """Inner width = expand * hidden_size (unless intermediate_size is set); must equal num_heads * head_dim."""
    intermediate_size: int | None = None
    """Inner width itself, for one that is no multiple of hidden_size (a teacher whose attention is
    heads x head_dim = 2048 wide in a 2304-wide model, as Gemma-2-2B's); None means expand * hidden_size."""
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
        if self.intermediate_size is not None:
            _positive("intermediate_size", self.intermediate_size)
            if self.expand != 1:
                raise ValueError(
                    f"expand={self.expand} and intermediate_size={self.intermediate_size} both give the inner width: set one"
                )
        _check_dt_init(self)
        self.A_init_range = _pair("A_init_range", self.A_init_range)
        if self.A_init_range[0] <= 0:
            raise ValueError(f"A_init_range must be positive (it is -A), got {self.A_init_range}")
        self.time_step_limit = _pair("time_step_limit", self.time_step_limit)
        if self.time_step_limit[0] < 0:
            raise ValueError(f"time_step_limit must be non-negative, got {self.time_step_limit}")
        _positive("norm_eps", self.norm_eps)

    def inner_size(self, hidden_size: int) -> int:
        """The inner width (x, z, the gated norm) for a given hidden size."""
        return self.intermediate_size if self.intermediate_size is not None else self.expand * hidden_size

    def resolved_num_heads(self, hidden_size: int) -> int:
        """num_heads for a given hidden size; raises ValueError if the geometry does not fit."""
        inner = self.inner_size(hidden_size)
        num_heads = self.num_heads if self.num_heads is not None else inner // self.head_dim
        if num_heads * self.head_dim != inner:
            width = (
                f"intermediate_size ({inner})" if self.intermediate_size is not None
                else f"expand * hidden_size ({self.expand} * {hidden_size})"
            )
            raise ValueError(f"num_heads * head_dim ({num_heads} * {self.head_dim}) must equal {width}")
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


@dataclass(kw_only=True)
class BiMamba2Config:
    """Bidirectional Mamba2 mixer (encoders): one Mamba2 per scan direction, outputs merged."""

    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    """Settings of each direction's Mamba2Mixer (both directions share them, not their weights)."""
    merge: Literal["add", "mean"] = "add"
    """How the two directions' outputs combine: their sum, or their mean."""

    def __post_init__(self) -> None:
        if isinstance(self.mamba2, dict):  # asdict() output handed back as it is
            self.mamba2 = Mamba2Config(**self.mamba2)
        if not isinstance(self.mamba2, Mamba2Config):
            raise ValueError(f"mamba2 must be a Mamba2Config, got {type(self.mamba2).__name__}")
        if self.merge not in ("add", "mean"):
            raise ValueError(f"merge must be 'add' or 'mean', got {self.merge!r}")


LinformerSharing = Literal["none", "kv", "layer"]


@dataclass(kw_only=True)
class LinformerConfig:
    """Linformer self-attention (encoders): the teacher's Q/K/V plus learnt length projections
    E (keys) and F (values) that shrink the l keys and values to k."""

    num_heads: int | None = None
    """Number of attention heads; None means hidden_size // head_dim."""
    head_dim: int = 64
    """Channels per head; the output width is num_heads * head_dim (the teacher's context width)."""
    k: int = 256
    """Number of projected positions (columns of E and F)."""
    max_positions: int = 512
    """Longest sequence (in real tokens) the length projections cover (rows of E and F)."""
    sharing: LinformerSharing = "none"
    """none: E and F per layer; kv: E = F per layer; layer: one E = F shared by all layers."""
    output_proj: bool = False
    """Whether the mixer has its own output projection o_proj. False for families that keep
    the O projection outside the attention slot (BERT's ``attention.output.dense``)."""
    proj_bias: bool = True
    """Whether q_proj, k_proj, v_proj (and o_proj) have biases (BERT's do)."""
    dropout: float = 0.0
    """Dropout on the attention probabilities while training."""

    def __post_init__(self) -> None:
        for name in ("head_dim", "k", "max_positions"):
            _positive(name, getattr(self, name))
        if self.num_heads is not None:
            _positive("num_heads", self.num_heads)
        if self.sharing not in get_args(LinformerSharing):
            raise ValueError(f"sharing must be one of {get_args(LinformerSharing)}, got {self.sharing!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def resolved_num_heads(self, hidden_size: int) -> int:
        """num_heads for a given hidden size; raises ValueError if the geometry does not fit."""
        if self.num_heads is not None:
            return self.num_heads
        if hidden_size % self.head_dim:
            raise ValueError(
                f"num_heads is None, so head_dim ({self.head_dim}) must divide hidden_size ({hidden_size})"
            )
        return hidden_size // self.head_dim
