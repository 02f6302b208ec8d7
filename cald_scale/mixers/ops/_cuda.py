"""CUDA kernels from mamba_ssm and causal_conv1d behind the signatures of our ops.

Imports are guarded: this module always imports; ``kernels_available()`` says whether the
kernels do, and each wrapper raises a RuntimeError with the install command when they do not.
The kernels update decoding states in place; the wrappers work on a copy so that, like the
pure-PyTorch ops, they leave their inputs alone and return the new state.
"""

from __future__ import annotations

import functools

__all__ = [
    "INSTALL_HINT",
    "kernels_available",
    "causal_conv1d",
    "causal_conv1d_update",
    "ssd_chunked",
    "ssd_step",
    "selective_scan",
    "selective_state_update",
]

INSTALL_HINT = "pip install mamba-ssm causal-conv1d"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict | None, str | None]:
    """Import the kernels once: (functions by name, None) or (None, why not)."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from causal_conv1d import causal_conv1d_update as conv_update
    except ImportError as err:
        return None, f"package causal-conv1d is not importable ({err})"
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import (
            selective_state_update as state_update,
        )
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        return None, f"package mamba-ssm is not importable ({err})"
    fns = {
        "causal_conv1d_fn": causal_conv1d_fn,
        "causal_conv1d_update": conv_update,
        "selective_scan_fn": selective_scan_fn,
        "selective_state_update": state_update,
        "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
    }
    return fns, None


def kernels_available() -> tuple[bool, str | None]:
    """(True, None) if mamba_ssm and causal_conv1d import, else (False, the reason)."""
    fns, reason = _load()
    return fns is not None, reason


def _fn(name: str):
    fns, reason = _load()
    if fns is None:
        raise RuntimeError(f"CUDA mixer kernels unavailable: {reason}. Install with `{INSTALL_HINT}`.")
    return fns[name]


def causal_conv1d(x, weight, bias=None, activation=None):
    """See ops.conv.causal_conv1d."""
    return _fn("causal_conv1d_fn")(x, weight, bias, activation=activation)


def causal_conv1d_update(x_t, conv_state, weight, bias=None, activation=None):
    """See ops.conv.causal_conv1d_update."""
    new_state = conv_state.clone()
    y = _fn("causal_conv1d_update")(x_t, new_state, weight, bias, activation=activation)
    return y, new_state


def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False):
    """See ops.ssd.ssd_chunked."""
    return _fn("mamba_chunk_scan_combined")(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=return_final_state
    )


def ssd_step(x_t, dt_t, A, B_t, C_t, D, state):
    """See ops.ssd.ssd_step."""
    nheads, headdim, dstate = state.shape[1:]
    new_state = state.clone()
    # NOTE: zero strides over head_dim let the kernel treat dt, A and D as per-head scalars.
    y = _fn("selective_state_update")(
        new_state,
        x_t,
        dt_t[..., None].expand(-1, -1, headdim),
        A[:, None, None].expand(nheads, headdim, dstate),
        B_t,
        C_t,
        D=None if D is None else D[:, None].expand(nheads, headdim),
    )
    return y, new_state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """See ops.selective_scan.selective_scan_ref."""
    return _fn("selective_scan_fn")(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


def selective_state_update(state, x_t, dt_t, A, B_t, C_t, D=None, z_t=None, dt_bias=None, dt_softplus=False):
    """See ops.selective_scan.selective_state_update."""
    new_state = state.clone()
    y = _fn("selective_state_update")(
        new_state, x_t, dt_t, A, B_t, C_t, D=D, z=z_t, dt_bias=dt_bias, dt_softplus=dt_softplus
    )
    return y, new_state
