"""What conversion costs per training step: the distillation step against the work it cannot avoid, and against the teacher's own fine-tuning.

    python benchmarks/train_speed.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--geometry SmolLM2-135M|Llama-3.2-1B] [--batch B] [--seq_len L] [--steps N] [--out PATH]
        [--compare-leaves] [--compare-zero3] [--narrow] [--profile]

Four items on the same batch (batch x seq_len random tokens), with random weights of a real
geometry:

- teacher_forward: the plain HF teacher, forward under no_grad (no LM head: the default loss
  reads no teacher logits, loss.a_kl=0);
- student_forward_backward: the plain converted student, training what the run trains (the
  mixers by default): HF forward with next-token CE, backward. Its optimizer step (plain
  torch AdamW) is timed apart and is not part of the sum below;
- distill_step: the trainer's own step (cald_scale.train.train_step, one end-to-end phase
  with the frozen target teacher) on teacher and student built by build_models in their
  ZeRO-3 engines: streamed layer losses + CE, backward, optimizer step;
- teacher_finetune_step: the teacher alone in a ZeRO-3 training engine (every weight
  trains): HF forward with next-token CE, backward, optimizer step, the usual fine-tuning.

Each item lives in its own process (its own peak memory, no DeepSpeed state shared). The
processes are built one after another (--build sequential, the CPU default) or all at once
(parallel, the CUDA default), then step in turn (one step of each item, then the next round),
so a machine that gets busier or quieter mid-run slows every item alike; all are resident
together. On CPU each item uses one torch thread unless --threads says
otherwise (see main()). Per item: median seconds per step over --steps timed steps after
warmup (also the fastest step, and CPU time), tokens/s, and peak memory over its steps: on
CUDA torch.cuda.max_memory_allocated (live tensors, model states included); on CPU the
process's resident high-water mark (VmHWM, reset after building), which includes the
process baseline (imports) and allocator slack, so that baseline and the resident memory
after building are reported beside it.

Target: distill_step <= 1.1 x (teacher_forward + student_forward_backward): ZeRO-3,
streaming, the losses and the optimizer step add at most 10%. distill_step /
teacher_finetune_step is reported without a target. When the target is missed (or with
--profile), the JSON also gets where the time goes: one distillation step profiled.

--compare-leaves adds the distillation step under the other train.zero3_leaves modes, built
and stepped alongside: distill_step_frozen_leaves (only the parts of blocks that never train
gathered as one ZeRO-3 leaf) and distill_step_hooked (a hook pair on every submodule). --narrow
keeps the geometry's depth and vocabulary at width 64: the arithmetic vanishes and what is
left is host work, the part that bounds a GPU step at these sizes, measurable on a CPU.
--compare-zero3 adds teacher_finetune_plain_step, the teacher's fine-tuning step with no engine
(the plain HF model, torch's fused AdamW): teacher_finetune_zero3_over_plain is what our ZeRO-3
training engine alone costs a step of the same work, beside what the distillation step costs over
its own unavoidable parts. It also adds distill_step_regather_all, the distillation step with
DeepSpeed's own end of an optimizer step (every parameter released, every persistent one
gathered again), which engines/zero3.keep_unchanged_persistent otherwise trims, and
distill_step_deepspeed_linear, the distillation step with DeepSpeed's own memory-efficient linear
where engines/zero3.ParamSavingLinear otherwise runs.

Tokens per step change the ratio: ZeRO-3's gathers, gradient partitioning and the optimizer
step scale with the parameters, not the tokens, while the unavoidable work grows with the batch.
The headline is batch 1 x 512; --batch / --seq_len write a result of their own
(train_speed_b<batch>x<seq_len>), so a sweep never overwrites it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ALL_MAMBA2_ON_SHAKESPEARE, GEOMETRIES, REPO, child_env, machine, narrow_geometry, no_cuda_for, output_file, overall_pass, reset_peak_rss, save_partial,
    status_bytes, stop_if_parse_only, sync, truncated_geometry, write_random_teacher, write_result,
)
from cald_scale.cli import positive_int  # noqa: E402

sys.path.insert(0, str(REPO))

ITEMS = ("teacher_forward", "student_forward_backward", "distill_step", "teacher_finetune_step")
# --compare-leaves: the distillation step again under the other train.zero3_leaves modes, side by side.
LEAF_ITEMS = {"distill_step_frozen_leaves": "frozen", "distill_step_hooked": "none"}
# --compare-zero3: the teacher's fine-tuning step without ZeRO-3, what our ZeRO-3 engine costs a plain step;
# the distillation step with DeepSpeed's own end of step, what keep_unchanged_persistent saves.
ZERO3_ITEMS = ("teacher_finetune_plain_step", "distill_step_regather_all", "distill_step_deepspeed_linear")
TARGET_RATIO = 1.1
QUICK_LAYERS = 8  # --quick: the geometry's widths and vocabulary, fewer blocks
STALL_S = 60  # a worker command running longer prints every thread's stack this often (to its log)
MARK = "@@train_speed "  # prefixes the workers' replies (libraries print to stdout too)


# -- the items: each builder returns (step, untimed follow-up or None) ------------------------
def _run_config(args):
    from cald_scale.config import load_run_config

    return load_run_config(
        overrides=[
            f"teacher.name_or_path={args.teacher}",
            f"teacher.dtype={args.dtype}",
            f"student.trainable={args.trainable}",
            *ALL_MAMBA2_ON_SHAKESPEARE,
            f"train.global_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}",
            f"train.max_steps={args.warmup + args.steps + 2}",  # the teacher stays needed through every step run
            "train.warmup_steps=1",
            # The CALD step with a frozen target teacher: end to end, or each block on the teacher's input.
            f"phases=[{{name: target, guidance: target, mode: {args.phase}}}]",
        ]
    )


def _ds_config(cfg, world_size: int) -> dict:
    """The shipped ZeRO-3 config, resolved as the trainer does, with bf16 following --dtype (not "auto")."""
    from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config

    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["bf16"] = {"enabled": cfg.teacher.dtype == "bfloat16"}
    return resolve_ds_config(raw, cfg.train, world_size)


def build_teacher_forward(cfg, source, ids):
    from cald_scale.conversion.teacher import build_teacher

    teacher = build_teacher(source).to(ids.device)
    # NOTE: the distillation step reads the teacher's hidden states only, unless a KL term needs its logits.
    forward = teacher if cfg.loss.a_kl > 0 else teacher.base_model

    def step() -> dict:
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)
        return {}

    return step, None


def build_student_forward_backward(cfg, source, ids):
    from cald_scale.conversion.surgery import build_student
    from cald_scale.engines.models import set_trainable

    student = build_student(source.config, source.weights(), cfg.student.conversion, seed=cfg.train.seed)
    student = student.to(device=ids.device, dtype=source.dtype).train()
    set_trainable(student, copied=cfg.student.trainable == "all")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.train.lr, betas=cfg.train.betas, fused=True)

    def step() -> dict:
        student.zero_grad(set_to_none=True)
        student(input_ids=ids, labels=ids).loss.backward()
        return {}

    def optimizer_step() -> dict:
        sync(ids.device)
        t0 = time.perf_counter()
        optimizer.step()
        sync(ids.device)
        return {"optimizer_step_s": time.perf_counter() - t0}

    return step, optimizer_step


def build_distill_step(cfg, source, ids):
    from cald_scale.distill.guidance import Guide
    from cald_scale.engines.distributed import init_distributed
    from cald_scale.engines.models import build_models
    from cald_scale.distill.progress import StepState
    from cald_scale.train import train_step

    env = init_distributed()
    models = build_models(cfg, _ds_config(cfg, env.world_size), source)
    plan = cfg.plan(env.world_size)
    phase = plan.phases[0]
    models.apply_phase(phase, cfg.student.trainable)
    guide = Guide(plan, models.managed_teacher, base_weights=str(source.folder), shared_param_ids=models.shared_param_ids)
    state = StepState({})
    engine = models.student_engine

    def step() -> dict:
        record = train_step(models, guide, phase, engine.global_steps, lambda cursor: {"input_ids": ids}, state, cfg, tokens_per_micro=ids.numel())
        return {"loss": record["loss"]}

    return step, None


def leaf_mode_builder(mode: str):
    """distill_step with train.zero3_leaves=``mode`` (frozen: only the parts of blocks that never
    train are leaves; none: DeepSpeed's hooks on every submodule)."""

    def build(cfg, source, ids):
        return build_distill_step(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero3_leaves=mode)), source, ids)

    return build


