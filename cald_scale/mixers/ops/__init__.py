"""Pure functions behind the mixers: reference, chunked (pure PyTorch) and CUDA paths.

Every op has a sequential ``_ref`` twin with the same signature (the test oracle);
``dispatch.resolve_kernel`` picks the path once and logs any fallback.
"""

from cald_scale.mixers.ops.conv import causal_conv1d, causal_conv1d_update
from cald_scale.mixers.ops.dispatch import Kernel, resolve_kernel
from cald_scale.mixers.ops.selective_scan import (
    selective_scan_cpu,
    selective_scan_ref,
    selective_state_update,
)
from cald_scale.mixers.ops.ssd import ssd_chunked, ssd_ref, ssd_step

__all__ = [
    "Kernel",
    "causal_conv1d",
    "causal_conv1d_update",
    "resolve_kernel",
    "selective_scan_cpu",
    "selective_scan_ref",
    "selective_state_update",
    "ssd_chunked",
    "ssd_ref",
    "ssd_step",
]
