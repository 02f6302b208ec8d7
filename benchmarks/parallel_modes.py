"""Parallel modes side by side: ZeRO-3 streamed, pipeline, and the teacher-forced phase, on the same model and ranks.

    python benchmarks/parallel_modes.py [--quick] [--ranks 2] [--layers 4,8] [--steps N] [--seq_len L] [--fresh]

Every mode is a real training run (``deepspeed launch/train.py``, 2 CPU ranks by default)
of the same random-weight teacher (SmolLM2-135M widths, cut to a few blocks) into a Mamba2
student on the same data, global batch and steps:

- ``zero3_streamed``: both models partitioned by ZeRO-3 over every rank, end-to-end CALD
  streamed stage by stage (the default mode);
- ``zero3_teacher_forced``: the same engines, the teacher-forced phase (every block learns
  on the teacher's input, no backward across blocks);
- ``pipeline``: ds_configs/pipeline.json, one stage per rank (stage k holds teacher and
  student blocks [a_k, b_k)), end-to-end CALD; ZeRO-1 across replicas;
- ``pipeline_teacher_forced``: the pipeline with the teacher-forced phase.

Each mode runs at two depths, so the per-layer cost (seconds per step and resident bytes
per rank per added block) is the slope between them. Per run: training tokens/s (median
over the steps after the first, from metrics.jsonl) and the peak resident memory of every
rank (the report's memory_per_rank; it covers the whole process, building included).

The JSON (benchmarks/results/parallel_modes[_quick].json) and the Markdown beside it carry
the measurements, the per-layer costs, and an analysis of how each mode's cost grows with
layers and ranks, projected on paper to 8 and 64 GPUs from those measured per-layer costs
and the model's exact byte counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALL_MAMBA2_ON_SHAKESPEARE, GEOMETRIES, RESULTS, machine, output_file, overall_pass, truncated_geometry, write_random_teacher, write_result  # noqa: E402
from cald_scale.cli import positive_int  # noqa: E402
from _runs import RUNS, Run, finished_on, launch  # noqa: E402

BENCHMARK = "parallel_modes"
GEOMETRY = "SmolLM2-135M"
E2E = "[{name: e2e, guidance: target, mode: end_to_end}]"
FORCED = "[{name: forced, guidance: target, mode: teacher_forced}]"
MODES: dict[str, dict] = {
    "zero3_streamed": {"ds_config": "ds_configs/zero3.json", "phases": E2E, "pipeline": False},
    "zero3_teacher_forced": {"ds_config": "ds_configs/zero3.json", "phases": FORCED, "pipeline": False},
    "pipeline": {"ds_config": "ds_configs/pipeline.json", "phases": E2E, "pipeline": True},
    "pipeline_teacher_forced": {"ds_config": "ds_configs/pipeline.json", "phases": FORCED, "pipeline": True},
}
GIB = 1 << 30


def _run(mode: str, layers: int, args, teacher: Path) -> dict:
    spec = MODES[mode]
    overrides = [
        f"teacher.name_or_path={teacher}",
        "student.conversion.mixer=mamba2",
        *ALL_MAMBA2_ON_SHAKESPEARE,
        "student.trainable=mixers",
        f"data.seq_len={args.seq_len}",
        "data.max_train_tokens=200000",
        "data.max_eval_tokens=20000",
        f"train.global_batch_size={args.global_batch}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=1",
        "eval.max_sequences=2",
        "eval.other_corpora=[]",
        f"output.save_every={args.steps}",
        "output.log_every=1",
        f"phases={spec['phases']}",
    ]
    if spec["pipeline"]:
        overrides.append(f"train.pipeline_stages={args.ranks}")
    run = Run(name=f"{mode}_{layers}L{'_quick' if args.quick else ''}", overrides=overrides, ds_config=spec["ds_config"])
    launch(run, BENCHMARK, ranks=args.ranks)
    folder = run.folder(BENCHMARK)
    report = json.loads((folder / "report.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 1]
    rss = [m["cpu_max_rss_bytes"] for m in report.get("memory_per_rank", [report["memory"]])]
    return {
        "folder": str(folder),
        "date": finished_on(folder),
        "layers": layers,
        "tokens_per_s": statistics.median(speeds),
        "seconds_per_step": args.global_batch * args.seq_len / statistics.median(speeds),
        "peak_rss_per_rank_bytes": rss,
        # The last training step's (the last line is the final evaluation's, which has none).
        "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
    }


def measure_modes(modes: list[str], depths: list[int], run_one) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """``run_one(mode, layers)`` for every mode at every depth: the runs of the modes that
    trained, and the error of each that failed (the others still run)."""
    runs, failed = {}, {}
    for mode in modes:
        try:
            runs[mode] = [run_one(mode, layers) for layers in depths]
        except RuntimeError as err:
            failed[mode] = str(err)
            print(f"[{BENCHMARK}] {mode} failed: {err}", flush=True)
    return runs, failed


def targets(modes: list[str], runs: dict[str, list[dict]], failed: dict[str, str]) -> dict:
    """Every mode asked for trained, and in one sitting: finished runs are reused
    (benchmarks/_runs.py), so each run carries the day it finished, and ratios across days
    (another load, another host) are flagged."""
    dates = sorted({r["date"] for rows in runs.values() for r in rows})
    return {
        "all_modes_ran": {"target": "every mode asked for trains at both depths on the same model", "value": sorted(runs), "failed": sorted(failed), "pass": not failed and set(runs) == set(modes)},
        "one_sitting": {"target": "every run compared finished on the same day", "value": dates, "pass": len(dates) == 1},
    }


def _slope(a: dict, b: dict, key) -> float:
    return (key(b) - key(a)) / (b["layers"] - a["layers"])


def _layer_bytes(geometry: dict, mixer_params_per_layer: int) -> dict:
    """Exact parameter bytes (fp32 master, bf16 on GPU) of one teacher block and one student block."""
    h, i = geometry["hidden_size"], geometry["intermediate_size"]
    heads, kv = geometry["num_attention_heads"], geometry["num_key_value_heads"]
    head_dim = h // heads
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * i
    return {"teacher_block_params": attention + mlp + 2 * h, "student_mixer_params": mixer_params_per_layer, "mlp_params": mlp + 2 * h}


# Assumptions of the projection (stated in the output): H100-class GPUs in nodes of 8.
PROJECTION = {
    "tokens_per_gpu_micro_step": 8 * 2048,
    "achieved_flops_per_s": 400e12,  # bf16, ~40% of an H100's dense peak
    "intra_node_bytes_per_s": 300e9,  # NVLink, per GPU
    "inter_node_bytes_per_s": 50e9,  # 400 Gb/s InfiniBand per GPU
    "gpus_per_node": 8,
    "bytes_per_value": 2,  # bf16 weights and activations
}


def _projection(per_layer: dict, mixer_over_attention: float) -> dict:
    """Tokens/s per GPU and memory per GPU of each mode on 8 and 64 GPUs, from per-block FLOPs and bytes.

    Per block and micro-step (T tokens per GPU): the teacher block forward (2 P_t T FLOPs), the
    student block forward and backward (2 P_s T + 2 P_s T for activation gradients + 2 P_mix T
    for the mixer's weight gradients). ZeRO-3 gathers every block's teacher and student
    weights (the student's twice, forward and backward) and reduce-scatters the mixer's
    gradients, (W-1)/W of each, per micro-step; the gather of block i+1 overlaps block i's
    compute (prefetch), so a block costs max(compute, communication). The pipeline (S = min(W, L)
    stages, W/S replicas, m = 4S micro-batches per step) sends two hidden states forward and one
    gradient back per boundary and micro-batch, and idles (S-1)/(m+S-1) of the step (the bubble).
    The CPU timings above do not transfer to GPUs (two shared cores, gloo); the byte counts do.
    """
    a = PROJECTION
    tokens, flops_rate, width = a["tokens_per_gpu_micro_step"], a["achieved_flops_per_s"], a["bytes_per_value"]
    out: dict = {"assumptions": a}
    for name in ("SmolLM2-135M", "Llama-3.2-1B"):
        geometry = GEOMETRIES[name]
        layers, hidden = geometry["num_hidden_layers"], geometry["hidden_size"]
        block = _layer_bytes(geometry, 0)
        attention = block["teacher_block_params"] - block["mlp_params"]
        p_mix = int(attention * mixer_over_attention)
        p_t, p_s = block["teacher_block_params"], p_mix + block["mlp_params"]
        compute = (2 * p_t + 4 * p_s + 2 * p_mix) * tokens / flops_rate
        rows = {}
        for gpus in (8, 64):
            bandwidth = a["intra_node_bytes_per_s"] if gpus <= a["gpus_per_node"] else a["inter_node_bytes_per_s"]
            gather = (gpus - 1) / gpus * width * (p_t + 2 * p_s + p_mix)
            zero3_block = max(compute, gather / bandwidth)
            stages = min(gpus, layers)
            micro = 4 * stages
            boundary = 3 * width * tokens * hidden / bandwidth
            stage_time = max(layers / stages * compute, boundary)
            bubble = (stages - 1) / (micro + stages - 1)
            rows[f"{gpus}_gpus"] = {
                "zero3_streamed": {
                    "tokens_per_s_per_gpu": tokens / (layers * zero3_block),
                    "comm_bytes_per_gpu_per_micro_step": layers * gather,
                    "communication_bound": gather / bandwidth > compute,
                    # Below this many tokens per GPU per micro-step the gathers outlast the compute.
                    "comm_bound_below_tokens_per_gpu": tokens * (gather / bandwidth) / compute,
                    "weight_bytes_per_gpu": layers * width * (p_t + p_s) / gpus,
                },
                "pipeline": {
                    "stages": stages,
                    "replicas": gpus // stages,
                    "micro_batches_per_step": micro,
                    "bubble_fraction": bubble,
                    "tokens_per_s_per_gpu": tokens * (1 - bubble) / (layers * compute) if stage_time == layers / stages * compute else tokens * (1 - bubble) / (stages * stage_time),
                    "comm_bytes_per_boundary_per_micro_step": 3 * width * tokens * hidden,
                    "weight_bytes_per_gpu": layers / stages * width * (p_t + p_s),
                },
                "pipeline_teacher_forced": {
                    "bubble_fraction": bubble,
                    "comm_bytes_per_boundary_per_micro_step": width * tokens * hidden + 4 * layers,
                    "backward_waits_for_next_stage": False,
                },
            }
        out[name] = {"layers": layers, "flops_per_block_per_micro_step": compute * flops_rate, "block_compute_s": compute, **rows}
    return out


def _two_depths(text: str) -> list[int]:
    """--layers: the per-layer costs are slopes between exactly two depths (checked before any run)."""
    try:
        depths = [int(x) for x in text.split(",")]
    except ValueError:
        depths = []
    if len(depths) != 2 or depths[0] == depths[1] or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give two different depths, e.g. 4,8")
    return depths


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 and 4 blocks, 3 steps, seq_len 64")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", default=None, type=_two_depths, help="two depths, e.g. 4,8 (default 4,8; --quick 2,4)")
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--seq_len", type=positive_int, default=None)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), type=_modes, help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--fresh", action="store_true", help="delete this benchmark's earlier runs first")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    depths = args.layers or ([2, 4] if args.quick else [4, 8])
    args.steps = args.steps or (3 if args.quick else 8)
    args.seq_len = args.seq_len or (64 if args.quick else 256)
    modes = args.modes
    if args.fresh:
        shutil.rmtree(RUNS / BENCHMARK, ignore_errors=True)

    teachers = {}
    for layers in depths:
        name = truncated_geometry(GEOMETRY, layers)
        teachers[layers] = _with_smollm2_tokenizer(write_random_teacher(name, RUNS / BENCHMARK / "teachers" / name))
    runs, failed = measure_modes(modes, depths, lambda mode, layers: _run(mode, layers, args, teachers[layers]))

    geometry = GEOMETRIES[GEOMETRY]
    per_layer = {}
    for mode, (a, b) in runs.items():
        per_layer[f"{mode}_s"] = _slope(a, b, lambda r: r["seconds_per_step"])
        per_layer[f"{mode}_rss_bytes_max_rank"] = _slope(a, b, lambda r: max(r["peak_rss_per_rank_bytes"]))
    per_layer["bytes"] = _layer_bytes(geometry, _mixer_params(teachers[depths[0]]))
    result = {
        "benchmark": BENCHMARK,
        "machine": machine(),
        "shapes": {"geometry": GEOMETRY, "depths": depths, "ranks": args.ranks, "global_batch": args.global_batch, "seq_len": args.seq_len, "steps": args.steps},
        "runs": runs,
        "per_layer": per_layer,
        "ratios": _ratios(runs),
    }
    block = per_layer["bytes"]
    result["projection"] = _projection(per_layer, block["student_mixer_params"] / (block["teacher_block_params"] - block["mlp_params"]))
    result["failed"] = failed
    result["targets"] = targets(modes, runs, failed)
    result["pass"] = overall_pass(result["targets"])
    out = Path(args.out) if args.out else RESULTS / f"{BENCHMARK}{'_quick' if args.quick else ''}.json"
    write_result(BENCHMARK, result, str(out))
    out.with_suffix(".md").write_text(_markdown(result))


def _with_smollm2_tokenizer(folder: Path) -> Path:
    """Random weights of SmolLM2's geometry, with SmolLM2's own tokenizer (same vocabulary), so the
    runs read real text as the default job does."""
    if not (folder / "tokenizer_config.json").read_text().count("smollm2_tokenizer"):
        from cald_scale.conversion.teacher import TeacherConfig, open_teacher

        _, tokenizer = open_teacher(TeacherConfig())
        tokenizer.save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "smollm2_tokenizer": True}, indent=2))
    return folder


def _mixer_params(teacher: Path) -> int:
    """Parameters of one Mamba2 mixer converted from this teacher (the student's trainable block part)."""
    from cald_scale.conversion.modeling import ConversionConfig
    from cald_scale.conversion.surgery import convert_teacher
    from cald_scale.conversion.teacher import TeacherConfig, load_teacher

    teacher_model, _, _ = load_teacher(TeacherConfig(name_or_path=str(teacher), dtype="float32"))
    student = convert_teacher(teacher_model, ConversionConfig(mixer="mamba2", match_teacher_geometry=True), teacher_name_or_path=str(teacher))
    mixers = student.mixers()
    return sum(p.numel() for p in mixers[0].parameters())


def _ratios(runs: dict) -> dict:
    out = {}
    base = runs.get("zero3_streamed")
    for mode, rows in runs.items():
        if base is None or mode == "zero3_streamed":
            continue
        deepest, ref = rows[-1], base[-1]
        out[f"{mode}_tokens_per_s_over_zero3"] = deepest["tokens_per_s"] / ref["tokens_per_s"]
        out[f"{mode}_peak_rss_max_rank_over_zero3"] = max(deepest["peak_rss_per_rank_bytes"]) / max(ref["peak_rss_per_rank_bytes"])
    return out


def _markdown(result: dict) -> str:
    shapes = result["shapes"]
    lines = [
        f"# Parallel modes ({shapes['ranks']} CPU ranks, {shapes['geometry']} widths, seq_len {shapes['seq_len']}, global batch {shapes['global_batch']})",
        "",
        "| mode | blocks | tokens/s | s/step | peak RSS per rank (GiB) |",
        "|---|---|---|---|---|",
    ]
    for mode, rows in result["runs"].items():
        for r in rows:
            rss = ", ".join(f"{b / GIB:.2f}" for b in r["peak_rss_per_rank_bytes"])
            lines.append(f"| {mode} | {r['layers']} | {r['tokens_per_s']:.1f} | {r['seconds_per_step']:.2f} | {rss} |")
    lines += ["", "Per added block (slope between the two depths):", ""]
    for key, value in result["per_layer"].items():
        if key.endswith("_s"):
            lines.append(f"- {key[:-2]}: {value:.3f} s per step")
        elif key.endswith("_bytes_max_rank"):
            lines.append(f"- {key.replace('_rss_bytes_max_rank', '')}: {value / (1 << 20):.0f} MiB resident on the fullest rank")
    if result["ratios"]:
        lines += ["", "Ratios at the deeper model, against ZeRO-3 streamed:", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in result["ratios"].items()]
    if "projection" in result:
        lines += ["", "## Projection to 8 and 64 GPUs (on paper: per-block FLOPs and bytes, the assumptions below)", ""]
        lines.append("Assumptions: " + ", ".join(f"{k} = {v:g}" for k, v in result["projection"]["assumptions"].items()) + ".")
        lines += ["", "| model | GPUs | ZeRO-3 tokens/s/GPU | ZeRO-3 comm-bound below (tokens/GPU/micro-step) | pipeline stages x replicas | bubble | pipeline tokens/s/GPU | weights/GPU ZeRO-3 vs pipeline (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for name, proj in result["projection"].items():
            if name == "assumptions":
                continue
            for gpus in ("8_gpus", "64_gpus"):
                z, p = proj[gpus]["zero3_streamed"], proj[gpus]["pipeline"]
                lines.append(
                    f"| {name} | {gpus.split('_')[0]} | {z['tokens_per_s_per_gpu']:,.0f} | {z['comm_bound_below_tokens_per_gpu']:,.0f} | "
                    f"{p['stages']} x {p['replicas']} | {p['bubble_fraction']:.0%} | {p['tokens_per_s_per_gpu']:,.0f} | "
                    f"{z['weight_bytes_per_gpu'] / (1 << 20):.0f} vs {p['weight_bytes_per_gpu'] / (1 << 20):.0f} |"
                )
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['pass']} |" for t in result["targets"].values()]
    lines += [f"\nFailed: {mode}: {why}" for mode, why in result.get("failed", {}).items()]
    lines += ["", ANALYSIS]
    return "\n".join(lines) + "\n"


ANALYSIS = """## How each mode's cost grows

- **ZeRO-3 streamed.** Every rank runs every block on its share of the batch, so compute per
  rank is flat in ranks (weak scaling) and linear in blocks. Parameters, gradients and
  optimizer states are split W ways, so memory per rank falls as 1/W, but every block's
  teacher and student weights are all-gathered for each use: communication per rank per
  micro-step is about L x (teacher + 2 x student + trainable gradient) bytes x (W-1)/W,
  independent of the batch. It is hidden while one block's compute outlasts the gather of
  the next (prefetch); with small per-rank batches or slow inter-node links it is not, and
  that is where the pipeline wins.
- **Pipeline.** A stage holds only its L/S blocks, whole: memory per rank falls as 1/S with
  no gathers at all; what crosses the wire is three hidden states per micro-batch per stage
  boundary (teacher, student, running loss) and one gradient back. The price is the bubble,
  (S-1)/(m+S-1) of the step for m micro-batches, and stage balance: a stage is as slow as
  its slowest block plus the first stage's embedding and the last stage's head.
- **Which to pick.** With large per-GPU micro-batches ZeRO-3 streamed keeps every GPU busy
  (no bubble) and its gathers hide behind the compute; below the crossover in the table
  (small micro-batches, long sequences cut short, slow inter-node links) it waits on the
  network, and the pipeline's few hidden states per boundary cost far less. The pipeline
  also needs no gather buffer at all, at the price of whole blocks per stage.
- **Teacher-forced phase.** Each student block learns from the teacher's input, so no
  gradient crosses blocks: in ZeRO-3 mode the backward of each stage runs as soon as it is
  computed (activation memory of one stage), and in pipeline mode only the scalar loss
  travels backward, so the backward pass costs no stage-to-stage traffic.
- **On CPU with gloo** (this measurement) communication is a memory copy and the ranks
  share two cores: the tokens/s ratios show compute and framework overheads, not network
  costs; the projection adds those from the byte counts above.
"""


if __name__ == "__main__":
    main()
