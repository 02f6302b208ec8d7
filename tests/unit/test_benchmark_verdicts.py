"""What the benchmarks' pass flags mean: a verdict covers only what ran and what its target
is defined for. A kernel-parity run cut by its time budget is incomplete and does not pass;
train_speed's end-to-end target is not scored on a teacher-forced step."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_parity  # noqa: E402
import train_speed  # noqa: E402


def _report(tmp_path: Path, *, on_gpu: bool = False) -> kernel_parity.Report:
    report = kernel_parity.Report(tmp_path / "parity.json", {"device": "cpu"}, "cpu:ref", kernels_required=on_gpu)
    check = {"level": "mixer", "mixer": "mamba2", "shape": "small", "dtype": "float32", "path": "cpu:chunked"}
    report.data["checks"].append(check | {"quantity": "out", "rel_norm": 1e-6, "max_rel": 1e-6, "tol": 1e-4, "pass": True})
    report.finished = True  # as main()'s last write leaves it
    return report


def test_parity_passes_with_paths_that_cannot_run_here_skipped(tmp_path):
    report = _report(tmp_path)
    report.skip({"level": "op", "op": "ssd", "path": "cuda:kernel"}, "mamba_ssm does not import")
    summary = report.summary()
    assert summary["complete"] and summary["pass"] and summary["skipped"] == 1


def test_parity_on_a_gpu_whose_kernels_could_not_run_does_not_pass(tmp_path):
    """A GPU run exists to check the kernels: a missing or broken wheel must not read as a pass."""
    report = _report(tmp_path, on_gpu=True)
    report.skip({"level": "mixer", "mixer": "mamba", "path": "cuda:cuda"}, "selective_scan_cuda does not import")
    summary = report.summary()
    assert summary["complete"] and summary["kernel_paths_not_run"] == 1 and summary["pass"] is False
    ran = _report(tmp_path, on_gpu=True)
    ran.skip({"level": "mixer", "mixer": "mamba", "path": "all"}, "a reason that names no kernel path")
    assert ran.summary()["pass"] is True


def test_parity_cut_by_the_time_budget_does_not_pass(tmp_path):
    report = _report(tmp_path)
    report.skip({"level": "mixer", "mixer": "mamba", "path": "all"}, kernel_parity.OUT_OF_TIME)
    summary = report.summary()
    assert summary["skipped_for_time"] == 1 and not summary["complete"] and summary["pass"] is False


def test_parity_file_written_mid_run_is_not_complete(tmp_path):
    """The JSON is rewritten after every check: a run killed after one (the step's cap, a crash)
    leaves that file, and it must not read as a finished pass."""
    import json

    report = _report(tmp_path)
    report.write()  # what main() writes after each op and mixer
    summary = json.loads(report.out.read_text())["summary"]
    assert summary["checks"] == 1 and summary["finished"] is False
    assert summary["complete"] is False and summary["pass"] is False
    report.write(finished=True)  # main()'s last write
    summary = json.loads(report.out.read_text())["summary"]
    assert summary["complete"] is True and summary["pass"] is True


def test_parity_that_checked_nothing_does_not_pass(tmp_path):
    report = kernel_parity.Report(tmp_path / "parity.json", {"device": "cpu"}, "cpu:ref", kernels_required=False)
    assert report.summary()["pass"] is False


def _items(distill_s: float) -> dict:
    def item(s: float) -> dict:
        return {"median_s": s, "min_s": s, "median_cpu_s": s, "memory": {"peak_rss_bytes": 1 << 30}}

    return {"teacher_forward": item(1.0), "student_forward_backward": item(3.0), "distill_step": item(distill_s), "teacher_finetune_step": item(5.0)}


def test_train_speed_scores_the_end_to_end_step_against_its_target():
    met, missed = train_speed.summarize(_items(4.2)), train_speed.summarize(_items(4.6))
    assert met["targets"]["distill_over_unavoidable"]["pass"] is True
    assert missed["targets"]["distill_over_unavoidable"]["pass"] is False
    assert abs(missed["ratios"]["distill_over_unavoidable"] - 1.15) < 1e-9


def test_train_speed_does_not_score_a_teacher_forced_step_against_the_end_to_end_target():
    summary = train_speed.summarize(_items(3.0), "teacher_forced")
    target = summary["targets"]["distill_over_unavoidable"]
    assert target["pass"] is None and target["applies"] is False and "teacher_forced" in target["why"]
    assert summary["ratios"]["distill_over_unavoidable"] == 0.75  # still reported, beside the other ratios


def test_parallel_modes_records_a_failed_mode_and_fails_its_verdict():
    import parallel_modes

    def run_one(mode: str, layers: int) -> dict:
        if mode == "pipeline" and layers == 8:
            raise RuntimeError("run pipeline_8L (seed 0) failed with exit code 1")
        return {"layers": layers, "date": "2026-12-05"}

    modes = ["zero3_streamed", "pipeline", "zero3_teacher_forced"]
    runs, failed = parallel_modes.measure_modes(modes, [4, 8], run_one)
    assert set(runs) == {"zero3_streamed", "zero3_teacher_forced"} and "exit code 1" in failed["pipeline"]
    verdict = parallel_modes.targets(modes, runs, failed)
    assert verdict["all_modes_ran"]["pass"] is False and verdict["all_modes_ran"]["failed"] == ["pipeline"]
    assert verdict["one_sitting"]["pass"] is True
    ok = parallel_modes.targets(modes[:1], {"zero3_streamed": runs["zero3_streamed"]}, {})
    assert ok["all_modes_ran"]["pass"] is True


def test_parallel_modes_flags_runs_reused_from_another_day():
    import parallel_modes

    runs = {"zero3_streamed": [{"date": "2026-12-01"}, {"date": "2026-12-05"}]}
    verdict = parallel_modes.targets(["zero3_streamed"], runs, {})
    assert verdict["one_sitting"]["pass"] is False and verdict["one_sitting"]["value"] == ["2026-12-01", "2026-12-05"]


def test_a_results_verdict_covers_the_targets_that_apply_and_none_when_none_do():
    import _common

    met, missed = {"pass": True}, {"pass": False}
    unscored = {"pass": None, "applies": False, "why": "another phase's target"}
    assert _common.overall_pass({"a": met, "b": unscored}) is True
    assert _common.overall_pass({"a": met, "b": missed, "c": unscored}) is False
    assert _common.overall_pass({"b": unscored}) is None


def test_inference_speed_names_every_run_but_the_committed_one_by_how_it_differs():
    """Only the committed configuration (CPU fp32, static KV cache, the default contexts and
    batches) writes the headline file and the README's table: an exploratory run with a
    dynamic cache or other contexts must not replace the published evidence."""
    import argparse

    import inference_speed as bench

    def parts(contexts=bench.DEFAULT_CONTEXTS, batches=bench.DEFAULT_BATCHES, **changed) -> list[str]:
        args = argparse.Namespace(**({"quick": False, "attention_every": 0, "dtype": "float32", "kv_cache": "static",
                                      "decode_steps": bench.DEFAULT_DECODE_STEPS} | changed))
        return bench.variant(args, contexts, batches)

    assert parts() == []
    assert parts(kv_cache="dynamic") == ["dynamic_cache"]
    assert parts(contexts=[32]) == ["custom"] and parts(batches=[1]) == ["custom"] and parts(decode_steps=1) == ["custom"]
    assert parts(dtype="bfloat16", attention_every=4) == ["attn_every4", "bfloat16"]
    assert parts(quick=True, contexts=[512, 2048], batches=[1, 4], decode_steps=4) == ["quick"]


def test_train_speed_result_of_fewer_timed_steps_than_asked_says_partial():
    """train_speed publishes after every timed round, so a run the step's cap kills leaves a file
    of one timed step per item: it must say so, not "median of 4 steps"."""
    import argparse

    def item(steps: int) -> dict:
        return {"median_s": 1.0, "min_s": 1.0, "median_cpu_s": 1.0, "tokens_per_s": 512.0, "step_seconds": [1.0] * steps,
                "memory": {"peak_rss_bytes": 1 << 30, "peak_rss_above_baseline_bytes": 1 << 29}}

    args = argparse.Namespace(device="cpu", dtype="float32", geometry="SmolLM2-135M", batch=1, seq_len=512, steps=4, warmup=1,
                              trainable="mixers", phase="end_to_end", time_budget=None, build="parallel", threads=1, quick=False, narrow=False)
    names = ("teacher_forward", "student_forward_backward", "distill_step", "teacher_finetune_step")
    cut = train_speed.assemble(args, "SmolLM2-135M", {name: item(1) for name in names}, None, 0.0)
    assert cut["shapes"]["timed_steps"] == 1 and cut["shapes"]["partial"] is True
    assert "1 timed steps (**partial**: 4 asked)" in train_speed.markdown(cut)
    whole = train_speed.assemble(args, "SmolLM2-135M", {name: item(4) for name in names}, None, 0.0)
    assert whole["shapes"]["partial"] is False and "median of 4 steps after 1 warmup" in train_speed.markdown(whole)