def build_distill_step_regather_all(cfg, source, ids):
    """distill_step with DeepSpeed's own end of an optimizer step: every parameter released, the
    persistent ones gathered again (no ``keep_unchanged_persistent``; this worker builds this item alone)."""
    from cald_scale.engines import zero3

    zero3.keep_unchanged_persistent = lambda optimizer: False
    return build_distill_step(cfg, source, ids)


def build_distill_step_deepspeed_linear(cfg, source, ids):
    """distill_step with DeepSpeed's own memory-efficient linear wherever a gradient flows (its
    ``LinearFunctionForZeroStage3``, not ``engines/zero3.ParamSavingLinear``; this worker builds
    this item alone)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from cald_scale.engines import zero3

    calls = 0

    def deepspeed_linear(*args):
        nonlocal calls
        calls += 1
        return zero3_linear_wrap(*args)

    zero3.ParamSavingLinear.apply = deepspeed_linear
    step, follow_up = build_distill_step(cfg, source, ids)

    def counted_step() -> dict:
        nonlocal calls
        calls = 0
        return {**step(), "deepspeed_linear_calls": calls}  # says the step ran DeepSpeed's linear

    return counted_step, follow_up


def build_teacher_finetune_step(cfg, source, ids):
    from cald_scale.conversion.teacher import build_teacher
    from cald_scale.distill.stages import LayerwiseModel
    from cald_scale.engines.distributed import init_distributed
    from cald_scale.engines.models import block_numel
    from cald_scale.engines.partitioned import placement_for
    from cald_scale.engines.ds_config import size_zero_buffers
    from cald_scale.engines.zero3 import build_training_engine

    env = init_distributed()
    ds_config = _ds_config(cfg, env.world_size)
    teacher = build_teacher(source, placement_for(ds_config)).train().requires_grad_(True)
    sized = size_zero_buffers(ds_config, block_numel(teacher, LayerwiseModel(teacher).blocks), cfg.train.stage_size)
    groups = [{"params": list(teacher.parameters()), "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "name": "teacher"}]
    engine = build_training_engine(teacher, sized, groups)

    def step() -> dict:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item()}

    return step, None


def build_teacher_finetune_plain_step(cfg, source, ids):
    """The teacher's fine-tuning step with no engine: the plain HF model, torch's fused AdamW."""
    from cald_scale.conversion.teacher import build_teacher

    teacher = build_teacher(source).to(ids.device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay, fused=True)

    def step() -> dict:
        optimizer.zero_grad(set_to_none=True)
        loss = teacher(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return step, None


BUILDERS = {
    "teacher_forward": build_teacher_forward,
    "student_forward_backward": build_student_forward_backward,
    "distill_step": build_distill_step,
    "teacher_finetune_step": build_teacher_finetune_step,
    **{item: leaf_mode_builder(mode) for item, mode in LEAF_ITEMS.items()},
    "teacher_finetune_plain_step": build_teacher_finetune_plain_step,
    "distill_step_regather_all": build_distill_step_regather_all,
    "distill_step_deepspeed_linear": build_distill_step_deepspeed_linear,
}


# -- where one step's time goes -------------------------------------------------------------
# (file name ending, function) -> region of the distillation step; cumulative times, so
# nested regions (gather hooks inside forward, say) overlap their parents.
REGIONS = {
    ("stages.py", "blocks_iter"): "teacher blocks, forward (no grad)",
    ("stages.py", "block"): "teacher + student blocks, forward",
    ("losses.py", "layer_loss"): "layer losses (forward, gradient included)",
    ("losses.py", "vocab_streamed_cross_entropy"): "CE against the streamed frozen head (forward, gradient included)",
    ("losses.py", "lm_head_losses"): "CE/KL over token chunks (forward)",
    ("step.py", "cald_forward"): "forward, all of it",
    ("engine.py", "backward"): "backward (engine.backward, gradient reduction included)",
    ("stage3.py", "reduce_ready_partitions_and_remove_grads"): "  of which ZeRO-3 gradient reduction into partitions",
    ("engine.py", "step"): "optimizer step (engine.step)",
    ("partitioned_param_coordinator.py", "fetch_sub_module"): "ZeRO-3 parameter gathers (hooks)",
    ("partitioned_param_coordinator.py", "release_sub_module"): "ZeRO-3 parameter releases (hooks)",
    ("partitioned.py", "pieces"): "frozen head pieces (gathers)",
}


def profile_step(step, device: torch.device, top: int = 15) -> dict:
    """One step under cProfile (named regions, cumulative) and one under torch.profiler (operators by self time)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(step)
    sync(device)
    wall = time.perf_counter() - t0
    regions: dict[str, float] = {}
    stats = pstats.Stats(profiler).stats
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        label = next((v for (f, n), v in REGIONS.items() if filename.endswith(f) and name == n), None)
        if label:
            regions[label] = regions.get(label, 0.0) + cumulative
    # NOTE: also the functions themselves: on the H200 (Python 3.12) cProfile saw neither engine.backward
    # nor engine.step, so the regions alone left most of the step unaccounted for.
    by_own_time = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return {
        "step_wall_s_under_cprofile": wall,
        "regions_s": dict(sorted(regions.items(), key=lambda kv: -kv[1])),
        "regions_note": "cumulative seconds under cProfile (inflated by it; compare shares, not absolutes); nested regions overlap",
        "functions_by_own_time": [
            {"function": f"{Path(filename).name}:{line}({name})", "own_s": own, "cumulative_s": cumulative, "calls": calls}
            for (filename, line, name), (_, calls, own, cumulative, _) in by_own_time
        ],
        "torch_ops_by_self_time": [{"op": e.key, "self_s": getattr(e, key) / 1e6, "calls": e.count} for e in events],
    }


