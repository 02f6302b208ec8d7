"""Forward + backward time of a Llama teacher vs. the same model with every attention replaced
by a linear-time mixer (Mamba2, Mamba), on the machine at hand. Writes JSON and a Markdown report.

    python benchmarks/mixer_speed.py [--quick] [--layers N] [--device cuda] [--dtype bfloat16]
                                     [--out benchmarks/results/mixer_speed.json] [--no-report]

Every model and input lives on ``--device`` (default: cuda if available, else cpu) in
``--dtype`` (default: bfloat16 on CUDA, float32 on CPU); each timing synchronises the device
before and after. The JSON names the device and, per mixer, the kernel its layers resolved
to on it ("cuda" = mamba_ssm / causal_conv1d, "chunked" = pure PyTorch), and on CUDA the
peak memory of each model's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOLLM2_GEOMETRY, llama_teacher, machine, no_cuda_for, output_file, save_partial, stop_if_parse_only, sync, write_result  # noqa: E402
from cald_scale.cli import positive_int  # noqa: E402

from cald_scale.conversion.modeling import ConversionConfig  # noqa: E402
from cald_scale.conversion.surgery import convert_teacher  # noqa: E402
from cald_scale.mixers._common import SequenceMixer  # noqa: E402
from cald_scale.mixers.ops import _cuda  # noqa: E402

TARGETS = {"mamba2": 1.5, "mamba": 3.0}


def fwd_bwd_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    """One forward + backward, timed from a synchronised device to a synchronised device."""
    sync(input_ids.device)  # time the kernels, not their launch
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(input_ids.device)
    return time.perf_counter() - start


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolved_kernels(model: nn.Module, device: torch.device) -> list[str]:
    """The distinct kernels the model's mixers run on ``device`` (resolving logs any fallback)."""
    return sorted({m.kernel(device) for m in model.modules() if isinstance(m, SequenceMixer)})


