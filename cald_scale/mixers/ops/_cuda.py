"""CUDA kernels from mamba_ssm and causal_conv1d behind the signatures of our ops.

The kernels come in three groups that import independently:

- ``causal_conv1d``: ``causal_conv1d_fn`` / ``causal_conv1d_update`` (package causal-conv1d,
  compiled CUDA);
- ``mamba_triton``: mamba_ssm's Triton kernels, ``mamba_chunk_scan_combined`` (SSD) and
  ``selective_state_update`` (no compiled code: a ``MAMBA_SKIP_CUDA_BUILD=TRUE`` install has them);
- ``selective_scan``: mamba_ssm's compiled Mamba-1 scan ``selective_scan_fn`` (extension
  ``selective_scan_cuda``).

Mamba2 needs the Triton group, Mamba the Triton and the selective-scan groups
(``MIXER_GROUPS``). causal-conv1d is optional (``OPTIONAL_GROUPS``): without it the conv wrappers
run the pure-PyTorch conv on the GPU. NOTE: causal-conv1d has no pure-Python build, its source
build outlasts what a lent GPU has time for (its wheel is compiled on a CPU machine:
launch/build_gpu_wheels.sh), and the conv is a small part of a mixer's time; mamba_ssm's own
Mamba2 falls back the same way. The SSD scan shares its Triton tuning between processes when
``CALD_TRITON_AUTOTUNE_CACHE`` names a file (``_autotune_cache``).
Imports are guarded: this module always imports; ``kernels_available()`` says whether the
kernels do, ``kernel_groups()`` which group is missing and why, and each scan wrapper raises a
RuntimeError with the install command when its kernel is missing. The kernels update decoding
states in place; the wrappers work on a copy so that, like the pure-PyTorch ops, they leave
their inputs alone and return the new state.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import types

from cald_scale.mixers.ops import _autotune_cache, conv

__all__ = [
    "INSTALL_HINT",
    "MIXER_GROUPS",
    "OPTIONAL_GROUPS",
    "conv_backend",
    "kernel_groups",
    "kernels_available",
    "causal_conv1d",
    "causal_conv1d_update",
    "ssd_chunked",
    "ssd_step",
    "selective_scan",
    "selective_state_update",
]

# The tested minors (pyproject.toml's gpu extra): _cuda.py reads mamba_ssm's Triton modules, not only its API.
INSTALL_HINT = "pip install 'mamba-ssm>=2.3,<2.4' 'causal-conv1d>=1.7,<1.8' --no-build-isolation"

MIXER_GROUPS: dict[str, tuple[str, ...]] = {
    "mamba2": ("mamba_triton",),
    "mamba": ("mamba_triton", "selective_scan"),
}
"""The kernel groups each mixer's "cuda" path needs."""

OPTIONAL_GROUPS = ("causal_conv1d",)
"""Kernel groups a "cuda" path uses when they import, else runs in pure PyTorch."""

_ALL_GROUPS = ("mamba_triton", "selective_scan")  # what every mixer's "cuda" path needs


