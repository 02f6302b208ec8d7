"""Numerical parity of every kernel path of the Mamba / Mamba2 mixers against a float64 oracle.

    python benchmarks/kernel_parity.py [--device cuda] [--dtypes float32,bfloat16] [--shapes small,smollm2]
                                       [--out benchmarks/results/kernel_parity_<cpu|cuda>.json] [--time-budget 150]

The oracle is the same mixer (same weights and inputs, rounded to the dtype under test) with
the sequential "ref" kernel on the CPU in float64. Each path runs in the dtype under test:

- on a GPU machine: ``cuda:ref``, ``cuda:chunked`` (the pure-PyTorch paths on the GPU),
  ``cuda:cuda`` (mamba_ssm / causal_conv1d, when the mixer's kernel "cuda" resolves) and
  ``cpu:chunked`` (the CPU path);
- without a GPU: ``cpu:ref`` and ``cpu:chunked`` (so the script is testable anywhere).

The first path listed is the baseline: the reference algorithm in the dtype under test;
every other check carries its error beside its own (``baseline_rel_norm``), which says how
much of an error is the dtype's rather than the path's.

Checked per path: the forward output; gradients of the input and of every parameter (of
sum(out * w), w fixed random); prefill output and final state (conv and SSM) of all tokens
but the last; one ``step`` on the last token (output and new state). On a GPU, each kernel
group that imports is also checked op by op (SSD scan and step, selective scan and step,
causal conv and its update) against its float64 reference, so a group that imports alone
(e.g. mamba_ssm's Triton SSD without causal-conv1d) is still tested. Errors: max |a - o|,
max |a - o| / max |o|, and ||a - o|| / ||o|| (rel_norm); a check passes when everything is
finite, rel_norm <= tol and max_rel <= 2 tol (tolerances per dtype and path, see TOLERANCES).
Exit status 1 if any check fails, or if the run is incomplete (``--time-budget`` cut checks:
``summary.complete`` is false, and so is ``summary.pass``), or, on a GPU, if a kernel path could
not run (a wheel missing or broken: ``summary.kernel_paths_not_run``). The JSON is written at the
start and rewritten after each op and each mixer's paths, so a run stopped by a timeout keeps
what it finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, no_cuda_for, output_file, stop_if_parse_only, sync  # noqa: E402
from cald_scale.cli import positive_int  # noqa: E402

from cald_scale.fileio import atomic_write_text  # noqa: E402
from cald_scale.mixers import Mamba2Config, MambaConfig, build_mixer  # noqa: E402
from cald_scale.mixers.ops import _autotune_cache, _cuda, conv, selective_scan, ssd  # noqa: E402

# Relative-norm tolerance per dtype and kind of quantity. Pure-PyTorch fp32 paths land near
# 1e-6. The kernel paths' fp32 allows for TF32 (Triton's default for fp32 dots: about 3e-4
# relative); bf16 for bf16 activations and weights (2^-8 = 4e-3 per rounding; measured on
# the CPU paths: forward 5e-3, gradients 1e-2 at worst).
TOLERANCES = {
    "float32": {"forward": 1e-4, "grad": 1e-4, "state": 1e-4, "step": 1e-4},
    "float32_kernel": {"forward": 2e-3, "grad": 5e-3, "state": 2e-3, "step": 2e-3},
    "bfloat16": {"forward": 3e-2, "grad": 5e-2, "state": 3e-2, "step": 3e-2},
}
KERNEL_PATHS = ("cuda:cuda", "cuda:kernel")
# Tolerance multipliers for ill-conditioned quantities. Mamba2's D gradient is
# sum(grad_y * x) per head, and with one norm group per head (the smollm2 shape) the
# scale-invariant gated RMS norm makes grad_y orthogonal to y = ssd(x) + D x in every
# group, so the sum cancels down to a small remainder: the float64 "ref" path itself run
# in bf16 lands 7e-2 off (every other quantity: <= 1.1e-2).
ILL_CONDITIONED = {("mamba2", "grad.D"): 3.0}
MAX_REL_FACTOR = 2.0
OUT_OF_TIME = "time budget spent"  # the skip reason that leaves a run incomplete

# Mixer geometries. "smollm2" is what conversion builds for SmolLM2-135M: Mamba2 with the
# teacher's 9 heads x 64, d_state 64, one group per head, expand 1; Mamba with the defaults.
SHAPES = {
    "small": dict(
        hidden=64,
        batch=2,
        seqlen=100,  # not a multiple of the chunk size: the padded tail is exercised
        mamba2=dict(head_dim=16, d_state=16, n_groups=2, expand=1, chunk_size=32),
        mamba=dict(d_state=8, expand=2),
    ),
    "smollm2": dict(
        hidden=576,
        batch=2,
        seqlen=256,
        mamba2=dict(head_dim=64, num_heads=9, d_state=64, n_groups=9, expand=1, chunk_size=64),
        mamba=dict(d_state=16, expand=2),
    ),
}
# Time steps large enough that the state carries information over tens of tokens.
DT_RANGE = dict(dt_min=0.01, dt_max=0.2)


def errors(actual: torch.Tensor | None, expected: torch.Tensor) -> dict:
    """max_abs, max_rel (to the largest |expected|), rel_norm and finiteness of actual vs expected."""
    if actual is None:
        return {"max_abs": None, "max_rel": None, "rel_norm": None, "finite": False, "error": "missing"}
    a, e = actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return {
            "max_abs": None,
            "max_rel": None,
            "rel_norm": None,
            "finite": False,
            "error": f"shape {tuple(a.shape)} != {tuple(e.shape)}",
        }
    finite = bool(torch.isfinite(a).all())
    diff = (a - e).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    norm = e.norm().item()
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / max(scale, 1e-30),
        "rel_norm": diff.norm().item() / max(norm, 1e-30),
        "finite": finite,
    }


def judge(errs: dict, tol: float) -> bool:
    return bool(
        errs.get("finite")
        and errs.get("rel_norm") is not None
        and errs["rel_norm"] <= tol
        and errs["max_rel"] <= MAX_REL_FACTOR * tol
    )


def category(quantity: str) -> str:
    head = quantity.split(".", 1)[0]
    return {"forward": "forward", "grad": "grad", "prefill": "state", "step": "step", "step_inplace_keep": "step"}[head]


# ----------------------------------------------------------------------------- mixer level


def mixer_config(kind: str, shape: dict, kernel: str):
    if kind == "mamba2":
        return Mamba2Config(**shape["mamba2"], **DT_RANGE, kernel=kernel)
    return MambaConfig(**shape["mamba"], **DT_RANGE, kernel=kernel)


def run_mixer(
    kind: str,
    shape: dict,
    state_dict: dict,
    x: torch.Tensor,
    w: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    kernel: str,
) -> dict[str, torch.Tensor]:
    """Every checked quantity of one path, on the CPU in float64 (for comparison)."""
    mixer = build_mixer(kind, mixer_config(kind, shape, kernel), shape["hidden"]).to(device=device, dtype=dtype)
    mixer.load_state_dict(state_dict)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xd = x.to(device=device, dtype=dtype, copy=True).requires_grad_()
    out = mixer(xd)
    (out.to(out_dtype) * w.to(device=device, dtype=out_dtype)).sum().backward()
    res = {"forward.out": out, "grad.input": xd.grad}
    res |= {f"grad.{name}": p.grad for name, p in mixer.named_parameters()}
    with torch.no_grad():
        prefix, last = xd.detach()[:, :-1], xd.detach()[:, -1:]
        out_p, state = mixer.prefill(prefix)
        res |= {"prefill.out": out_p, "prefill.conv_state": state.conv_state, "prefill.ssm_state": state.ssm_state}
        y_t, state = mixer.step(last, state)
        res |= {"step.out": y_t, "step.conv_state": state.conv_state, "step.ssm_state": state.ssm_state}
        # The step generation runs (MixerAsAttention): the cache's state updated in place, and a
        # padding row (keep 0, the last one) whose state must not move.
        _, state = mixer.prefill(prefix)
        keep = torch.ones(last.shape[0], device=device, dtype=dtype)
        keep[-1] = 0
        y_k, state = mixer.step(last, state, inplace=True, keep=keep)
        res |= {"step_inplace_keep.out": y_k, "step_inplace_keep.conv_state": state.conv_state, "step_inplace_keep.ssm_state": state.ssm_state}
    sync(device)
    return {k: (None if v is None else v.detach().to("cpu", torch.float64)) for k, v in res.items()}


def cuda_unavailable(kind: str, shape: dict, device: torch.device) -> str | None:
    """Why a mixer asked for kernel "cuda" cannot run it on ``device`` (None: it can), as the mixer resolves it."""
    try:
        build_mixer(kind, mixer_config(kind, shape, "cuda"), shape["hidden"]).kernel(device)
    except RuntimeError as err:
        return str(err)
    return None


def mixer_paths(device: torch.device) -> list[tuple[str, str]]:
    """The paths to run, the baseline first (the reference algorithm in the dtype under test).

    NOTE: on a GPU machine the sequential reference runs on the GPU only (on the CPU it costs
    seconds per check, which the lease is short of); the CPU path is "chunked".
    """
    if device.type == "cuda":
        return [("cuda", "ref"), ("cuda", "chunked"), ("cuda", "cuda"), ("cpu", "chunked")]
    return [("cpu", "ref"), ("cpu", "chunked")]


# -------------------------------------------------------------------------------- op level


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def op_cases(shape: dict, gen: torch.Generator) -> dict:
    """Float64 CPU inputs of each op, at the mixer geometry of ``shape``."""
    b, seqlen, hidden = shape["batch"], shape["seqlen"], shape["hidden"]
    m2 = shape["mamba2"]
    h = m2.get("num_heads") or m2["expand"] * hidden // m2["head_dim"]
    p, g, n = m2["head_dim"], m2["n_groups"], m2["d_state"]
    d, n1 = shape["mamba"]["expand"] * hidden, shape["mamba"]["d_state"]
    conv_dim = h * p + 2 * g * n
    # A conv input that is a channels-last slice of a wider projection, as in Mamba2.
    wide = _rand(gen, b, seqlen, conv_dim + h * p + h)
    return {
        "ssd": dict(
            x=_rand(gen, b, seqlen, h, p),
            dt=torch.rand(b, seqlen, h, generator=gen, dtype=torch.float64) * 0.2 + 0.01,
            A=-(torch.rand(h, generator=gen, dtype=torch.float64) * 15 + 1),
            B=_rand(gen, b, seqlen, g, n),
            C=_rand(gen, b, seqlen, g, n),
            D=_rand(gen, h),
            initial_state=_rand(gen, b, h, p, n),
        ),
        "ssd_step": dict(
            x_t=_rand(gen, b, h, p),
            dt_t=torch.rand(b, h, generator=gen, dtype=torch.float64) * 0.2 + 0.01,
            A=-(torch.rand(h, generator=gen, dtype=torch.float64) * 15 + 1),
            B_t=_rand(gen, b, g, n),
            C_t=_rand(gen, b, g, n),
            D=_rand(gen, h),
            state=_rand(gen, b, h, p, n),
        ),
        "selective_scan": dict(
            u=_rand(gen, b, d, seqlen),
            delta=_rand(gen, b, d, seqlen) * 0.5 - 2,
            A=-torch.rand(d, n1, generator=gen, dtype=torch.float64) * n1 - 0.5,
            B=_rand(gen, b, n1, seqlen),
            C=_rand(gen, b, n1, seqlen),
            D=_rand(gen, d),
            z=_rand(gen, b, d, seqlen),
            delta_bias=_rand(gen, d) * 0.5,
        ),
        "selective_state_update": dict(
            state=_rand(gen, b, d, n1),
            x_t=_rand(gen, b, d),
            dt_t=_rand(gen, b, d) * 0.5 - 2,
            A=-torch.rand(d, n1, generator=gen, dtype=torch.float64) * n1 - 0.5,
            B_t=_rand(gen, b, n1),
            C_t=_rand(gen, b, n1),
            D=_rand(gen, d),
            z_t=_rand(gen, b, d),
            dt_bias=_rand(gen, d) * 0.5,
        ),
        "causal_conv1d": dict(
            wide=wide, conv_dim=conv_dim, weight=_rand(gen, conv_dim, 4) * 0.5, bias=_rand(gen, conv_dim)
        ),
        "causal_conv1d_update": dict(
            x_t=_rand(gen, b, conv_dim),
            conv_state=_rand(gen, b, conv_dim, 4),
            weight=_rand(gen, conv_dim, 4) * 0.5,
            bias=_rand(gen, conv_dim),
        ),
    }


# Per op: the kernel group it needs, the inputs held in fp32 whatever the dtype (as the mixers
# pass them), the differentiable inputs, and how to call it. NOTE: in the order they run, the
# SSD scan last: Triton tunes it for about 90 s on first use (the second GPU run), and a time
# budget spent there must not cut the kernels that take seconds.
OPS = {
    "causal_conv1d": ("causal_conv1d", set(), ("x", "weight", "bias")),
    "causal_conv1d_update": ("causal_conv1d", set(), ()),
    "selective_scan": (
        "selective_scan",
        {"A", "D", "delta_bias"},
        ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
    ),
    "selective_state_update": ("mamba_triton", {"A", "D", "dt_bias"}, ()),
    "ssd_step": ("mamba_triton", {"dt_t", "A"}, ()),
    "ssd": ("mamba_triton", {"dt", "A"}, ("x", "dt", "A", "B", "C", "D", "initial_state")),
}
PURE = {
    "ssd": ssd.ssd_chunked,
    "ssd_step": ssd.ssd_step,
    "selective_scan": selective_scan.selective_scan_cpu,
    "selective_state_update": selective_scan.selective_state_update,
    "causal_conv1d": conv.causal_conv1d,
    "causal_conv1d_update": conv.causal_conv1d_update,
}
REFERENCE = PURE | {"ssd": ssd.ssd_ref, "selective_scan": selective_scan.selective_scan_ref}
CUDA = {
    "ssd": _cuda.ssd_chunked,
    "ssd_step": _cuda.ssd_step,
    "selective_scan": _cuda.selective_scan,
    "selective_state_update": _cuda.selective_state_update,
    "causal_conv1d": _cuda.causal_conv1d,
    "causal_conv1d_update": _cuda.causal_conv1d_update,
}


def run_op(op: str, fn, case: dict, chunk_size: int, device: torch.device, dtype: torch.dtype, gen_seed: int) -> dict:
    """Outputs (and gradients) of one op implementation, on the CPU in float64."""
    _, fp32_inputs, grad_names = OPS[op]
    keep = torch.float64 if dtype == torch.float64 else torch.float32

    def cast(name, t):
        return t.to(device=device, dtype=keep if name in fp32_inputs else dtype)

    res: dict[str, torch.Tensor | None] = {}
    if op == "causal_conv1d":
        conv_dim = case["conv_dim"]
        leaf = case["wide"].to(device=device, dtype=dtype).requires_grad_()
        x = leaf[..., :conv_dim].transpose(1, 2)  # (b, d, l), channels-last, stride(2) not a multiple of 8
        weight, bias = cast("weight", case["weight"]).requires_grad_(), cast("bias", case["bias"]).requires_grad_()
        out = fn(x, weight, bias, "silu")
        outs = {"out": out}
        inputs = {"x": leaf, "weight": weight, "bias": bias}
    elif op in ("ssd", "selective_scan"):
        inputs = {k: cast(k, v).requires_grad_() for k, v in case.items()}
        if op == "ssd":
            y, final = fn(**inputs, chunk_size=chunk_size, return_final_state=True)
            outs = {"out": y, "final_state": final}
        else:
            out, last = fn(**inputs, delta_softplus=True, return_last_state=True)
            outs = {"out": out, "final_state": last}
    else:
        args = {k: cast(k, v) for k, v in case.items()}
        if op == "ssd_step":
            y, new = fn(args["x_t"], args["dt_t"], args["A"], args["B_t"], args["C_t"], args["D"], args["state"])
        elif op == "selective_state_update":
            y, new = fn(**args, dt_softplus=True)
        else:
            y, new = fn(**args, activation="silu")
        outs = {"out": y, "state": new}
        inputs = {}
    if grad_names:
        # NOTE: only the output carries a loss (mamba_ssm's selective scan ignores the last state's gradient).
        w = torch.randn(outs["out"].shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64)
        loss = (outs["out"].to(keep) * w.to(device=device, dtype=keep)).sum()
        names = [n for n in grad_names if n in inputs]
        grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if op == "causal_conv1d" and name == "x":
                grad = None if grad is None else grad[..., : case["conv_dim"]].transpose(1, 2)
            res[f"grad.{name}"] = grad
    if op.endswith(("step", "update")):
        res |= {f"step.{k}": v for k, v in outs.items()}
    else:
        res |= {"forward.out": outs["out"]} | {f"prefill.{k}": v for k, v in outs.items() if k != "out"}
    sync(device)
    return {k: (None if v is None else v.detach().to("cpu", torch.float64)) for k, v in res.items()}


# ------------------------------------------------------------------------------------ main


class Report:
    """The JSON result, rewritten after each group of checks."""

    def __init__(self, out: Path, header: dict, baseline_path: str, *, kernels_required: bool) -> None:
        self.out = out
        self.data = header | {"checks": [], "skipped": [], "errors": []}
        self.baseline_path = baseline_path
        # On a GPU the kernels are what is checked: a kernel path that could not run fails the run.
        self.kernels_required = kernels_required
        self.baseline: dict[tuple, float | None] = {}
        # Set by the last write: every earlier file is a run in progress, and a run killed
        # mid-way (the step's cap, a crash outside a check) must not read as complete.
        self.finished = False

    def compare(self, where: dict, results: dict, oracle: dict, dtype_name: str) -> None:
        for quantity, expected in oracle.items():
            if expected is None:
                continue
            key = (
                f"{dtype_name}_kernel"
                if f"{dtype_name}_kernel" in TOLERANCES and where["path"] in KERNEL_PATHS
                else dtype_name
            )
            tol = TOLERANCES[key][category(quantity)] * ILL_CONDITIONED.get((where.get("mixer"), quantity), 1.0)
            errs = errors(results.get(quantity), expected)
            check = where | {"quantity": quantity, **errs, "tol": tol, "pass": judge(errs, tol)}
            # Context: how far the reference algorithm itself (CPU, same dtype) lands from the oracle.
            key = self._key(where, quantity)
            if where["path"] == self.baseline_path:
                self.baseline[key] = errs["rel_norm"]
            elif self.baseline.get(key) is not None:
                baseline = self.baseline[key]
                check["baseline_rel_norm"] = baseline
            self.data["checks"].append(check)

    @staticmethod
    def _key(where: dict, quantity: str) -> tuple:
        return tuple(where.get(k) for k in ("level", "mixer", "op", "shape", "dtype")) + (quantity,)

    def skip(self, where: dict, why: str) -> None:
        self.data["skipped"].append(where | {"why": why})
        print(f"  skipped {where}: {why}", flush=True)

    def error(self, where: dict, err: BaseException) -> None:
        tail = "".join(traceback.format_exception(err)[-6:])
        self.data["errors"].append(where | {"error": f"{type(err).__name__}: {err}", "traceback_tail": tail})
        print(f"  ERROR {where}: {type(err).__name__}: {err}", flush=True)

    def summary(self) -> dict:
        by_path: dict[str, dict] = {}
        for c in self.data["checks"]:
            s = by_path.setdefault(c["path"], {"checks": 0, "failed": 0, "worst_rel_norm": 0.0, "worst": None})
            s["checks"] += 1
            s["failed"] += not c["pass"]
            ratio = (c["rel_norm"] / c["tol"]) if c["rel_norm"] is not None else float("inf")
            if s["worst"] is None or ratio > s["worst"]["rel_norm_over_tol"]:
                s["worst"] = {
                    k: c[k]
                    for k in ("level", "mixer", "op", "shape", "dtype", "quantity", "rel_norm", "max_rel", "tol")
                    if k in c
                }
                s["worst"]["rel_norm_over_tol"] = ratio
                s["worst_rel_norm"] = c["rel_norm"]
        failed = sum(not c["pass"] for c in self.data["checks"])
        # A path skipped because it cannot run here (no CUDA, a kernel group that does not import)
        # is listed; one cut by --time-budget, or killed before its last write, leaves the run
        # incomplete, and an incomplete run (or one that checked nothing) does not pass.
        out_of_time = sum(s["why"] == OUT_OF_TIME for s in self.data["skipped"])
        untested = [s for s in self.data["skipped"] if s["why"] != OUT_OF_TIME and s["path"] in KERNEL_PATHS]
        return {
            "checks": len(self.data["checks"]),
            "failed": failed,
            "errors": len(self.data["errors"]),
            "skipped": len(self.data["skipped"]),
            "skipped_for_time": out_of_time,
            "finished": self.finished,
            "complete": self.finished and out_of_time == 0,
            "kernel_paths_not_run": len(untested),
            "pass": failed == 0
            and not self.data["errors"]
            and self.finished
            and out_of_time == 0
            and bool(self.data["checks"])
            and not (self.kernels_required and untested),
            "by_path": by_path,
        }

    def write(self, *, finished: bool = False) -> None:
        self.finished = finished
        self.data["summary"] = self.summary()
        atomic_write_text(self.out, json.dumps(self.data, indent=1, default=str))


def mixer_level(
    report: Report,
    device: torch.device,
    shapes: list[str],
    dtypes: list[str],
    seqlen: int | None,
    over_budget,
    groups: dict,
) -> None:
    """Every mixer path against the float64 oracle."""
    for shape_name in shapes:
        shape = SHAPES[shape_name] | ({"seqlen": seqlen} if seqlen else {})
        for kind in ("mamba2", "mamba"):
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                seed = zlib.crc32(f"{shape_name} {kind} {dtype_name}".encode())
                gen = torch.Generator().manual_seed(seed)
                torch.manual_seed(seed)
                master = build_mixer(kind, mixer_config(kind, shape, "ref"), shape["hidden"])
                state_dict = {k: v.to(dtype) for k, v in master.state_dict().items()}
                x = torch.randn(shape["batch"], shape["seqlen"], shape["hidden"], generator=gen).to(dtype)
                w = torch.randn(shape["batch"], shape["seqlen"], shape["hidden"], generator=gen)
                base = {"level": "mixer", "mixer": kind, "shape": shape_name, "dtype": dtype_name}
                if over_budget():
                    report.skip(base | {"path": "all"}, OUT_OF_TIME)
                    continue
                t0 = time.perf_counter()
                oracle = run_mixer(
                    kind,
                    shape,
                    {k: v.double() for k, v in state_dict.items()},
                    x.double(),
                    w,
                    torch.device("cpu"),
                    torch.float64,
                    "ref",
                )
                print(f"[{shape_name} {kind} {dtype_name}] oracle {time.perf_counter() - t0:.1f} s", flush=True)
                for dev, kernel in mixer_paths(device):
                    where = base | {"path": f"{dev}:{kernel}"}
                    if over_budget():
                        report.skip(where, OUT_OF_TIME)
                        continue
                    if kernel == "cuda" and (why := cuda_unavailable(kind, shape, torch.device(dev))):
                        report.skip(where, why)
                        continue
                    t0 = time.perf_counter()
                    try:
                        results = run_mixer(kind, shape, state_dict, x, w, torch.device(dev), dtype, kernel)
                    except Exception as err:  # noqa: BLE001 - a crashing path is a finding, recorded as a failure
                        report.error(where, err)
                        continue
                    report.compare(where | {"seconds": round(time.perf_counter() - t0, 3)}, results, oracle, dtype_name)
                    fails = [
                        c
                        for c in report.data["checks"]
                        if c.get("path") == where["path"]
                        and not c["pass"]
                        and all(c.get(k) == where[k] for k in ("mixer", "shape", "dtype"))
                    ]
                    print(
                        f"  {where['path']:13s} {time.perf_counter() - t0:6.1f} s  failed {len(fails)}"
                        + (f": {[c['quantity'] for c in fails][:6]}" if fails else ""),
                        flush=True,
                    )
                report.write()


def op_level(
    report: Report,
    device: torch.device,
    shapes: list[str],
    dtypes: list[str],
    seqlen: int | None,
    over_budget,
    groups: dict,
) -> None:
    """Each importable kernel group on the GPU, at the first shape asked for (Triton tunes per
    shape and dtype); on the CPU the pure ops at the small shape (a check of the harness)."""
    op_impls = {"cuda": CUDA} if device.type == "cuda" else {"cpu": PURE}
    for shape_name in shapes[:1] if device.type == "cuda" else [s for s in shapes if s == "small"]:
        shape = SHAPES[shape_name] | ({"seqlen": seqlen} if seqlen else {})
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            seed = zlib.crc32(f"ops {shape_name} {dtype_name}".encode())
            cases = op_cases(shape, torch.Generator().manual_seed(seed))
            # Inputs rounded to the dtype under test, so the oracle sees what the op sees.
            for op, (group, fp32_inputs, _) in OPS.items():
                rounded = {
                    k: (v.to(dtype).double() if isinstance(v, torch.Tensor) and k not in fp32_inputs else v)
                    for k, v in cases[op].items()
                }
                for dev, impls in op_impls.items():
                    where = {
                        "level": "op",
                        "op": op,
                        "shape": shape_name,
                        "dtype": dtype_name,
                        "path": f"{dev}:{'kernel' if dev == 'cuda' else 'pure'}",
                        "group": group if dev == "cuda" else None,
                    }
                    if dev == "cuda" and not groups[group][0]:
                        report.skip(where, groups[group][1])
                        continue
                    if over_budget():
                        report.skip(where, OUT_OF_TIME)
                        continue
                    chunk = shape["mamba2"]["chunk_size"]
                    t0 = time.perf_counter()
                    try:
                        oracle = run_op(op, REFERENCE[op], rounded, chunk, torch.device("cpu"), torch.float64, seed)
                        results = run_op(op, impls[op], rounded, chunk, torch.device(dev), dtype, seed)
                    except Exception as err:  # noqa: BLE001
                        report.error(where, err)
                        continue
                    seconds = time.perf_counter() - t0
                    report.compare(where | {"seconds": round(seconds, 3)}, results, oracle, dtype_name)
                    print(f"[op {op} {shape_name} {dtype_name}] {where['path']} {seconds:6.1f} s", flush=True)
                # NOTE: after every op, so a step's cap (SIGKILL after SIGTERM) keeps what finished.
                report.write()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default="small,smollm2", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--seqlen", type=positive_int, default=None, help="override every shape's sequence length")
    parser.add_argument(
        "--levels", default="op,mixer", help="comma-separated, of op (each kernel alone) and mixer (whole mixers, every path)"
    )
    parser.add_argument("--out", type=output_file, default=None, help="default benchmarks/results/kernel_parity_<device type>.json")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; later checks are skipped (and listed) past it"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out = args.out or Path(__file__).resolve().parent / "results" / f"kernel_parity_{device.type}.json"
    if no_cuda_for(device):
        parser.error("--device cuda but torch.cuda.is_available() is False")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name in dtypes:
        if name not in ("float32", "bfloat16"):
            parser.error(f"dtype {name!r} is not float32 or bfloat16")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"shape {name!r} not in {sorted(SHAPES)}")
    level_names = [name.strip() for name in args.levels.split(",") if name.strip()]
    if not level_names or set(level_names) - {"op", "mixer"}:
        parser.error(f"--levels {args.levels!r}: give op, mixer or both")
    stop_if_parse_only(args)
    started = time.perf_counter()

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - started > args.time_budget

    groups = _cuda.kernel_groups()
    baseline_path = "{}:{}".format(*mixer_paths(device)[0])
    resolved = {kind: cuda_unavailable(kind, SHAPES["small"], device) or "cuda" for kind in ("mamba2", "mamba")}
    header = {
        "benchmark": "kernel_parity",
        "machine": machine(),
        "levels": level_names,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            **{pkg: _version(pkg) for pkg in ("triton", "mamba_ssm", "causal_conv1d", "transformers")},
        },
        "kernel_groups": {g: {"importable": ok, "reason": why} for g, (ok, why) in groups.items()},
        "mixer_kernel_cuda": resolved,
        "cuda_path_conv": _cuda.conv_backend(),
        # NOTE: any config of a Triton kernel computes the same function; tuning only picks the fastest.
        "triton_configs": "each autotuned kernel's smallest config, untuned (CALD_TRITON_UNTUNED=1)"
        if os.environ.get(_autotune_cache.UNTUNED_VAR) == "1"
        else "tuned (Triton's autotuning, choices shared through CALD_TRITON_AUTOTUNE_CACHE when set)",
        "oracle": "same weights and inputs (rounded to the dtype under test), kernel 'ref', CPU, float64",
        "tolerances": {
            "rel_norm": TOLERANCES,
            "max_rel": f"{MAX_REL_FACTOR} x rel_norm tolerance",
            "float32_kernel_applies_to": KERNEL_PATHS,
            "multipliers": {f"{k[0]} {k[1]}": v for k, v in ILL_CONDITIONED.items()},
        },
        "baseline_rel_norm": f"the error of path {baseline_path} (the reference algorithm in the same dtype) "
        "on the same check, for context",
        "shapes": {name: SHAPES[name] | ({"seqlen": args.seqlen} if args.seqlen else {}) for name in shapes},
        "dt_init": DT_RANGE,
    }
    report = Report(args.out, header, baseline_path, kernels_required=device.type == "cuda")
    report.write()  # the header at once: a run cut before its first check still says what it was
    print(f"kernel_parity on {header['device']}: kernel groups {json.dumps(header['kernel_groups'])}", flush=True)

    levels = [level for name, level in (("mixer", mixer_level), ("op", op_level)) if name in level_names]
    if device.type == "cuda":
        levels.reverse()  # the kernels op by op first: they alone run when only some kernel groups import
    # NOTE: dtype by dtype, both levels each: on the first GPU run the float32 op checks (Triton
    # autotuning anew) outlasted the step's cap and the bf16 mixer checks never ran.
    for dtype_name in dtypes:
        for level in levels:
            level(report, device, shapes, [dtype_name], args.seqlen, over_budget, groups)

    report.write(finished=True)
    summary = report.data["summary"]
    print(
        f"\nkernel_parity on {header['device']}: {summary['checks']} checks, {summary['failed']} failed, "
        f"{summary['errors']} errors, {summary['skipped']} skipped ({summary['skipped_for_time']} cut by --time-budget: "
        f"{'complete' if summary['complete'] else 'incomplete, so no pass'}; "
        f"{summary['kernel_paths_not_run']} kernel path(s) could not run"
        f"{', so no pass' if report.kernels_required and summary['kernel_paths_not_run'] else ''}) -> {args.out}"
    )
    print(f"{'path':16s} {'checks':>6s} {'failed':>6s}  worst (rel_norm / tol)")

    def what(row: dict) -> str:
        return f"{row.get('mixer') or row.get('op')} {row.get('shape')} {row.get('dtype')}"

    for path, row in summary["by_path"].items():
        worst = row["worst"] or {}
        errs = f"{worst.get('rel_norm', 0):.2e} / {worst.get('tol', 0):.0e}"
        print(f"{path:16s} {row['checks']:6d} {row['failed']:6d}  {errs}  {what(worst)} {worst.get('quantity')}")
    for skipped in report.data["skipped"][:20]:
        print(f"skipped: {what(skipped)} {skipped['path']}: {skipped['why'][:160]}")
    for err in report.data["errors"][:20]:
        print(f"ERROR: {what(err)} {err['path']}: {err['error'][:300]}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
