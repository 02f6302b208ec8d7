"""Teacher-activation memory of the streamed schedule vs the naive one, on the same model and batch.

    python benchmarks/streaming_memory.py [--quick] [--out FILE]

Naive: the whole teacher runs first and keeps all L hidden states for the layer losses.
Streamed: teacher stage k runs, student stage k consumes its outputs, they are freed.
"Held" is what is alive at stage boundaries (live-tensor accounting of every tensor the
teacher created; on a GPU the allocator's own numbers are reported beside it); the
target is held(streamed) <= 2/L * held(naive) with stages of one layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_teacher, machine, write_result  # noqa: E402

from cald_scale.conversion.modeling import ConversionConfig  # noqa: E402
from cald_scale.conversion.surgery import convert_teacher  # noqa: E402
from cald_scale.distill.losses import LossConfig  # noqa: E402
from cald_scale.distill.stages import LayerwiseModel  # noqa: E402
from cald_scale.distill.step import cald_forward  # noqa: E402
from cald_scale.eval.memory import LiveTensorLedger  # noqa: E402


def measure(teacher, student, ids, schedule: str, stage_size: int) -> dict:
    ledger = LiveTensorLedger()
    t_lw = LayerwiseModel(teacher, scope=ledger.scope)
    s_lw = LayerwiseModel(student)
    cuda = ids.is_cuda
    gpu_samples = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def boundary(event: str, stage: int) -> None:
        ledger.sample()
        if cuda:
            gpu_samples.append(torch.cuda.memory_allocated() - base)

    parts = cald_forward(t_lw, s_lw, ids, LossConfig(), stage_size=stage_size, schedule=schedule, on_boundary=boundary)
    parts.total.backward()
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    out = {
        "teacher_held_bytes": ledger.peak_held_bytes,
        "teacher_peak_bytes_incl_transients": ledger.peak_bytes,
        "loss": parts.total.item(),
    }
    if cuda:
        out["gpu_step_peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - base
        out["gpu_max_allocated_at_boundaries_bytes"] = max(gpu_samples)
    return out, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 layers, batch 2 x 128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    layers, batch, seqlen = (12, 2, 128) if args.quick else (30, 4, 256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = llama_teacher(layers).to(device)
    student = convert_teacher(teacher, ConversionConfig(mixer="mamba2")).to(device)
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seqlen), device=device)

    naive, naive_grads = measure(teacher, student, ids, "naive", 1)
    runs = {}
    for stage_size in (1, 2, 4):
        streamed, grads = measure(teacher, student, ids, "streamed", stage_size)
        streamed["ratio_to_naive"] = streamed["teacher_held_bytes"] / naive["teacher_held_bytes"]
        streamed["same_loss_and_grads_as_naive"] = streamed["loss"] == naive["loss"] and all(
            torch.equal(a, b) for a, b in zip(grads, naive_grads)
        )
        runs[f"stage_size_{stage_size}"] = streamed
    one = runs["stage_size_1"]
    hidden_bytes = batch * seqlen * teacher.config.hidden_size * 4
    result = {
        "benchmark": "streaming_memory",
        "machine": machine(),
        "device": str(device),
        "shapes": {"layers": layers, "batch": batch, "seq_len": seqlen, "hidden": teacher.config.hidden_size, "one_hidden_state_bytes": hidden_bytes},
        "naive": naive,
        "streamed": runs,
        "ratio_streamed_to_naive": one["ratio_to_naive"],
        "target_ratio": 2 / layers,
        "pass": one["ratio_to_naive"] <= 2 / layers and one["same_loss_and_grads_as_naive"],
    }
    write_result("streaming_memory" + ("_quick" if args.quick else ""), result, args.out)


if __name__ == "__main__":
    main()