def _where(model: nn.Module) -> str:
    """Device and dtype of every parameter, e.g. "cuda:0 torch.bfloat16" (several joined by ", ")."""
    return ", ".join(sorted({f"{p.device} {p.dtype}" for p in model.parameters()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers, fewer repeats (< 2 min on 2 cores)")
    parser.add_argument("--layers", type=positive_int, default=None, help="layers (default: 6 with --quick, else 30)")
    parser.add_argument("--out", type=output_file, default=None, help="default: benchmarks/results/mixer_speed[_quick].json")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--no-report", action="store_true", help="write the JSON only, no dated Markdown report")
    args = parser.parse_args()
    device = torch.device(args.device)
    if no_cuda_for(device):
        parser.error("--device cuda but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    stop_if_parse_only(args)

    partial_out = args.out  # partial results go only to an explicit --out (save_partial)
    args.out = args.out or Path(__file__).resolve().parent / "results" / ("mixer_speed_quick.json" if args.quick else "mixer_speed.json")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    layers = args.layers or (6 if args.quick else SMOLLM2_GEOMETRY["num_hidden_layers"])
    repeats = args.repeats or (3 if args.quick else 5)
    teacher = llama_teacher(layers).train()
    # The students are what the conversion builds by default (teacher-matched Mamba2, Mamba expand 2).
    students = {kind: convert_teacher(teacher, ConversionConfig(mixer=kind)).train() for kind in TARGETS}
    configs = {kind: student.config.conversion_config().mixer_config() for kind, student in students.items()}
    models = {name: model.to(device=device, dtype=dtype) for name, model in ({"teacher": teacher} | students).items()}
    input_ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seqlen), device=device)
    placement = {name: _where(model) for name, model in models.items()}
    for name, model in models.items():  # NOTE: a model left behind would time the wrong device
        if any(p.device != input_ids.device for p in model.parameters()):
            raise RuntimeError(f"{name} parameters are on {placement[name]}, not all on {input_ids.device}")
    kernels = {kind: resolved_kernels(models[kind], device) for kind in students}
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}; "
          f"mixer kernels {kernels}; kernel groups {_cuda.kernel_groups()}", flush=True)

    # NOTE: models take turns in every round, so load from other processes hits all alike;
    # the load average is recorded because shared cores still distort the numbers.
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in models}
    peak_gb: dict[str, float] = {}
    for round_idx in range(repeats + 1):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                # NOTE: every model stays on the device: the peak counts this model's own weights,
                # not the others' (0.62 GiB of the students' on the teacher's figure before).
                others = torch.cuda.memory_allocated(device) - _param_bytes(model)
            seconds = fwd_bwd_seconds(model, input_ids)
            if device.type == "cuda":
                peak_gb[name] = max(peak_gb.get(name, 0.0), (torch.cuda.max_memory_allocated(device) - others) / 2**30)
            if round_idx > 0:  # round 0 is warm-up (and Triton's autotuning)
                times[name].append(seconds)
            print(f"round {round_idx} {name:8s} {seconds:.3f} s", flush=True)
        partial = {"benchmark": "mixer_speed", "device_type": device.type, "mixer_kernels": kernels, "times_s": times, "peak_memory_gb": peak_gb or None}
        save_partial(partial, partial_out, done=f"{round_idx} of {repeats} timed rounds")  # a step cut by its cap keeps it

    teacher_s = statistics.median(times["teacher"])
    result = {
        "benchmark": "mixer_speed",
        "machine": machine(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "parameters_on": placement,
        "mixer_kernels": kernels,
        "kernel_groups": {g: {"importable": ok, "reason": why} for g, (ok, why) in _cuda.kernel_groups().items()},
        "peak_memory_gb": peak_gb or None,
        "shapes": {"batch": args.batch, "seqlen": args.seqlen, "dtype": str(dtype).removeprefix("torch."), **SMOLLM2_GEOMETRY, "num_hidden_layers": layers},
        "mixer_configs": {kind: dataclasses.asdict(cfg) for kind, cfg in configs.items()},
        "repeats": repeats,
        "teacher_s": teacher_s,
        "mixers": {},
        "targets": TARGETS,
        "pass": {},
    }
    for kind in configs:
        student_s = statistics.median(times[kind])
        ratio = student_s / teacher_s
        paired = statistics.median(s / t for s, t in zip(times[kind], times["teacher"], strict=True))
        result["mixers"][kind] = {
            "student_s": student_s,
            "ratio": ratio,
            "ratio_median_of_rounds": paired,
            "all_s": times[kind],
        }
        result["pass"][kind] = ratio <= TARGETS[kind]
    result["teacher_all_s"] = times["teacher"]

    write_result(args.out.stem, result, str(args.out))
    if args.no_report:
        return
    date = result["machine"]["date"]
    lines = [
        f"# Mixer speed ({date})",
        "",
        f"Hardware: {result['machine']['cpu_count']} cores ({result['machine']['cpu']}), {result['machine'].get('gpu', 'no GPU')}; "
        f"torch {result['machine']['torch']}, transformers {result['machine']['transformers']}.",
        f"Forward + backward on {result['device']}, batch {args.batch} x {args.seqlen} tokens, {result['shapes']['dtype']}, {layers} layers, median of {repeats}.",
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
        "(other processes on the same cores slow everything, unevenly).",
        "",
        "| model | seconds | ratio to teacher | target | pass |",
        "|---|---|---|---|---|",
        f"| teacher (Llama, sdpa) | {teacher_s:.3f} | 1.00 | | |",
    ]
    for kind, row in result["mixers"].items():
        lines.append(
            f"| {kind} ({'/'.join(kernels[kind])} kernel) | {row['student_s']:.3f} | {row['ratio']:.2f} "
            f"| <= {TARGETS[kind]} | {result['pass'][kind]} |"
        )
    report = args.out.with_name(f"{args.out.stem}_{date[:10]}.md")
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
