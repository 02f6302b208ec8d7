"""Resolve the requested scan implementation ("auto", "ref", "chunked", "cuda") once, loudly.

Callers keep the resolved name and pick ops with it; nothing is rebound globally.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch

from cald_scale.mixers.ops import _cuda

__all__ = ["Kernel", "resolve_kernel"]

Kernel = Literal["auto", "ref", "chunked", "cuda"]
logger = logging.getLogger("cald_scale.mixers")

# (requested, device type, mixer kind) whose fallback was already logged; ("conv", device type, None)
# once the pure-PyTorch conv under kernel "cuda" was.
_LOGGED_FALLBACKS: set[tuple[str, str, str | None]] = set()


def resolve_kernel(
    requested: Kernel, device: torch.device | str, kind: str | None = None
) -> Literal["ref", "chunked", "cuda"]:
    """The implementation to run on ``device`` for mixer ``kind`` ("mamba2" needs mamba_ssm's
    Triton SSD kernels, "mamba" its compiled selective scan too; None: all of them).

    "ref" and "chunked" are returned as they are (both are pure PyTorch and run anywhere).
    "cuda" needs a CUDA device and those kernels, else RuntimeError; causal-conv1d is used when
    it imports, else the conv runs in pure PyTorch (logged once).
    "auto" gives "cuda" when that works, else "chunked", logging the reason once per
    (requested, device type).
    """
    if requested not in get_args(Kernel):
        raise ValueError(f"kernel must be one of {get_args(Kernel)}, got {requested!r}")
    device = torch.device(device)
    if requested in ("ref", "chunked"):
        return requested
    available, reason = _cuda.kernels_available(kind)
    if device.type != "cuda":
        reason = f"device is {device.type}, the mamba_ssm/causal_conv1d kernels need CUDA"
        available = False
    if available:
        key = ("conv", device.type, None)
        if _cuda.conv_backend() != "causal-conv1d" and key not in _LOGGED_FALLBACKS:
            _LOGGED_FALLBACKS.add(key)
            logger.warning(
                "Mixer kernel 'cuda': the scans run mamba_ssm's kernels, the short conv pure PyTorch: %s",
                _cuda.kernel_groups()["causal_conv1d"][1],
            )
        return "cuda"
    if requested == "cuda":
        raise RuntimeError(
            f"kernel='cuda' requested but {reason}; install the kernels with "
            f"`{_cuda.INSTALL_HINT}` (mamba-ssm, causal-conv1d) on a CUDA machine, or use kernel='chunked'."
        )
    key = (requested, device.type, kind)
    if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        logger.warning(
            "Mixer kernel 'auto' falls back to the pure-PyTorch 'chunked' path: %s. For the CUDA kernels: `%s`.",
            reason,
            _cuda.INSTALL_HINT,
        )
    return "chunked"
