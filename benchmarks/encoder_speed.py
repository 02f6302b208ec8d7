"""Forward speed of the encoder track's students against their teacher at long inputs.

all-MiniLM-L6-v2's geometry (6 layers, hidden 384, 12 heads) with its position table
extended to the longest length measured (MiniLM itself has 512 learned positions; speed
depends only on shapes, so weights are random), batch 1, forward without grad, fp32: the BERT
teacher (sdpa attention) against its Linformer (k = 256) and bidirectional Mamba2 students,
at 512 to 8,192 tokens, side by side in one process; the targets are read at 4,096. Writes
benchmarks/results/encoder_speed.json and .md.

    python benchmarks/encoder_speed.py            # lengths 512, 1024, 2048, 4096, 8192
    python benchmarks/encoder_speed.py --quick    # 512 and 4096, fewer repeats

Beside the timings it records, for each student, the speed-up arithmetic allows: the teacher's
multiply-adds per token (its layers' linear maps plus attention's 2 * length * hidden) over
the student's own layers' linear maps (the JSON's ``speedup_bound``). It is an estimate, not a
hard bound: it counts multiply-adds alone, and on a CPU the teacher's attention costs more
than its multiply-adds (softmax, memory traffic), so a measured ratio can pass it (Linformer
2.98x at 4k on 2026-12-01, against 2.78x). Linformer keeps the teacher's linear maps; BiMamba2 has two expand-1 Mamba2s per layer (per
cald_scale/mixers/bimamba2.py), whose in_proj (x, z, B, C, dt) is 4x the teacher's Q/K/V.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, overall_pass, write_result  # noqa: E402

MINILM_GEOMETRY = dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
TARGET_X = 3.0  # students at least 3x faster than the teacher at 4k tokens (the encoder issue's target)
TARGET_LENGTH = 4096


def models(max_positions: int) -> dict:
    """Teacher and students of one random MiniLM-geometry classifier (3 labels)."""
    from transformers import BertConfig

    from cald_scale.conversion.classifier import classifier_config
    from cald_scale.conversion.modeling import ConversionConfig
    from cald_scale.conversion.surgery import convert_teacher
    from cald_scale.conversion.classifier import CaldEncoderForSequenceClassification
    from cald_scale.mixers.config import LinformerConfig

    torch.manual_seed(0)
    encoder = BertConfig(**MINILM_GEOMETRY, max_position_embeddings=max_positions)
    encoder._attn_implementation = "sdpa"
    teacher = CaldEncoderForSequenceClassification(classifier_config(encoder, 3)).eval()
    out = {"teacher (BERT, sdpa)": teacher}
    for name, conversion in (
        ("linformer (k=256)", ConversionConfig(mixer="linformer", linformer=LinformerConfig(k=256))),
        ("bimamba2", ConversionConfig(mixer="bimamba2")),
    ):
        out[name] = convert_teacher(teacher, conversion).eval()
    return out


@torch.no_grad()
def time_forwards(built: dict, length: int, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each model at ``length`` tokens.

    NOTE: the models take turns within each repeat, so a slow spell of a shared machine
    falls on teacher and students alike instead of on whichever ran during it.
    """
    ids = torch.randint(1000, 20000, (1, length))
    mask = torch.ones_like(ids)
    times = {name: [] for name in built}
    for model in built.values():
        model(input_ids=ids, attention_mask=mask)  # warm-up
    for _ in range(repeats):
        for name, model in built.items():
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_linear_macs(model: torch.nn.Module) -> int:
    """Multiply-adds per token of the linear maps inside the encoder layers (not the head,
    which sees one pooled vector)."""
    return sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layer." in name
    )


def speedup_bound(teacher_linear: int, student_linear: int, length: int, g: dict = MINILM_GEOMETRY) -> float:
    """Teacher multiply-adds per token at ``length`` tokens over the student's linear maps alone:
    what that student can gain if time follows multiply-adds, whatever its token mixer costs."""
    attention = 2 * length * g["hidden_size"] * g["num_hidden_layers"]  # scores and weighted sums
    return (teacher_linear + attention) / student_linear


def measure(lengths=(512, 1024, 2048, 4096, 8192), repeats: int = 5) -> dict:
    """Seconds per forward for each model and length, and the teacher/student ratios."""
    built = models(max(lengths))
    by_length = {n: time_forwards(built, n, repeats) for n in lengths}
    seconds = {name: {n: by_length[n][name] for n in lengths} for name in built}
    teacher = next(iter(seconds))
    speedup = {name: {n: seconds[teacher][n] / s[n] for n in lengths} for name, s in seconds.items() if name != teacher}
    linear = {name: layer_linear_macs(model) for name, model in built.items()}
    bound = {
        name: {str(n): speedup_bound(linear[teacher], linear[name], n) for n in lengths} for name in speedup
    }
    longest = TARGET_LENGTH if TARGET_LENGTH in lengths else max(lengths)
    return {
        "geometry": {**MINILM_GEOMETRY, "max_position_embeddings": max(lengths), "batch": 1, "dtype": "float32"},
        "threads": torch.get_num_threads(),
        "seconds": {name: {str(n): v for n, v in s.items()} for name, s in seconds.items()},
        "speedup_vs_teacher": {name: {str(n): v for n, v in s.items()} for name, s in speedup.items()},
        "layer_linear_macs_per_token": linear,
        "speedup_bound": bound,
        "targets": {
            f"{name}_at_{longest}": {
                "what": f"{name} forward at {longest} tokens >= {TARGET_X}x faster than the teacher",
                "value": round(s[longest], 2),
                "bound": round(bound[name][str(longest)], 2),
                "pass": s[longest] >= TARGET_X,
            }
            for name, s in speedup.items()
        },
    }


def markdown(result: dict) -> list[str]:
    lengths = list(next(iter(result["seconds"].values())))
    lines = [
        f"Forward, batch 1, fp32, MiniLM geometry with {result['geometry']['max_position_embeddings']} positions (random weights), {result['threads']} threads; seconds (x faster than the teacher):",
        "",
        "| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, s in result["seconds"].items():
        ratio = result["speedup_vs_teacher"].get(name)
        cells = [f"{s[n]:.3f}" + (f" ({ratio[n]:.1f}x)" if ratio else "") for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, bound in result["speedup_bound"].items():
        cells = " | ".join(f"{bound[n]:.2f}x" for n in lengths)
        lines.append(f"| multiply-add ratio for {name}: teacher MACs / its linear maps' | {cells} |")
    lines += ["", "| target | value | multiply-add ratio | pass |", "|---|---|---|---|"]
    lines += [f"| {t['what']} | {t['value']} | {t['bound']} | {t['pass']} |" for t in result["targets"].values()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = measure((512, 4096), repeats=1) if args.quick else measure()
    name = "encoder_speed_quick" if args.quick else "encoder_speed"
    write_result(name, {"benchmark": name, "machine": machine(), **result, "pass": overall_pass(result["targets"])})
    lines = [f"# Encoder students vs teacher: forward speed ({machine()['date'][:10]})", "", *markdown(result)]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
