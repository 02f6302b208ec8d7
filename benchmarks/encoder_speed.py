"""Forward speed of the encoder track's students against their teacher at long inputs.

all-MiniLM-L6-v2's geometry (6 layers, hidden 384, 12 heads) with its position table
extended to 4,096 (MiniLM itself has 512 learned positions; speed depends only on shapes, so
weights are random), batch 1, forward without grad, fp32: the BERT teacher (sdpa attention)
against its Linformer (k = 256) and bidirectional Mamba2 students, at 512 to 4,096 tokens,
side by side in one process. Writes benchmarks/results/encoder_speed.json and .md.

    python benchmarks/encoder_speed.py            # lengths 512, 1024, 2048, 4096, 8192
    python benchmarks/encoder_speed.py --quick    # 512 and 4096, fewer repeats

Beside the timings it records an upper bound from arithmetic: a student that keeps the
teacher's Q/K/V/O projections and feed-forward blocks (as Linformer and BiMamba2 do) cannot
be faster than teacher MACs / those blocks' MACs, whatever its token mixer costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_result  # noqa: E402

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
def time_forward(model, length: int, repeats: int) -> float:
    ids = torch.randint(1000, 20000, (1, length))
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speedup_bound(length: int, g: dict = MINILM_GEOMETRY) -> float:
    """Teacher multiply-adds per token over those of its projections and feed-forward blocks
    alone: the most any student keeping them can gain, at ``length`` tokens."""
    hidden, inner = g["hidden_size"], g["intermediate_size"]
    kept = 4 * hidden * hidden + 2 * hidden * inner  # Q, K, V, O and the two FFN matrices
    attention = 2 * length * hidden  # scores and the weighted sum over every position
    return (kept + attention) / kept


def measure(lengths=(512, 1024, 2048, 4096, 8192), repeats: int = 3) -> dict:
    """Seconds per forward for each model and length, and the teacher/student ratios."""
    built = models(max(lengths))
    seconds = {name: {n: time_forward(model, n, repeats) for n in lengths} for name, model in built.items()}
    teacher = next(iter(seconds))
    speedup = {name: {n: seconds[teacher][n] / s[n] for n in lengths} for name, s in seconds.items() if name != teacher}
    longest = TARGET_LENGTH if TARGET_LENGTH in lengths else max(lengths)
    return {
        "geometry": {**MINILM_GEOMETRY, "max_position_embeddings": max(lengths), "batch": 1, "dtype": "float32"},
        "threads": torch.get_num_threads(),
        "seconds": {name: {str(n): v for n, v in s.items()} for name, s in seconds.items()},
        "speedup_vs_teacher": {name: {str(n): v for n, v in s.items()} for name, s in speedup.items()},
        "speedup_bound": {str(n): speedup_bound(n) for n in lengths},
        "targets": {
            f"{name}_at_{longest}": {
                "what": f"{name} forward at {longest} tokens >= {TARGET_X}x faster than the teacher",
                "value": round(s[longest], 2),
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
    lines.append("| bound: teacher MACs / its projections' and FFN's | " + " | ".join(f"{result['speedup_bound'][n]:.2f}x" for n in lengths) + " |")
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    lines += [f"| {t['what']} | {t['value']} | {t['pass']} |" for t in result["targets"].values()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = measure((512, 4096), repeats=1) if args.quick else measure()
    name = "encoder_speed_quick" if args.quick else "encoder_speed"
    write_result(name, {"benchmark": name, "machine": machine(), **result})
    lines = [f"# Encoder students vs teacher: forward speed ({machine()['date'][:10]})", "", *markdown(result)]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
