"""One scale_memory measurement, run by the deepspeed launcher on every rank (see scale_memory.py).

Builds teacher and student exactly as the training job does (partitioned, in their ZeRO-3
engines), trains a few steps on random tokens and writes, per rank: resident memory
before building, after building and at its peak; the parameter counts the accounting
needs; and the activations of one step, measured by live-tensor accounting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import ALL_MAMBA2_ON_SHAKESPEARE, reset_peak_rss, status_bytes  # noqa: E402
from cald_scale.config import load_run_config  # noqa: E402
from cald_scale.conversion.teacher import open_teacher  # noqa: E402
from cald_scale.engines.distributed import init_distributed  # noqa: E402
from cald_scale.engines.host_memory import configure_host_allocator, return_free_memory  # noqa: E402
from cald_scale.engines.models import build_models  # noqa: E402
from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from cald_scale.eval.memory import LiveTensorLedger  # noqa: E402
from cald_scale.metrics import peak_memory_bytes  # noqa: E402
from cald_scale.train import forward_backward  # noqa: E402


def rss_bytes() -> int:
    return status_bytes("VmRSS")


class PhasePeaks:
    """Peak resident memory of each phase of a step: forward, backward, optimizer step.

    The kernel's high-water mark (VmHWM) is reset at each phase boundary by writing 5 to
    /proc/self/clear_refs. NOTE: that also lowers what getrusage reports as the peak, so the
    whole run's peak is kept here, read before every reset.
    """

    def __init__(self) -> None:
        self.overall = status_bytes("VmHWM")
        self.phases: dict[str, dict[str, int]] = {}
        self.supported = reset_peak_rss()  # not Linux, or not permitted: the phases stay unmeasured

    def mark(self, phase: str) -> None:
        """Close ``phase`` (its peak and its end) and start the next one."""
        peak = status_bytes("VmHWM")
        self.overall = max(self.overall, peak)
        if self.supported:
            self.phases[phase] = {"peak_bytes": peak, "end_bytes": rss_bytes()}
            reset_peak_rss()


def numel(p) -> int:
    return math.prod(getattr(p, "ds_shape", p.shape))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--trainable", choices=["all", "mixers"], default="all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()

    env = init_distributed()
    torch.manual_seed(0)
    cfg = load_run_config(
        overrides=[
            f"teacher.name_or_path={args.teacher}",
            f"student.trainable={args.trainable}",
            *ALL_MAMBA2_ON_SHAKESPEARE,
            f"train.global_batch_size={args.global_batch}",
            f"train.max_steps={args.steps + 1}",
            "train.warmup_steps=1",
            f"data.seq_len={args.seq_len}",
            "phases=[{name: target, guidance: target}]",  # the end-to-end CALD step
            "train.malloc_mmap_threshold=1048576",  # host memory is what this benchmark is about
        ]
    )
    allocator = configure_host_allocator(cfg.train.malloc_mmap_threshold)
    rss_start = rss_bytes()
    ds_config = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), cfg.train, env.world_size)
    source, _ = open_teacher(cfg.teacher)
    t0 = time.time()
    models = build_models(cfg, ds_config, source)
    build_seconds = time.time() - t0
    rss_built, peak_built = rss_bytes(), peak_memory_bytes()["cpu_max_rss_bytes"]

    student, teacher = models.student_engine.module, models.teacher_engine.module
    teacher_ids = {id(p) for p in teacher.parameters()}
    trainable = sum(numel(p) for p in student.parameters() if p.requires_grad)
    student_frozen_own = sum(numel(p) for p in student.parameters() if not p.requires_grad and id(p) not in teacher_ids)
    teacher_params = sum(numel(p) for p in teacher.parameters())

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    micro = cfg.train.micro_batch(env.world_size)
    gen = torch.Generator().manual_seed(env.rank)
    step_seconds, activations = [], None
    engine = models.student_engine
    phase = cfg.plan(env.world_size).phases[0]
    phases = None
    for step in range(args.steps):
        ids = torch.randint(0, source.config.vocab_size, (micro, args.seq_len), generator=gen)
        ids = ids.to(models.student_engine.device)
        t0 = time.time()
        # Steady state (trace complete, prefetch on, optimizer states allocated): the second-last
        # step is measured phase by phase, the last one by the ledger (which has its own cost).
        marked = step == args.steps - 2
        ledger = LiveTensorLedger(track_everything=True) if step == args.steps - 1 else None
        if marked:
            phases = PhasePeaks()
            backward = engine.backward

            def backward_between_marks(*a, backward=backward, **k):
                phases.mark("forward")
                out = backward(*a, **k)
                phases.mark("backward")
                return out

            engine.backward = backward_between_marks
        with ledger.watch() if ledger is not None else contextlib.nullcontext():
            parts, _ = forward_backward(models, models.teacher, phase, ids, cfg)
        if ledger is not None:
            activations = ledger.peak_bytes
        if marked:
            del engine.backward
        engine.step()
        if marked:
            phases.mark("optimizer_step")
        return_free_memory()
        step_seconds.append(time.time() - t0)

    peaks = peak_memory_bytes()
    if phases is not None:  # the phase marks lowered the kernel's peak; the run's own is kept there
        peaks["cpu_max_rss_bytes"] = max(peaks["cpu_max_rss_bytes"], phases.overall, status_bytes("VmHWM"))
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "trainable": args.trainable,
        "tokens_per_rank_step": micro * args.seq_len,
        "rss_start_bytes": rss_start,
        "rss_built_bytes": rss_built,
        "peak_rss_built_bytes": peak_built,
        "peak_rss_bytes": peaks["cpu_max_rss_bytes"],
        "activation_bytes": activations,
        "phase_peaks": phases.phases if phases is not None else {},
        "params": {"student_trainable": trainable, "student_frozen_own": student_frozen_own, "teacher": teacher_params},
        "shares_frozen_weights": models.shares_frozen_weights,
        "dtype": str(next(student.parameters()).dtype),
        "build_seconds": build_seconds,
        "step_seconds": step_seconds,
        "last_loss": parts.total.item(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        # Device memory (CUDA only): the peak of live tensors and of the caching allocator's pool.
        "device_peak_allocated_bytes": peaks.get("gpu_max_allocated_bytes"),
        "device_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "omp_threads": torch.get_num_threads(),
        "allocator": allocator,
        "pid": os.getpid(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{env.rank}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    from cald_scale.launch import finish

    finish(main)  # leave as a training rank does: no interpreter finalization under gloo
