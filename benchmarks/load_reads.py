"""What building ZeRO-3 models from a checkpoint costs each rank: bytes read, peak memory, time.

    python benchmarks/load_reads.py [--quick] [--geometry NAME] [--ranks N] [--out FILE]

Each rank of a real deepspeed launch (CPU ranks, gloo) builds the teacher and then the student
as the job does (``engines/models.py``): the teacher constructed under zero.Init and filled
tensor by tensor from a random-weight checkpoint of a real geometry (bf16 safetensors), keeping
its partition; then the Mamba2 student of the job's default conversion, sharing the teacher's
frozen tensors, its mixers initialised from the teacher's attention. Three ways, side by side,
each in a launch of its own:

- ``partition``: today's loader. No partition exists until it is written, each rank reads its
  partition's range of every tensor, and the rows of each attention projection its mixer
  partitions are made of;
- ``eager``: the loader of stop 60: DeepSpeed's partition() at construction (every partition
  resident from then on, a tied head's and the student's shared copies' too), and every layer's
  attention read whole for the mixer init (a placement that keeps everything);
- ``whole``: as ``eager``, and every tensor read whole (the same reader with its range reads
  hidden): the reads before stop 60 (whose construction also broadcast each new tensor).

Per rank: checkpoint bytes read by the teacher's load and by the student's mixer init; resident
memory at its peak while the teacher is constructed (under zero.Init, before any weight is read),
while its weights load (above the constructed model) and while the student is built (above the
loaded teacher); the seconds of each build; a digest of the partitions held (all ways must hold
the same values); what it holds after both builds, before and after a heap trim (as
``build_models`` does), against its partitions. Targets: equal partitions; at N ranks the
teacher's load reads at most 1.1/N of the checkpoint on each rank; the mixer init reads less of
the converted layers' attention than the whole on each rank; the teacher's build peak and the
student's lower than ``eager``'s; after the trim a rank holds at most 1.05x its partitions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env, free_port, machine, reset_peak_rss, status_bytes, truncated_geometry, write_random_teacher, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("partition", "eager", "whole")


class _Counting:
    """A weight reader that counts the bytes it hands out; ``ranges=False`` hides its range
    reads, so every tensor is read whole (the loader before stop 60)."""

    def __init__(self, reader, ranges: bool):
        self._reader, self.bytes = reader, 0
        self.first_asked: tuple[int, int] | None = None
        """(resident memory, its peak) when the reader was first asked for its keys: once the
        model it fills is constructed, before any weight is read."""
        if ranges:
            self.get_flat = self._get_flat
            self.read_flat_into = self._read_flat_into

    def keys(self):
        if self.first_asked is None:
            self.first_asked = (status_bytes("VmRSS"), status_bytes("VmHWM"))
        return self._reader.keys()

    def shape(self, key):
        return self._reader.shape(key)

    def get(self, key):
        tensor = self._reader.get(key)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _get_flat(self, key, start, stop):
        tensor = self._reader.get_flat(key, start, stop)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _read_flat_into(self, key, start, out):
        done = self._reader.read_flat_into(key, start, out)
        if done:
            self.bytes += out.numel() * out.element_size()
        return done


def _eager_construction(placement, ds_config: dict):
    """``placement`` constructing as stop 60 did: zero.Init without its broadcast, with DeepSpeed's
    own partition() of each parameter as it is built, and keeping every row of a mixer weight."""
    import dataclasses

    import deepspeed

    from cald_scale.engines.partitioned import _import_family_module

    class EagerInit(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    def construct(config):
        _import_family_module(config)
        return EagerInit(config_dict_or_path=ds_config)

    return dataclasses.replace(placement, construct=construct, kept=lambda tensor: None)


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.ds_tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from cald_scale.config import load_run_config
    from cald_scale.conversion.surgery import attention_prefixes, build_student
    from cald_scale.conversion.teacher import build_teacher, open_teacher
    from cald_scale.conversion.weights import open_weights
    from cald_scale.engines.distributed import init_distributed
    from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config
    from cald_scale.engines.host_memory import configure_host_allocator, return_free_memory
    from cald_scale.engines.partitioned import zero3_placement

    env = init_distributed()
    cfg = load_run_config(overrides=[f"teacher.name_or_path={args.teacher}", "train.global_batch_size=2"])
    configure_host_allocator(cfg.train.malloc_mmap_threshold)
    ds_config = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), cfg.train, env.world_size)
    placement = zero3_placement(ds_config)
    if args.mode != "partition":
        placement = _eager_construction(placement, ds_config)
    source, _ = open_teacher(cfg.teacher)
    files = open_weights(args.teacher)
    teacher_reader = _Counting(files, ranges=args.mode != "whole")
    source.weights = lambda: teacher_reader

    rss_before = status_bytes("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    teacher = build_teacher(source, placement)
    teacher_seconds = time.perf_counter() - started
    teacher_peak = status_bytes("VmHWM")
    built, built_peak = teacher_reader.first_asked
    load_peak = teacher_peak - built
    loaded = status_bytes("VmRSS")

    student_reader = _Counting(files, ranges=args.mode != "whole")
    reset_peak_rss()
    started = time.perf_counter()
    student = build_student(source.config, student_reader, cfg.student.conversion, seed=cfg.train.seed, placement=placement, share_with=teacher)
    student_seconds = time.perf_counter() - started
    student_peak = status_bytes("VmHWM") - loaded
    held = status_bytes("VmRSS") - rss_before
    return_free_memory()  # as build_models does after the builds
    held_params = {id(p): p for m in (teacher, student) for p in m.parameters()}.values()  # the student shares the teacher's
    kept = set(student.config.attention_layers)  # a hybrid's kept attention is shared, not read
    prefixes = tuple(p for i, p in enumerate(attention_prefixes(student.backbone, student.adapter)) if i not in kept)
    attention = sum(torch.Size(files.shape(k)).numel() * files.dtype(k).itemsize for k in files.keys() if k.startswith(prefixes))
    checkpoint = sum(torch.Size(files.shape(k)).numel() * files.dtype(k).itemsize for k in files.keys())
    Path(args.out, f"{args.mode}_rank{env.rank}.json").write_text(json.dumps({
        "bytes_read": teacher_reader.bytes,
        "checkpoint_bytes": checkpoint,
        "attention_bytes_read": student_reader.bytes,
        "attention_bytes": attention,
        "teacher_peak_above_start_bytes": teacher_peak - rss_before,
        "construction_peak_above_start_bytes": built_peak - rss_before,
        "load_peak_above_construction_bytes": load_peak,
        "teacher_held_bytes": loaded - rss_before,
        "student_build_peak_above_teacher_bytes": student_peak,
        "held_after_bytes": held,
        "held_after_trim_bytes": status_bytes("VmRSS") - rss_before,
        "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in held_params),
        "teacher_seconds": teacher_seconds,
        "student_seconds": student_seconds,
        "partitions_sha256": _digest(teacher),
        "student_mixers_sha256": _digest(student.backbone),
    }))


def launch(mode: str, teacher: Path, ranks: int, out: Path) -> list[dict]:
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
        str(Path(__file__).resolve()), "--worker", "--mode", mode, "--teacher", str(teacher), "--out", str(out),
    ]
    print(f"[load_reads] {mode}: {ranks} rank(s) ...", flush=True)
    env = child_env(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    files = [out / f"{mode}_rank{r}.json" for r in range(ranks)]
    if proc.returncode != 0 or not all(f.is_file() for f in files):
        raise RuntimeError(f"{mode} launch failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the geometry cut to 4 blocks")
    parser.add_argument("--geometry", default="Qwen2.5-0.5B")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load_reads[_quick].json; a --worker writes its rank files into this folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from cald_scale.launch import finish

        finish(lambda: worker(args))
        return
    geometry = truncated_geometry(args.geometry, 4) if args.quick else args.geometry
    cache = REPO / ".cache" / "benchmarks"
    teacher = write_random_teacher(geometry, cache / geometry)
    out = cache / "load_reads"
    out.mkdir(parents=True, exist_ok=True)
    runs = {mode: launch(mode, teacher, args.ranks, out) for mode in MODES}
    part, eager, whole = runs["partition"], runs["eager"], runs["whole"]

    def ratios(key: str, base: list[dict]) -> list[float]:
        return [round(p[key] / b[key], 3) for p, b in zip(part, base)]

    same = [
        len({r[key] for r in (p, e, w)}) == 1 for p, e, w in zip(part, eager, whole) for key in ("partitions_sha256", "student_mixers_sha256")
    ]
    share = [round(r["bytes_read"] / r["checkpoint_bytes"], 3) for r in part]
    targets = {
        "same_partitions": {"target": "every way holds the same teacher and student partitions, rank by rank", "value": same, "pass": all(same)},
        "bytes_per_rank": {"target": f"the teacher's load reads <= 1.1/{args.ranks} of the checkpoint on each rank", "value": share},
        "attention_read_lower": {"target": "the mixer init reads less of the attention than eager's whole layers (ratio < 1, each rank)", "value": ratios("attention_bytes_read", eager)},
        "teacher_peak_lower": {"target": "the teacher's build peak (construction and load) < eager's (ratio < 1, each rank)", "value": ratios("teacher_peak_above_start_bytes", eager)},
        "student_peak_lower": {"target": "the student's build peak above the teacher < eager's (ratio < 1, each rank)", "value": ratios("student_build_peak_above_teacher_bytes", eager)},
    }
    held = [round(r["held_after_trim_bytes"] / r["partition_bytes"], 3) for r in part]
    targets["held_is_the_partitions"] = {
        "target": "after the builds and a heap trim (as build_models does) each rank holds <= 1.05x its partitions", "value": held, "pass": all(x <= 1.05 for x in held),
    }
    targets["bytes_per_rank"]["pass"] = all(x <= 1.1 / args.ranks for x in share)
    for name in ("attention_read_lower", "teacher_peak_lower", "student_peak_lower"):
        targets[name]["pass"] = all(x < 1.0 for x in targets[name]["value"])
    result = {
        "benchmark": "load_reads",
        "geometry": geometry,
        "ranks": args.ranks,
        "machine": machine(),
        "runs": runs,
        "targets": targets,
        "pass": all(t["pass"] for t in targets.values()),
    }
    write_result("load_reads_quick" if args.quick else "load_reads", result, args.out)


if __name__ == "__main__":
    main()
