"""Peak host memory per rank (and device memory, on CUDA) of the ZeRO-3 streamed distillation step at real geometries, against its accounting.

    python benchmarks/scale_memory.py [--quick] [--out FILE]

Each case launches the real deepspeed launcher (1 or 2 CPU ranks) on benchmarks/_scale_memory_worker.py,
which builds teacher and student as the training job does (partitioned under zero.Init,
filled tensor by tensor from a random-weight checkpoint of the real geometry), then trains
a few steps at 4 x 256 tokens (global). Beside each measurement the accounting predicts:

    per rank = process baseline (imports, measured before building)
             + (16 B x trainable + 4 B x frozen student-own + 4 B x teacher) / ranks
             + activations of one step (live-tensor accounting of every tensor its forward
               creates, gathered and prefetched parameters included; measured on the last step)

16 B per trainable fp32 parameter is ZeRO-3 with AdamW in fp32: the parameter partition (4 B),
which is also its own fp32 master (engines/zero3.share_fp32_master; DeepSpeed alone keeps a
second copy: 20 B), its gradient partition (4 B) and Adam's two moments (8 B). With
student.trainable=mixers the copied weights are the teacher's own tensors and counted once.

Targets: every measurement within 1.3x of its prediction; Qwen2.5-0.5B trains everything on
1 rank within 18 GB; the per-rank peak at 2 ranks <= 0.6x the 1-rank peak; Llama-3.2-1B with
frozen copied weights trains on 2 ranks within 24 GB in total.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env, free_port, machine, output_file, write_random_teacher, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

FULL = [
    ("SmolLM2-135M", "all", 1),
    ("SmolLM2-135M", "all", 2),
    ("Qwen2.5-0.5B", "all", 1),
    ("Qwen2.5-0.5B", "all", 2),
    ("Llama-3.2-1B", "mixers", 1),
    ("Llama-3.2-1B", "mixers", 2),
]
QUICK = [("SmolLM2-135M", "all", 1), ("SmolLM2-135M", "all", 2)]
BYTES_PER_TRAINABLE = 16  # fp32 parameter (also the master) + gradient + 2 Adam moments
BYTES_PER_FROZEN = 4


def run_case(geometry: str, trainable: str, ranks: int, steps: int, cache: Path, out: Path) -> dict:
    teacher = write_random_teacher(geometry, cache / geometry)
    case_dir = out / f"{geometry}_{trainable}_{ranks}r"
    env = child_env(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
        str(REPO / "benchmarks" / "_scale_memory_worker.py"),
        "--teacher", str(teacher), "--trainable", trainable, "--steps", str(steps), "--out", str(case_dir),
    ]
    print(f"[scale_memory] {geometry}, trainable={trainable}, {ranks} rank(s) ...", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    case = {"geometry": geometry, "trainable": trainable, "ranks": ranks, "returncode": proc.returncode}
    files = sorted(case_dir.glob("rank*.json"))
    if proc.returncode != 0 or len(files) != ranks:
        case["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        return case
    case["per_rank"] = []
    for path in files:
        r = json.loads(path.read_text())
        p = r["params"]
        states = (BYTES_PER_TRAINABLE * p["student_trainable"] + BYTES_PER_FROZEN * (p["student_frozen_own"] + p["teacher"])) / ranks
        prediction = r["rss_start_bytes"] + states + r["activation_bytes"]
        r["prediction"] = {
            "baseline_bytes": r["rss_start_bytes"],
            "model_states_bytes": states,
            "activation_bytes": r["activation_bytes"],
            "total_bytes": prediction,
        }
        r["measured_over_predicted"] = r["peak_rss_bytes"] / prediction
        case["per_rank"].append(r)
    case["peak_rss_bytes_max_rank"] = max(r["peak_rss_bytes"] for r in case["per_rank"])
    case["peak_rss_bytes_all_ranks"] = sum(r["peak_rss_bytes"] for r in case["per_rank"])
    return case


def evaluate_targets(cases: list[dict]) -> dict:
    ok = [c for c in cases if "per_rank" in c]
    ratios = [r["measured_over_predicted"] for c in ok for r in c["per_rank"]]
    targets = {
        "all_cases_ran": {"target": "every case finishes", "value": [c.get("error", "ok")[:200] for c in cases], "pass": len(ok) == len(cases)},
        "within_1.3x_of_prediction": {"target": "1/1.3 <= measured / predicted <= 1.3 for every rank", "value": ratios, "pass": bool(ratios) and all(1 / 1.3 <= x <= 1.3 for x in ratios)},
    }
    by = {(c["geometry"], c["trainable"], c["ranks"]): c for c in ok}
    for geometry, trainable in {(c["geometry"], c["trainable"]) for c in cases}:
        one, two = by.get((geometry, trainable, 1)), by.get((geometry, trainable, 2))
        if one and two:
            ratio = two["peak_rss_bytes_max_rank"] / one["peak_rss_bytes_max_rank"]
            targets[f"{geometry}_{trainable}_2_ranks_vs_1"] = {"target": "per-rank peak at 2 ranks <= 0.6 x the 1-rank peak", "value": ratio, "pass": ratio <= 0.6}
    qwen = by.get(("Qwen2.5-0.5B", "all", 1))
    if any(c["geometry"] == "Qwen2.5-0.5B" for c in cases):
        value = qwen["peak_rss_bytes_max_rank"] / GB if qwen else None
        targets["Qwen2.5-0.5B_all_1_rank_within_18GB"] = {"target": "<= 18 GB", "value": value, "pass": value is not None and value <= 18}
    llama = by.get(("Llama-3.2-1B", "mixers", 2))
    if any(c["geometry"] == "Llama-3.2-1B" for c in cases):
        value = llama["peak_rss_bytes_all_ranks"] / GB if llama else None
        targets["Llama-3.2-1B_mixers_2_ranks_within_24GB_total"] = {"target": "<= 24 GB summed over ranks", "value": value, "pass": value is not None and value <= 24}
    return targets


def _phase_peaks(rank: dict) -> str:
    phases = rank.get("phase_peaks") or {}
    names = ("forward", "backward", "optimizer_step")
    if not all(n in phases for n in names):
        return "n/a"
    return " / ".join(f"{phases[n]['peak_bytes'] / GB:.2f}" for n in names)


def markdown(result: dict) -> str:
    lines = [
        f"# scale_memory ({result['machine']['date']}, {result['machine']['cpu_count']} CPU cores, torch {result['machine']['torch']})",
        "",
        "Peak resident memory per rank (GB = 1e9 bytes) of the ZeRO-3 streamed step, 4 x 256 tokens per step (global), fp32, random weights.",
        "",
        "| geometry | trainable | ranks | rank | baseline | model states | activations | predicted | measured peak | measured / predicted | peak in forward / backward / optimizer step | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    devices = [
        f"| {c['geometry']} | {c['trainable']} | {c['ranks']} | {r['rank']} | {r['device']} | "
        f"{r['device_peak_allocated_bytes'] / GB:.2f} | {r['device_peak_reserved_bytes'] / GB:.2f} |"
        for c in result["cases"]
        for r in c.get("per_rank", [])
        if r.get("device_peak_allocated_bytes") is not None
    ]
    for c in result["cases"]:
        if "per_rank" not in c:
            lines.append(f"| {c['geometry']} | {c['trainable']} | {c['ranks']} | - | failed (rc {c['returncode']}) | | | | | | | |")
            continue
        for r in c["per_rank"]:
            p = r["prediction"]
            lines.append(
                f"| {c['geometry']} | {c['trainable']} | {c['ranks']} | {r['rank']} | {p['baseline_bytes'] / GB:.2f} | {p['model_states_bytes'] / GB:.2f} | "
                f"{p['activation_bytes'] / GB:.2f} | {p['total_bytes'] / GB:.2f} | {r['peak_rss_bytes'] / GB:.2f} | {r['measured_over_predicted']:.2f} | "
                f"{_phase_peaks(r)} | {sum(r['step_seconds'][1:]) / max(1, len(r['step_seconds']) - 1):.1f} |"
            )
    if devices:
        lines += ["", "Peak device memory per rank (GB):", "", "| geometry | trainable | ranks | rank | device | allocated | reserved |", "|---|---|---|---|---|---|---|"]
        lines += devices
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    for name, t in result["targets"].items():
        value = t["value"] if not isinstance(t["value"], list) else ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in t["value"])
        lines.append(f"| {name}: {t['target']} | {value if not isinstance(value, float) else f'{value:.3f}'} | {t['pass']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M geometry only")
    parser.add_argument("--out", type=output_file, default=None, help="JSON result path (default benchmarks/results/scale_memory[_quick].json)")
    parser.add_argument("--cache", default=os.environ.get("CALD_SCALE_CACHE", str(Path.home() / ".cache" / "cald_scale")) + "/bench_teachers")
    args = parser.parse_args()
    cases = QUICK if args.quick else FULL
    steps = 3  # step 0 allocates the optimizer states; the phases are measured at step 1, the ledger at step 2
    work = Path(args.cache).parent / "scale_memory_runs"
    results = [run_case(g, t, r, steps, Path(args.cache), work) for g, t, r in cases]
    result = {
        "benchmark": "scale_memory",
        "machine": machine(),
        "accounting": {"bytes_per_trainable_param": BYTES_PER_TRAINABLE, "bytes_per_frozen_param": BYTES_PER_FROZEN, "dtype": "float32"},
        "tokens_per_step_global": 4 * 256,
        "cases": results,
        "targets": evaluate_targets(results),
    }
    result["pass"] = all(t["pass"] for t in result["targets"].values())
    name = "scale_memory" + ("_quick" if args.quick else "")
    path = write_result(name, result, args.out)
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
