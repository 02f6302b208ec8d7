"""Forward + backward time of a Llama teacher vs. the same model with every attention replaced
by a linear-time mixer (Mamba2, Mamba), on the machine at hand. Writes JSON and a Markdown report.

    python benchmarks/mixer_speed.py [--quick] [--out benchmarks/results/mixer_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cald_scale.conversion.modeling import MixerAsAttention
from cald_scale.mixers import Mamba2Config, MambaConfig, build_mixer

# SmolLM2-135M geometry.
TEACHER = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    num_hidden_layers=30,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TARGETS = {"mamba2": 1.5, "mamba": 3.0}


def mixer_configs(teacher: LlamaConfig) -> dict[str, Mamba2Config | MambaConfig]:
    """The student geometries the conversion defaults to (Mamba2: one head and one group per
    teacher head, head_dim and d_state = teacher head_dim, expand 1)."""
    head_dim = teacher.hidden_size // teacher.num_attention_heads
    return {
        "mamba2": Mamba2Config(
            num_heads=teacher.num_attention_heads,
            head_dim=head_dim,
            d_state=head_dim,
            n_groups=teacher.num_attention_heads,
            expand=1,
            kernel="chunked",
        ),
        "mamba": MambaConfig(expand=2, d_state=16, kernel="chunked"),
    }


def make_student(teacher: LlamaForCausalLM, kind: str, config) -> LlamaForCausalLM:
    student = copy.deepcopy(teacher)
    for idx, layer in enumerate(student.model.layers):
        layer.self_attn = MixerAsAttention(build_mixer(kind, config, teacher.config.hidden_size, layer_idx=idx))
    return student


def fwd_bwd_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def hardware() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores available, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers, fewer repeats (< 2 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixer_speed.json"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    layers = 6 if args.quick else TEACHER["num_hidden_layers"]
    repeats = args.repeats or (3 if args.quick else 5)
    teacher_cfg = LlamaConfig(**{**TEACHER, "num_hidden_layers": layers})
    teacher_cfg._attn_implementation = "sdpa"
    teacher = LlamaForCausalLM(teacher_cfg).float().train()
    configs = mixer_configs(teacher_cfg)
    models = {"teacher": teacher} | {kind: make_student(teacher, kind, cfg).train() for kind, cfg in configs.items()}
    input_ids = torch.randint(0, teacher_cfg.vocab_size, (args.batch, args.seqlen))

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
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shapes": {
            "batch": args.batch,
            "seqlen": args.seqlen,
            "layers": layers,
            "dtype": "float32",
            **TEACHER,
            "num_hidden_layers": layers,
        },
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

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        f"# Mixer speed ({result['date']})",
        "",
        f"Hardware: {result['hardware']}; torch {result['torch']}, transformers {result['transformers']}.",
        f"Forward + backward, batch {args.batch} x {args.seqlen} tokens, fp32, {layers} layers, median of {repeats}.",
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
    report = args.out.with_name(f"{args.out.stem}_{result['date'][:10]}.md")
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
