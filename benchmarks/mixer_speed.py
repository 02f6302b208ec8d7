"""Forward + backward time of a Llama teacher vs. the same model with every attention replaced
by a linear-time mixer (Mamba2, Mamba), on the machine at hand. Writes JSON and a Markdown report.

    python benchmarks/mixer_speed.py [--quick] [--out benchmarks/results/mixer_speed.json]
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
from _common import SMOLLM2_GEOMETRY, llama_teacher, machine, write_result  # noqa: E402

from cald_scale.conversion.modeling import ConversionConfig  # noqa: E402
from cald_scale.conversion.surgery import convert_teacher  # noqa: E402

TARGETS = {"mamba2": 1.5, "mamba": 3.0}


def fwd_bwd_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    cuda = input_ids.is_cuda
    if cuda:
        torch.cuda.synchronize()  # time the kernels, not their launch
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers, fewer repeats (< 2 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/mixer_speed[_quick].json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    args.out = args.out or Path(__file__).resolve().parent / "results" / ("mixer_speed_quick.json" if args.quick else "mixer_speed.json")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    layers = 6 if args.quick else SMOLLM2_GEOMETRY["num_hidden_layers"]
    repeats = args.repeats or (3 if args.quick else 5)
    teacher = llama_teacher(layers).train()
    # The students are what the conversion builds by default (teacher-matched Mamba2, Mamba expand 2).
    students = {kind: convert_teacher(teacher, ConversionConfig(mixer=kind)).train() for kind in TARGETS}
    configs = {kind: student.config.conversion_config().mixer_config() for kind, student in students.items()}
    models = {name: model.to(device=device, dtype=dtype) for name, model in ({"teacher": teacher} | students).items()}
    input_ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seqlen), device=device)

    # NOTE: models take turns in every round, so load from other processes hits all alike;
    # the load average is recorded because shared cores still distort the numbers.
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_idx in range(repeats + 1):
        for name, model in models.items():
            seconds = fwd_bwd_seconds(model, input_ids)
            if round_idx > 0:  # round 0 is warm-up
                times[name].append(seconds)
            print(f"round {round_idx} {name:8s} {seconds:.3f} s", flush=True)

    teacher_s = statistics.median(times["teacher"])
    result = {
        "benchmark": "mixer_speed",
        "machine": machine(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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
            f"| {kind} | {row['student_s']:.3f} | {row['ratio']:.2f} | <= {TARGETS[kind]} | {result['pass'][kind]} |"
        )
    report = args.out.with_name(f"{args.out.stem}_{date[:10]}.md")
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