def _import_mamba_triton_module(name: str) -> types.ModuleType:
    """Import ``mamba_ssm.<...>`` even when the package root cannot be imported.

    NOTE: ``mamba_ssm/__init__.py`` imports the compiled Mamba-1 extension ``selective_scan_cuda``
    (and the modules built on it), which a ``MAMBA_SKIP_CUDA_BUILD=TRUE`` install lacks, so a plain
    import of the Triton SSD modules fails there although they need no compiled code. Then the
    package is registered as a bare namespace (its ``__path__`` only, ``__init__`` not run) and the
    Triton modules are imported from it. ``from mamba_ssm import Mamba`` keeps failing as it would.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        root_error = err
    if isinstance(sys.modules.get("mamba_ssm"), types.ModuleType) and hasattr(sys.modules["mamba_ssm"], "__path__"):
        raise root_error  # the root imported, so the failure is the module's own
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        raise root_error
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    package.__file__ = spec.origin
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{err} (and the package root failed: {root_error})") from err


def _load_causal_conv1d() -> dict:
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d import causal_conv1d_update as conv_update

    return {"causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": conv_update}


def _load_mamba_triton() -> dict:
    ssd = _import_mamba_triton_module("mamba_ssm.ops.triton.ssd_combined")
    update = _import_mamba_triton_module("mamba_ssm.ops.triton.selective_state_update")
    return {
        "mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
        "selective_state_update": update.selective_state_update,
    }


def _load_selective_scan() -> dict:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return {"selective_scan_fn": selective_scan_fn}


_LOADERS = {
    "causal_conv1d": (_load_causal_conv1d, "causal-conv1d"),
    "mamba_triton": (_load_mamba_triton, "mamba-ssm (its Triton kernels)"),
    "selective_scan": (_load_selective_scan, "mamba-ssm (its compiled selective_scan_cuda)"),
}


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, tuple[dict | None, str | None]]:
    """Import each kernel group once: {group: (functions by name, None) or (None, why not)}."""
    groups: dict[str, tuple[dict | None, str | None]] = {}
    for group, (loader, package) in _LOADERS.items():
        try:
            groups[group] = loader(), None
        except Exception as err:  # noqa: BLE001 - a broken install (ImportError, OSError from a .so) reads the same
            groups[group] = None, f"{package} is not importable ({type(err).__name__}: {err})"
    return groups


def kernel_groups() -> dict[str, tuple[bool, str | None]]:
    """{group: (True, None) or (False, the reason)} for "causal_conv1d", "mamba_triton", "selective_scan"."""
    return {group: (fns is not None, reason) for group, (fns, reason) in _load().items()}


def kernels_available(kind: str | None = None) -> tuple[bool, str | None]:
    """(True, None) if the kernels of mixer ``kind`` ("mamba2", "mamba"; None: both) import, else (False, why not)."""
    if kind is not None and kind not in MIXER_GROUPS:
        raise ValueError(f"kind must be one of {sorted(MIXER_GROUPS)} or None, got {kind!r}")
    needed = MIXER_GROUPS[kind] if kind is not None else _ALL_GROUPS
    reasons = [reason for group, (ok, reason) in kernel_groups().items() if group in needed and not ok]
    return (not reasons), ("; ".join(reasons) or None)


def _fn(group: str, name: str):
    fns, reason = _load()[group]
    if fns is None:
        raise RuntimeError(f"CUDA mixer kernel {name} unavailable: {reason}. Install with `{INSTALL_HINT}`.")
    return fns[name]


def _conv_input(x):
    """x (b, d, l) in a layout causal_conv1d takes: length-contiguous, or channels-last with d and
    the batch and length strides multiples of 8 (a (b, l, d) slice of a wider projection is not)."""
    if x.stride(2) == 1:
        return x
    if x.stride(1) == 1 and x.shape[1] % 8 == 0:
        if x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0:
            return x
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def conv_backend() -> str:
    """What the conv wrappers run: "causal-conv1d" (the kernels) or "pure-PyTorch"."""
    return "causal-conv1d" if kernel_groups()["causal_conv1d"][0] else "pure-PyTorch"


def _kernel_width(weight) -> bool:
    return 2 <= weight.shape[-1] <= 4  # causal-conv1d's kernels are built for these widths alone


def causal_conv1d(x, weight, bias=None, activation=None):
    """See ops.conv.causal_conv1d; the pure-PyTorch conv when causal-conv1d does not import or
    has no kernel for the width (d_conv outside 2..4)."""
    if conv_backend() != "causal-conv1d" or not _kernel_width(weight):
        return conv.causal_conv1d(x, weight, bias, activation)
    return _fn("causal_conv1d", "causal_conv1d_fn")(_conv_input(x), weight, bias, activation=activation)


def causal_conv1d_update(x_t, conv_state, weight, bias=None, activation=None, *, inplace=False):
    """See ops.conv.causal_conv1d_update; the pure-PyTorch step as ``causal_conv1d`` falls back."""
    if conv_backend() != "causal-conv1d" or not _kernel_width(weight):
        return conv.causal_conv1d_update(x_t, conv_state, weight, bias, activation, inplace=inplace)
    # NOTE: the kernel shifts the state in place, and wants it in the dtype of x_t; the new state
    # keeps the dtype it came in.
    own = inplace and conv_state.dtype == x_t.dtype
    new_state = conv_state if own else conv_state.to(x_t.dtype, copy=True)
    y = _fn("causal_conv1d", "causal_conv1d_update")(x_t, new_state, weight, bias, activation=activation)
    return y, conv_state.copy_(new_state) if inplace else new_state.to(conv_state.dtype)  # own: a no-op copy


def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False):
    """See ops.ssd.ssd_chunked. The final state comes back in float32, as the pure-PyTorch path's (the kernel passes states in fp32)."""
    fn = _fn("mamba_triton", "mamba_chunk_scan_combined")
    _autotune_cache.sync()  # choices tuned by other processes in; this one's (its last backward too) out
    return fn(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=return_final_state
    )


def ssd_step(x_t, dt_t, A, B_t, C_t, D, state, *, inplace=False):
    """See ops.ssd.ssd_step (the kernel updates the state it is given in place)."""
    nheads, headdim, dstate = state.shape[1:]
    new_state = state if inplace else state.clone()
    # NOTE: zero strides over head_dim let the kernel treat dt, A and D as per-head scalars. The
    # kernel takes that path only if dt_bias has a zero stride too, and it reads dt_bias.stride()
    # without checking for None (AttributeError), so a zero bias is passed.
    dt_bias = dt_t.new_zeros(nheads)[:, None].expand(nheads, headdim)
    y = _fn("mamba_triton", "selective_state_update")(
        new_state,
        x_t,
        dt_t[..., None].expand(-1, -1, headdim),
        A[:, None, None].expand(nheads, headdim, dstate),
        B_t,
        C_t,
        D=None if D is None else D[:, None].expand(nheads, headdim),
        dt_bias=dt_bias,
    )
    return y, new_state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """See ops.selective_scan.selective_scan_ref. NOTE: mamba_ssm's backward ignores the gradient of the last state."""
    return _fn("selective_scan", "selective_scan_fn")(
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


def selective_state_update(
    state, x_t, dt_t, A, B_t, C_t, D=None, z_t=None, dt_bias=None, dt_softplus=False, *, inplace=False
):
    """See ops.selective_scan.selective_state_update (the kernel updates the state it is given in place)."""
    new_state = state if inplace else state.clone()
    y = _fn("mamba_triton", "selective_state_update")(
        new_state, x_t, dt_t, A, B_t, C_t, D=D, z=z_t, dt_bias=dt_bias, dt_softplus=dt_softplus
    )
    return y, new_state