# -- worker: one item, stepping on command ------------------------------------------------
@contextlib.contextmanager
def _stall_traces():
    """Every thread's stack into the item's log each STALL_S seconds while the body runs."""
    # NOTE: on the first GPU runs an item outlasted its cap with no sign of where (Triton
    # autotuning, engine set-up?): a long build or step now leaves its stacks in the log.
    faulthandler.dump_traceback_later(STALL_S, repeat=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _reply(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def serve_item(args) -> None:
    """Build one item, then answer "step", "memory" and "profile" commands read from stdin until it closes."""
    from cald_scale.conversion.teacher import open_teacher
    from cald_scale.engines.host_memory import configure_host_allocator
    from cald_scale.mixers.ops import _autotune_cache

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")  # one process per item, one device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _run_config(args)
    allocator = configure_host_allocator(cfg.train.malloc_mmap_threshold)  # the trainer's allocator, for every item
    source, _ = open_teacher(cfg.teacher)
    ids = torch.randint(0, source.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    rss_baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    with _stall_traces():
        step, follow_up = BUILDERS[args.item](cfg, source, ids)
    build_seconds = time.perf_counter() - t0
    sync(device)
    memory = {"rss_baseline_bytes": rss_baseline, "rss_built_bytes": status_bytes("VmRSS")}
    memory["peak_rss_covers"] = "its steps only (VmHWM reset after building)" if reset_peak_rss() else "the whole process (VmHWM could not be reset)"
    if device.type == "cuda":
        memory["cuda_allocated_built_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _reply({"ready": True, "build_seconds": build_seconds, "student_kernel": _student_kernel(cfg, device)})

    for command in sys.stdin:
        command = command.strip()
        if command == "step":
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with _stall_traces():
                out = step()
                sync(device)
            out.update(s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, load=os.getloadavg()[0])
            out.update(follow_up() if follow_up else {})
            if device.type == "cuda":
                # NOTE: Triton choices this step's backward tuned go to the shared file now, not at
                # the next forward: the other items' first steps then load them instead of retuning.
                _autotune_cache.sync()
            _reply(out)
        elif command == "memory":  # before any profiling, which has its own overheads
            memory["peak_rss_bytes"] = status_bytes("VmHWM")
            memory["peak_rss_above_baseline_bytes"] = memory["peak_rss_bytes"] - rss_baseline
            if device.type == "cuda":
                memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            _reply({"memory": memory, "build_seconds": build_seconds, "allocator": allocator, "torch_threads": torch.get_num_threads()})
        elif command == "profile":
            _reply(profile_step(step, device))


def _student_kernel(cfg, device: torch.device) -> str:
    """The implementation the student's mixers run ("cuda": mamba_ssm's kernels; "chunked": the
    pure-PyTorch path "auto" falls back to when they do not load), so a GPU result says which."""
    from cald_scale.mixers.ops.dispatch import resolve_kernel

    conversion = cfg.student.conversion
    try:
        return resolve_kernel(getattr(conversion, conversion.mixer).kernel, device, conversion.mixer)
    except RuntimeError as err:
        return f"unavailable: {err}"


# -- parent: start the workers, step them in turn --------------------------------------------
class WorkerFailed(RuntimeError):
    pass


class Worker:
    """One item's process; ``call`` sends a command and returns its reply."""

    def __init__(self, item: str, args, teacher: Path, log_dir: Path):
        self.item = item
        self.log = log_dir / f"{item}.log"
        cmd = [
            sys.executable, __file__, "--item", item, "--teacher", str(teacher), "--device", args.device, "--dtype", args.dtype,
            "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--trainable", args.trainable, "--phase", args.phase,
        ] + (["--threads", str(args.threads)] if args.threads else [])
        env = child_env()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        raise WorkerFailed(f"{self.item} exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")

    def call(self, command: str) -> dict:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited: read() says why
        return self.read()

    def end_input(self) -> None:
        """End of stdin ends the worker."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout_s: float = 60) -> None:
        """Wait for the worker to end; one that does not end soon is killed."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def close_workers(workers) -> None:
    """All at once: one by one, the GPU run's workers took ~20 s to end (CUDA teardown each)."""
    workers = list(workers)
    for worker in workers:
        worker.end_input()
    for worker in workers:
        worker.wait()


def _item_result(steps: list[dict], memory: dict, tokens: int) -> dict:
    seconds = [s["s"] for s in steps]
    median = statistics.median(seconds)
    result = {
        "median_s": median,
        "min_s": min(seconds),
        "tokens_per_s": tokens / median,
        "step_seconds": seconds,
        # NOTE: on a shared CPU, wall time also counts cores taken by other processes; the CPU
        # time of this process (all threads) is less sensitive to that (but counts spinning threads).
        "median_cpu_s": statistics.median(s["cpu_s"] for s in steps),
        "cpu_seconds": [s["cpu_s"] for s in steps],
        "load_average_1min": [s["load"] for s in steps],
        **memory,
    }
    if "optimizer_step_s" in steps[0]:
        result["median_optimizer_step_s"] = statistics.median(s["optimizer_step_s"] for s in steps)  # not in median_s
    if "loss" in steps[0]:
        result["last_loss"] = steps[-1]["loss"]
    if "deepspeed_linear_calls" in steps[0]:
        result["deepspeed_linear_calls"] = steps[-1]["deepspeed_linear_calls"]
    return result


def run_items(args, teacher: Path, log_dir: Path, publish) -> None:
    """Every item's measurements (or its error), and the distillation step's profile when asked for,
    handed to ``publish(items, profiled, partial=None)``: after every timed round (``partial`` says
    how many: a cap that kills the process keeps them), then the measurements alone (a cap that
    ends the profile keeps them), then again with the profile."""
    workers, results = {}, {}
    started: dict[str, Worker] = {}
    kernels: dict[str, str] = {}

    def await_build(item: str) -> None:
        try:
            built = started[item].read()
            workers[item] = started[item]
            kernels[item] = built["student_kernel"]
            print(f"[train_speed] {_elapsed()} built {item} in {built['build_seconds']:.1f} s", flush=True)
        except WorkerFailed as err:
            results[item] = {"error": str(err)}

    try:
        # "sequential": each item is built before the next starts, so build peaks do not add
        # up (CPU). "parallel": all start at once, their imports and builds overlapping (CUDA:
        # 73 s of the second GPU run's 146 s went to starting the four items one by one).
        for item in args.items:
            print(f"[train_speed] {_elapsed()} building {item} ...", flush=True)
            started[item] = Worker(item, args, teacher, log_dir)
            if args.build == "sequential":
                await_build(item)
        if args.build == "parallel":
            for item in args.items:
                await_build(item)
        def measured(rounds: dict[str, list[dict]]) -> dict:
            """Every item's result from the rounds run so far."""
            steps = {item: replies[args.warmup:] for item, replies in rounds.items()}
            for item, worker in list(workers.items()):
                if not steps[item]:
                    results[item] = {
                        "error": f"no step after the {args.warmup} warmup steps within --time-budget {args.time_budget} s",
                        "warmup_step_seconds": [r["s"] for r in rounds[item]],  # what the first steps cost (GPU: Triton tuning)
                    }
                    continue
                try:
                    results[item] = _item_result(steps[item], worker.call("memory"), args.batch * args.seq_len)
                except WorkerFailed as err:  # its steps were timed, but a result without memory is no result
                    results[item] = {"error": str(err)}
                    del workers[item]
                    continue
                if "student" in item or "distill" in item:
                    results[item]["student_kernel"] = kernels[item]
            return {item: results[item] for item in args.items}

        def after_round(done: int, rounds: dict[str, list[dict]]) -> None:
            # NOTE: published after every timed round, so that a cap that kills this process
            # (gpu_check's step limit) leaves the rounds it finished on disk.
            if done > args.warmup:
                publish(measured(rounds), None, partial=f"{done - args.warmup} of {args.steps} timed rounds")

        rounds = _rounds(workers, results, args.warmup + args.steps, args.warmup, args.time_budget, after_round=after_round)
        steps = {item: replies[args.warmup:] for item, replies in rounds.items()}
        items = measured(rounds)
        publish(items, None)
        if "distill_step" in workers and (args.profile or (args.phase == "end_to_end" and _misses_target(steps))):
            # NOTE: the profile a missed target brings is skipped past the budget (an explicit --profile is not).
            if not args.profile and args.time_budget is not None and time.perf_counter() - _STARTED > args.time_budget:
                print(f"[train_speed] {_elapsed()} no profile: the time budget is spent", flush=True)
                return
            try:  # the measurements above stand whatever happens here
                print("[train_speed] profiling one distill step ...", flush=True)
                profiled = workers["distill_step"].call("profile")
            except WorkerFailed as err:
                profiled = {"error": str(err)}
            publish(items, profiled)
    finally:
        close_workers(started.values())


_STARTED = time.perf_counter()


def _elapsed() -> str:
    return f"+{time.perf_counter() - _STARTED:.0f}s"


def _rounds(
    workers: dict[str, Worker], results: dict, rounds: int, warmup: int, budget_s: float | None = None, after_round=None,
) -> dict[str, list[dict]]:
    """``rounds`` rounds of one step of each item in turn, the first ``warmup`` of them untimed; a
    worker that fails is dropped (its error kept). Past ``budget_s`` seconds since the start no new
    round begins (fewer timed steps, not no result). ``after_round(rounds done, replies so far)``
    runs after each."""
    replies = {item: [] for item in workers}
    for i in range(rounds):
        if budget_s is not None and i > 0 and time.perf_counter() - _STARTED > budget_s:
            print(f"[train_speed] {_elapsed()} time budget {budget_s:.0f} s spent: {i} of {rounds} rounds", flush=True)
            break
        for item, worker in list(workers.items()):
            if i == 0:  # the first step of an item is the slow one (CUDA/Triton set-up, tuning)
                print(f"[train_speed] {_elapsed()} first step of {item} ...", flush=True)
            try:
                reply = worker.call("step")
            except WorkerFailed as err:
                results[item] = {"error": str(err)}
                del workers[item]
                continue
            label = f"warmup round {i + 1}" if i < warmup else f"timed round {i + 1 - warmup}"
            print(f"[train_speed] {_elapsed()} {label}: {item} {reply['s']:.3f} s", flush=True)
            replies[item].append(reply)
        if after_round is not None:
            after_round(i + 1, replies)
    return replies


def _misses_target(steps: dict[str, list[dict]]) -> bool:
    if not all(steps.get(item) for item in ("teacher_forward", "student_forward_backward", "distill_step")):
        return False
    median = {item: statistics.median(s["s"] for s in steps[item]) for item in steps}
    return median["distill_step"] > TARGET_RATIO * (median["teacher_forward"] + median["student_forward_backward"])


def _peak(item: dict) -> int:
    memory = item["memory"]
    return memory.get("cuda_peak_allocated_bytes", memory["peak_rss_bytes"])


def summarize(items: dict[str, dict], phase: str = "end_to_end") -> dict:
    """The ratios and their targets. The target is the end-to-end step's: a teacher-forced step's
    student work (blocks on the teacher's inputs, no LM head) is not student_forward_backward, so
    there the ratio is reported but the target does not apply (its pass is None)."""
    target = f"distill_step <= {TARGET_RATIO} x (teacher_forward + student_forward_backward), median s/step"
    applies = phase == "end_to_end"
    unscored = {"pass": None, "applies": False, "why": f"defined for the end-to-end step, not a {phase} one"}
    ok = {name for name, r in items.items() if "error" not in r}
    summary: dict = {"ratios": {}}
    if {"distill_step", "teacher_finetune_step"} <= ok:
        summary["ratios"]["distill_over_teacher_finetune"] = items["distill_step"]["median_s"] / items["teacher_finetune_step"]["median_s"]
        summary["ratios"]["peak_memory_distill_over_teacher_finetune"] = _peak(items["distill_step"]) / _peak(items["teacher_finetune_step"])
    if {"teacher_finetune_step", "teacher_finetune_plain_step"} <= ok:  # what ZeRO-3 costs a plain fine-tuning step (no target)
        summary["ratios"]["teacher_finetune_zero3_over_plain"] = items["teacher_finetune_step"]["median_s"] / items["teacher_finetune_plain_step"]["median_s"]
    for item in (*LEAF_ITEMS, "distill_step_regather_all", "distill_step_deepspeed_linear"):  # what leaves, the trimmed step end and our linear save (no target)
        if {"distill_step", item} <= ok:
            summary["ratios"][f"{item.replace('_step', '')}_over_distill"] = items[item]["median_s"] / items["distill_step"]["median_s"]
    needed = {"distill_step", "teacher_forward", "student_forward_backward"}
    if not needed <= ok:
        summary["targets"] = {"distill_over_unavoidable": {"target": target, "value": None, **({"pass": False} if applies else unscored), "error": f"{sorted(needed - ok)} failed"}}
        return summary

    def over_unavoidable(key: str) -> float:
        return items["distill_step"][key] / (items["teacher_forward"][key] + items["student_forward_backward"][key])

    ratio = over_unavoidable("median_s")
    summary["unavoidable_s"] = items["teacher_forward"]["median_s"] + items["student_forward_backward"]["median_s"]
    summary["ratios"] = {
        "distill_over_unavoidable": ratio,
        # The same ratio from each item's fastest step and from CPU time (less sensitive to a busy machine).
        "distill_over_unavoidable_min_s": over_unavoidable("min_s"),
        "distill_over_unavoidable_cpu_s": over_unavoidable("median_cpu_s"),
        **summary["ratios"],
    }
    summary["targets"] = {"distill_over_unavoidable": {"target": target, "value": ratio, **({"pass": ratio <= TARGET_RATIO} if applies else unscored)}}
    return summary


def _noise(items: dict[str, dict], threads: int | None) -> str:
    """What says other processes took this run's cores: uneven steps, or (one thread) wall time beyond CPU time."""
    signs = []
    for name, r in items.items():
        if "error" in r:
            continue
        spread = max(r["step_seconds"]) / min(r["step_seconds"])
        if spread > 1.25:
            signs.append(f"{name}: slowest step {spread:.2f}x the fastest")
        if threads == 1 and r["median_s"] > 1.15 * r["median_cpu_s"]:
            signs.append(f"{name}: wall {r['median_s'] / r['median_cpu_s']:.2f}x CPU time")
    return "; ".join(signs)


def _default_seq_len(args) -> int:
    return 64 if args.narrow else 256 if args.quick else 512


def _default_name(args) -> str:
    parts = ["train_speed"]
    parts += [args.device] if args.device != "cpu" else []
    parts += [args.geometry] if args.geometry != "SmolLM2-135M" else []
    parts += [args.dtype] if args.dtype != "float32" else []
    parts += ["quick"] if args.quick else []
    parts += ["narrow"] if args.narrow else []
    parts += [f"b{args.batch}x{args.seq_len}"] if (args.batch, args.seq_len) != (1, _default_seq_len(args)) else []
    parts += [f"trains_{args.trainable}"] if args.trainable != "mixers" else []
    parts += [args.phase] if args.phase != "end_to_end" else []
    return "_".join(parts)


def markdown(result: dict) -> str:
    """A short report generated from the JSON."""
    gb = 1e9
    s, m = result["shapes"], result["machine"]
    cpu = result["device"] == "cpu"
    lines = [
        f"# train_speed ({m['date'][:10]})",
        "",
        f"{s['geometry']} ({s['layers']} layers, width {s.get('hidden_size', '?')}), {result['dtype']}, batch {s['batch']} x {s['seq_len']} tokens, student trains "
        f"{s['student_trainable']}, {result['device']} (torch threads per item: {s['torch_threads']}; student mixers: {s.get('student_kernel') or '?'} path); median of {_timed(s)} after {s['warmup']} warmup, the items stepping in turn. "
        f"{m['gpu'] if not cpu and 'gpu' in m else m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, transformers {m['transformers']}.",
        "",
        "| item | s/step (median) | s/step (min) | tokens/s | peak memory (GB) |" + (" above process baseline (GB) |" if cpu else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if cpu else ""),
    ]
    for name, r in result["items"].items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | |" + (" |" if cpu else ""))
            continue
        above = f" {r['memory']['peak_rss_above_baseline_bytes'] / gb:.2f} |" if cpu else ""
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['tokens_per_s']:.0f} | {_peak(r) / gb:.2f} |{above}")
    lines += ["", "| ratio | value | target | pass |", "|---|---:|---|---|"]
    for name, value in result.get("ratios", {}).items():
        t = result["targets"].get(name)
        verdict = "" if not t else t["pass"] if t.get("applies", True) else f"n/a ({t['why']})"
        lines.append(f"| {name} | {value:.3f} | {t['target'] if t else ''} | {verdict} |")
    for name, t in result["targets"].items():
        if name not in result.get("ratios", {}):
            lines.append(f"| {name} | n/a ({t.get('error', '')}) | {t['target']} | {t['pass']} |")
    student = result["items"]["student_forward_backward"]
    if "median_optimizer_step_s" in student:
        lines += ["", f"The plain student's optimizer step (torch AdamW, fused), timed apart and not in the sum: {student['median_optimizer_step_s']:.3f} s."]
    lines += ["", f"Memory: {result['memory_measure']}."]
    if "regions_s" in result.get("distill_profile", {}):
        lines += ["", "Where one distillation step's time goes (cProfile, cumulative s; nested regions overlap):", ""]
        lines += [f"- {name.strip()}: {sec:.2f}" for name, sec in result["distill_profile"]["regions_s"].items()]
    for key in ("warning", "note"):
        if result.get(key):
            lines += ["", f"{key.capitalize()}: {result[key]}"]
    return "\n".join(lines) + "\n"


def _timed(shapes: dict) -> str:
    timed = shapes.get("timed_steps", shapes["steps"])
    return f"{timed} steps" if timed >= shapes["steps"] else f"{timed} timed steps (**partial**: {shapes['steps']} asked)"


def assemble(args, geometry: str, items: dict, profiled: dict | None, load_before: float) -> dict:
    """The result file's content: shapes, machine, items, ratios and targets, profile, warnings."""
    summary = summarize(items, args.phase)
    # NOTE: a file published after an early round (or cut by --time-budget) holds fewer timed
    # steps than asked; it says so, and its medians are of what ran.
    timed = min((len(item["step_seconds"]) for item in items.values() if "step_seconds" in item), default=0)
    result = {
        "benchmark": "train_speed",
        "machine": machine(),
        "device": args.device,
        "dtype": args.dtype,
        "shapes": {
            "geometry": args.geometry, "layers": GEOMETRIES[geometry]["num_hidden_layers"], "hidden_size": GEOMETRIES[geometry]["hidden_size"],
            "batch": args.batch, "seq_len": args.seq_len,
            "tokens_per_step": args.batch * args.seq_len, "steps": args.steps, "timed_steps": timed, "partial": timed < args.steps, "warmup": args.warmup, "student_trainable": args.trainable, "phase": args.phase,
            "time_budget_s": args.time_budget, "build": args.build,
            "student_kernel": next((item["student_kernel"] for item in items.values() if "student_kernel" in item), None),
            "torch_threads": items["teacher_forward"].get("torch_threads", args.threads),
        },
        "memory_measure": (
            "torch.cuda.max_memory_allocated over the item's steps (model states included)" if args.device == "cuda" else
            "the item's process resident high-water mark (VmHWM) over its steps, reset after building; it includes the process "
            "baseline (imports: memory.rss_baseline_bytes) and allocator slack"
        ),
        "load_average_before_run": load_before,
        "items": items,
        **summary,
        "pass": overall_pass(summary["targets"]),  # None for a teacher-forced phase: nothing scored
    }
    if profiled:
        result["distill_profile"] = profiled
    noisy = _noise(items, args.threads)
    if noisy:
        result["warning"] = f"timings disturbed by other processes ({noisy}); rerun on a quieter machine before trusting the ratios"
    notes = []
    if args.quick:
        notes.append(f"--quick: {QUICK_LAYERS} of {GEOMETRIES[args.geometry]['num_hidden_layers']} layers and short sequences; not the headline numbers.")
    if args.phase == "teacher_forced":
        notes.append(
            "--phase teacher_forced: each student block runs on the teacher's input to it, with no LM head; the target is defined for the "
            "end-to-end step (student_forward_backward is not this phase's student work), so compare the distillation items with each other."
        )
    if args.narrow:
        notes.append(
            "--narrow: the geometry's depth and vocabulary at width 64, a host-bound proxy (the arithmetic is negligible, so the time is "
            "op dispatch and ZeRO-3's per-module work, which is what bounds a GPU step at these sizes); not a measurement of the real widths."
        )
    if notes:
        result["note"] = " ".join(notes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} layers of the geometry, batch 1 x 256 (not the headline)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="SmolLM2-135M")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per step")
    parser.add_argument("--seq_len", type=positive_int, default=None, help="tokens per sequence (default 512; --quick 256)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps per item (default 4; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on cuda, else 1)")
    parser.add_argument("--trainable", choices=["mixers", "all"], default="mixers", help="what the student trains (the run config's default: mixers)")
    parser.add_argument("--phase", choices=["end_to_end", "teacher_forced"], default="end_to_end", help="the distillation items' phase mode (default end_to_end)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per item (default: 1 on cpu, torch's own on cuda)")
    parser.add_argument(
        "--build", choices=["sequential", "parallel"], default=None,
        help="start the items' processes one after another or all at once (default: parallel on cuda, sequential on cpu)",
    )
    parser.add_argument("--profile", action="store_true", help="profile one distillation step even when the target is met")
    parser.add_argument("--out", type=output_file, default=None)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no new round of steps starts past it (the result says how many ran)")
    parser.add_argument("--log-dir", default=None, help="keep each item's process log here (default: a temporary folder)")
    parser.add_argument("--cache", default=os.environ.get("CALD_SCALE_CACHE", str(Path.home() / ".cache" / "cald_scale")) + "/bench_teachers")
    parser.add_argument(
        "--compare-leaves", action="store_true",
        help=f"also time the distillation step with only frozen parts as ZeRO-3 leaves and with a hook on every submodule ({', '.join(LEAF_ITEMS)})",
    )
    parser.add_argument(
        "--narrow", action="store_true",
        help="the geometry's depth and vocabulary at width 64 (a host-bound proxy: the arithmetic is negligible, as on a GPU at these sizes; default 1 x 64 tokens)",
    )
    parser.add_argument(
        "--compare-zero3", action="store_true",
        help="also time the teacher's fine-tuning step without ZeRO-3 (plain HF model, torch AdamW): what our ZeRO-3 engine alone costs a step; "
        "and the distillation step with DeepSpeed's own end of step (every persistent parameter gathered again) and with DeepSpeed's own linear",
    )
    parser.add_argument("--item", choices=[*ITEMS, *LEAF_ITEMS, *ZERO3_ITEMS], default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_len = args.seq_len or _default_seq_len(args)
    args.steps = args.steps or (3 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device == "cuda" else 1)
    # NOTE: one thread per item on CPU: where other processes hold cores, OpenMP threads that
    # outnumber the free ones wait at every barrier, which slowed some items 15x at random here.
    args.threads = args.threads or (1 if args.device == "cpu" else None)
    args.build = args.build or ("parallel" if args.device == "cuda" else "sequential")
    args.items = (*ITEMS, *(LEAF_ITEMS if args.compare_leaves else ()), *(ZERO3_ITEMS if args.compare_zero3 else ()))
    if args.item:
        serve_item(args)
        return
    if no_cuda_for(args.device):
        parser.error("--device cuda: no CUDA device here")
    if args.dtype == "bfloat16" and args.device != "cuda":
        parser.error("--dtype bfloat16: the ZeRO-3 engines train in bf16 only on a bf16-capable accelerator (use --device cuda)")
    stop_if_parse_only(args)

    geometry = truncated_geometry(args.geometry, QUICK_LAYERS) if args.quick else args.geometry
    geometry = narrow_geometry(geometry) if args.narrow else geometry
    teacher = write_random_teacher(geometry, Path(args.cache) / geometry)
    load_before = os.getloadavg()[0]  # before this run's workers start
    with contextlib.nullcontext(args.log_dir) if args.log_dir else tempfile.TemporaryDirectory() as logs:
        Path(logs).mkdir(parents=True, exist_ok=True)

        def publish(items: dict, profiled: dict | None, partial: str | None = None) -> None:
            result = assemble(args, geometry, items, profiled, load_before)
            if partial is not None:  # only to an explicit --out: a run cut short never replaces a committed result
                save_partial(result, args.out, done=partial)
                return
            path = write_result(_default_name(args), result, args.out)
            path.with_suffix(".md").write_text(markdown(result))
            print(f"[train_speed] {_elapsed()} wrote {path}" + (" (with the profile)" if profiled else ""), flush=True)

        run_items(args, teacher, Path(logs), publish)


if __name__ == "__main__":
    from cald_scale.launch import finish

    finish(main)  # leave as a training rank does: no interpreter finalization under gloo
