"""What building a ZeRO-3 teacher from its checkpoint costs each rank: bytes read, peak memory, time.

    python benchmarks/load_reads.py [--quick] [--geometry NAME] [--ranks N] [--out FILE]

Each rank of a real deepspeed launch (CPU ranks, gloo) builds the teacher as the job does:
constructed under zero.Init, then filled tensor by tensor from a random-weight checkpoint of
a real geometry (bf16 safetensors), keeping its partition. Two ways, side by side, each in a
launch of its own:

- ``partition``: each rank reads only its partition's range of every tensor (today's loader);
- ``whole``: each rank reads every tensor whole and keeps its partition (the loader before
  stop 60; the same reader with its range reads hidden).

Per rank: checkpoint bytes read; resident memory at its peak while the model is constructed
(under zero.Init, before any weight is read: the same both ways) and while its weights load
(above the constructed model: what the reads cost); the build's seconds; and a digest of the
partitions it holds (both ways must hold the same values). Targets: equal partitions; at N
ranks each reads at most 1.1/N of the checkpoint; the load's peak is lower than the whole reads'.
"""

from __future__ import annotations

import argparse
import gc
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
MODES = ("partition", "whole")


class _Counting:
    """A weight reader that counts the bytes it hands out; ``ranges=False`` hides its range
    reads, so every tensor is read whole (the loader before stop 60)."""

    def __init__(self, reader, ranges: bool):
        self._reader, self.bytes = reader, 0
        if ranges:
            self.get_flat = self._get_flat
            self.read_flat_into = self._read_flat_into

    def keys(self):
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


def worker(args) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    sys.path.insert(0, str(REPO))
    from cald_scale.config import load_run_config
    from cald_scale.conversion.weights import load_weights, open_weights
    from cald_scale.engines.distributed import init_distributed
    from cald_scale.engines.ds_config import load_ds_config, resolve_ds_config
    from cald_scale.engines.host_memory import configure_host_allocator
    from cald_scale.engines.partitioned import zero3_placement

    env = init_distributed()
    cfg = load_run_config(overrides=[f"teacher.name_or_path={args.teacher}", "train.global_batch_size=2"])
    configure_host_allocator(cfg.train.malloc_mmap_threshold)
    placement = zero3_placement(resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), cfg.train, env.world_size))
    config = AutoConfig.from_pretrained(args.teacher)
    reader = _Counting(open_weights(args.teacher), ranges=args.mode == "partition")
    rss_before = status_bytes("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    # As build_teacher builds it (conversion/teacher.py), with the counting reader.
    with placement.construct(config), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # no_init_weights also skips tying
    gc.collect()  # the untied head's tensor
    built, built_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    reset_peak_rss()
    load_weights(model, reader, placement.assign, shape_of=placement.shape_of)
    seconds = time.perf_counter() - started
    peak = max(status_bytes("VmHWM"), built_peak)
    load_peak = status_bytes("VmHWM") - built
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.ds_tensor.detach().float().numpy().tobytes())
    files = open_weights(args.teacher)
    checkpoint = sum(torch.Size(files.shape(k)).numel() * files.dtype(k).itemsize for k in files.keys())
    Path(args.out, f"{args.mode}_rank{env.rank}.json").write_text(json.dumps({
        "bytes_read": reader.bytes,
        "checkpoint_bytes": checkpoint,
        "peak_above_start_bytes": peak - rss_before,
        "construction_peak_above_start_bytes": built_peak - rss_before,
        "load_peak_above_construction_bytes": load_peak,
        "held_after_bytes": status_bytes("VmRSS") - rss_before,
        "seconds": seconds,
        "partitions_sha256": digest.hexdigest(),
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
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load_reads[_quick].json)")
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
    part, whole = runs["partition"], runs["whole"]
    share = [r["bytes_read"] / r["checkpoint_bytes"] for r in part]
    peaks = [p["load_peak_above_construction_bytes"] / w["load_peak_above_construction_bytes"] for p, w in zip(part, whole)]
    targets = {
        "same_partitions": {"target": "both ways hold the same partition values, rank by rank", "value": [p["partitions_sha256"] == w["partitions_sha256"] for p, w in zip(part, whole)]},
        "bytes_per_rank": {"target": f"each rank reads <= 1.1/{args.ranks} of the checkpoint", "value": [round(x, 3) for x in share]},
        "load_peak_lower": {"target": "the load's peak above the constructed model < the whole reads' (ratio < 1)", "value": [round(x, 3) for x in peaks]},
    }
    targets["same_partitions"]["pass"] = all(targets["same_partitions"]["value"])
    targets["bytes_per_rank"]["pass"] = all(x <= 1.1 / args.ranks for x in share)
    targets["load_peak_lower"]["pass"] = all(x < 1.0 for x in peaks)
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
