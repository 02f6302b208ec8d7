"""The four benchmarks that `benchmarks/gpu_check.sh` runs on a lent GPU, run here on CPU at
tiny sizes with the flags it passes (bar the device): a script that has rotted must fail in
CI, not in the 15 minutes of GPU a session may get. train_speed.py's distillation item did
rot once, unnoticed (it called train_step with an argument the trainer had dropped)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import launcher_env, run

REPO = Path(__file__).resolve().parents[2]


def _run_benchmark(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    proc = run([sys.executable, f"benchmarks/{script}", "--device", "cpu", *args, "--out", str(out)], launcher_env(tmp_path), timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**launcher_env(tmp_path), "OUT": str(out), "PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "no_wheels"), **env},
    )


def test_gpu_check_command_lines_parse_as_the_gpu_run_gives_them(tmp_path):
    """Every benchmark step of gpu_check.sh, with its own flags (--device cuda, bf16, the 1B
    geometry), parsed by the benchmark and run no further: a renamed flag fails here, not on the GPU."""
    proc = _gpu_check(tmp_path, GPU_CHECK_PARSE_ONLY="1")
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    steps = [
        "kernel_parity", "train_speed_smollm2", "mixer_speed", "inference_speed_smollm2", "inference_speed_hybrid", "inference_speed_llama1b",
        "train_speed_llama1b",
    ]
    for name in steps:
        line = next(line for line in log.splitlines() if line.strip().startswith(name + " "))
        assert "rc=0 " in line, f"{name}: {line}\n{log[-3000:]}"
    assert log.count("parsed: {") == len(steps) and '"device": "cuda"' in log
    assert proc.returncode == 0, log[-3000:]


def test_gpu_check_without_the_kernels_stops_before_spending_the_gpu(tmp_path):
    """No wheels carried (or one that does not import): the benchmarks would time only the
    pure-PyTorch paths, minutes of a lent GPU for nothing. The script stops after its kernels
    step, with its status table and pack."""
    proc = _gpu_check(tmp_path)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 1, log[-3000:]
    assert "no wheels to install" in log and "kernels step FAILED: the mixer kernels" in log
    assert next(line for line in log.splitlines() if line.strip().startswith("install_wheels ")).split()[1] == "rc=1"
    assert "stopping before the benchmarks" in log and "== kernel_parity" not in log and "gpu_check stopped: no kernels" in log
    assert (tmp_path / "out" / "gpu_check_all.tar.gz").is_file()


def test_gpu_check_refuses_an_unknown_step_and_a_budget_past_its_limit(tmp_path):
    proc = _gpu_check(tmp_path, GPU_CHECK_STEPS="kernel_parity_fp32")
    assert proc.returncode == 2 and "GPU_CHECK_STEPS names kernel_parity_fp32, which is no step" in proc.stderr
    proc = _gpu_check(tmp_path, GPU_CHECK_LIMIT_S="300", GPU_CHECK_BUDGET_S="480")
    assert proc.returncode == 2 and "does not end 40 s before the call's limit" in proc.stderr


def test_gpu_check_keeps_what_was_written_when_the_call_is_stopped(tmp_path):
    """The device call's limit ends the script with SIGTERM in the middle of a step: the results
    written so far and the status table are kept in $OUT."""
    script = tmp_path / "stub.sh"  # the script's own control flow, with one step that writes, then hangs
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    head = text.split('COMMIT=${GPU_CHECK_COMMIT', 1)[0]
    script.write_text(head.replace('cd "$(dirname "$0")/.." || exit 1', f'cd "{REPO}" || exit 1') + (
        'writes_then_hangs() { echo \'{"partial": true}\' >"$WORK/part.json"; sleep 300; }\n'
        'step slow 200 part.json writes_then_hangs\n'
    ))
    proc = subprocess.Popen(["bash", str(script)], env={**launcher_env(tmp_path), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "out" / "gpu_check.log"
    for _ in range(100):
        if log.is_file() and "== slow" in log.read_text() and (tmp_path / "out").is_dir():
            break
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 143
    assert json.loads((tmp_path / "out" / "part.json").read_text()) == {"partial": True}
    assert "slow                       stopped by a signal" in log.read_text() and (tmp_path / "out" / "gpu_check_all.tar.gz").is_file()


def test_kernel_parity_checks_every_cpu_path(tmp_path):
    result = _run_benchmark("kernel_parity.py", tmp_path, "--shapes", "small", "--dtypes", "bfloat16,float32", "--seqlen", "64")
    summary = result["summary"]
    assert summary["errors"] == 0 and summary["failed"] == 0 and summary["pass"] is True
    assert {"cpu:ref", "cpu:chunked"} <= set(summary["by_path"]) and summary["checks"] == len(result["checks"]) > 0
    assert {c["dtype"] for c in result["checks"]} == {"bfloat16", "float32"}


def test_kernel_parity_runs_only_the_levels_asked_for(tmp_path):
    result = _run_benchmark("kernel_parity.py", tmp_path, "--shapes", "small", "--dtypes", "float32", "--seqlen", "64", "--levels", "mixer")
    assert result["levels"] == ["mixer"] and result["summary"]["pass"] is True
    assert {c["level"] for c in result["checks"]} == {"mixer"}
    # The decode step as generation runs it (in place, a padding row) is compared too, for both mixers.
    stepped = {(c["mixer"], c["quantity"]) for c in result["checks"] if c["quantity"].startswith("step_inplace_keep.")}
    assert stepped == {(m, f"step_inplace_keep.{q}") for m in ("mamba2", "mamba") for q in ("out", "conv_state", "ssm_state")}


def test_mixer_speed_times_both_mixers_against_the_teacher(tmp_path):
    result = _run_benchmark("mixer_speed.py", tmp_path, "--dtype", "bfloat16", "--layers", "1", "--batch", "1", "--seqlen", "64", "--repeats", "1", "--no-report")
    assert set(result["mixers"]) == {"mamba2", "mamba"} and result["device_type"] == "cpu"
    assert set(result["targets"]) == {"mamba2", "mamba"}


def test_inference_speed_prefills_and_decodes_teacher_and_student(tmp_path):
    result = _run_benchmark("inference_speed.py", tmp_path, "--dtype", "bfloat16", "--geometry", "SmolLM2-135M",
                            "--contexts", "128", "--batches", "1", "--decode_steps", "2", "--graph-decode", "on")
    for model in ("teacher", "student"):
        assert result[model]["prefill_s"]["128"] > 0 and result[model]["decode_tok_s"]["1"]["128"] > 0
    assert result["student"]["state_bytes_per_seq"]["128"]["kv"] == 0
    # GraphedDecode's path, as a GPU run takes it (there replayed as a CUDA graph; eager here).
    graphed = result["student_graph_decode"]
    assert graphed["error"] is None and graphed["cuda_graph"] is False and graphed["decode_tok_s"]["1"]["128"] > 0
    # Checked against the eager model on a copy of the cache: the same computation here, so equal.
    assert graphed["max_rel_diff_vs_eager"] == {"1": 0.0} and result["targets"]["graphed_decode_equals_eager"]["pass"] is True
    assert "Student decode through GraphedDecode" in (tmp_path / "inference_speed.md").read_text()


def test_inference_speed_keeps_what_it_measured_when_its_step_is_cut(tmp_path):
    """gpu_check.sh caps each step (90 s for inference_speed): the contexts measured before the
    cap's signal stay in the result file, marked partial (it wrote only at the end)."""
    out = tmp_path / "inference_speed.json"
    cmd = [sys.executable, "benchmarks/inference_speed.py", "--device", "cpu", "--contexts", "64,4096,8192,16384", "--batches", "1",
           "--decode_steps", "2", "--graph-decode", "off", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(3000):
        if out.is_file() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends at the cap
    proc.wait(timeout=60)
    saved = json.loads(out.read_text())
    assert saved["partial"] == "contexts up to 64", saved.get("partial")
    assert set(saved["teacher"]["prefill_s"]) == set(saved["student"]["prefill_s"]) == {"64"} and saved["student"]["decode_tok_s"]["1"]["64"] > 0


def test_inference_speed_measures_the_default_hybrid_with_its_kept_kv_cache(tmp_path):
    result = _run_benchmark("inference_speed.py", tmp_path, "--geometry", "SmolLM2-135M", "--attention_every", "4",
                            "--contexts", "64,128", "--batches", "2", "--decode_steps", "1", "--graph-decode", "on", "--best_batch", "off")
    assert result["student_attention_layers"] == [1, 5, 9, 13, 17, 21, 25, 29]
    teacher, student = result["teacher"]["state_bytes_per_seq"], result["student"]["state_bytes_per_seq"]
    for context in ("64", "128"):  # the kept layers' KV, 8 of the teacher's 30, beside 22 layers' constant state
        assert student[context]["kv"] * 30 == teacher[context]["kv"] * 8
        assert result["student"]["decode_tok_s"]["2"][context] > 0
    assert student["64"]["recurrent"] == student["128"]["recurrent"] > 0
    # The all-Mamba2 student's targets are reported, not scored (its state grows, and it says so);
    # the hybrid is scored on its own: constant mixer state, a KV cache of its kept layers' share.
    targets = result["targets"]
    assert targets["student_state_constant"]["applies"] is False and targets["student_state_constant"]["met"] is False
    assert targets["hybrid_recurrent_state_constant"]["pass"] and targets["hybrid_kv_is_kept_share"]["pass"]
    # Its decode through GraphedDecode (gpu_check's inference_speed_hybrid step), over the kept
    # layers' preallocated KV cache: a check of correctness, scored for the hybrid too.
    graphed = targets["graphed_decode_equals_eager"]
    assert graphed["pass"] is True and "applies" not in graphed and graphed["value"] == {"2": 0.0}
    assert result["pass"] is True
    # --graph-decode on insists: a graphed decode that cannot run (here a growing KV cache) fails
    # the command, whose exit status is all gpu_check reads of that step; its result still says why.
    out = tmp_path / "dynamic.json"
    proc = run([sys.executable, "benchmarks/inference_speed.py", "--device", "cpu", "--geometry", "SmolLM2-135M", "--attention_every", "4",
                "--contexts", "64", "--batches", "1", "--decode_steps", "1", "--kv_cache", "dynamic", "--graph-decode", "on", "--out", str(out)],
               launcher_env(tmp_path), timeout=600)
    assert proc.returncode == 1 and "the graphed decode failed its check" in proc.stderr, proc.stderr[-2000:]
    assert "preallocated KV cache" in json.loads(out.read_text())["student_graph_decode"]["error"]["error"]


def test_train_speed_steps_every_item_through_the_trainer(tmp_path):
    # --time-budget 0: the first round runs, no second one starts, and the result is still written
    # (gpu_check's cap once killed a run with nothing written); --log-dir keeps each item's log.
    # --build parallel: what a GPU run does, every process started at once. --compare-leaves (as
    # gpu_check runs it): the distillation step again under the other train.zero3_leaves modes.
    # --narrow: the host-bound proxy (width 64). --compare-zero3: the teacher's fine-tuning without ZeRO-3.
    result = _run_benchmark("train_speed.py", tmp_path, "--quick", "--narrow", "--warmup", "0", "--steps", "2",
                            "--time-budget", "0", "--log-dir", str(tmp_path / "items"), "--build", "parallel", "--compare-leaves", "--compare-zero3", "--profile")
    assert result["shapes"]["build"] == "parallel"
    # The student's mixers say which path they ran (on CPU "auto" falls back to the pure-PyTorch one).
    assert result["shapes"]["student_kernel"] == "chunked" and result["items"]["distill_step"]["student_kernel"] == "chunked"
    assert "student_kernel" not in result["items"]["teacher_forward"] and "student mixers: chunked path" in (tmp_path / "train_speed.md").read_text()
    assert (result["shapes"]["hidden_size"], result["shapes"]["layers"], result["shapes"]["seq_len"]) == (64, 8, 64)
    assert set(result["items"]) == {
        "teacher_forward", "student_forward_backward", "distill_step", "teacher_finetune_step", "distill_step_frozen_leaves", "distill_step_hooked", "teacher_finetune_plain_step",
        "distill_step_regather_all", "distill_step_deepspeed_linear",
    }
    assert result["ratios"]["teacher_finetune_zero3_over_plain"] > 0 and result["ratios"]["distill_regather_all_over_distill"] > 0
    # The step it is compared with ran DeepSpeed's linear wherever a gradient flowed (ours elsewhere).
    assert result["ratios"]["distill_deepspeed_linear_over_distill"] > 0 and result["items"]["distill_step_deepspeed_linear"]["deepspeed_linear_calls"] > 0
    assert "deepspeed_linear_calls" not in result["items"]["distill_step"]
    assert result["ratios"]["distill_hooked_over_distill"] > 0 and result["ratios"]["distill_frozen_leaves_over_distill"] > 0
    profile = result["distill_profile"]
    assert profile["regions_s"]["ZeRO-3 parameter gathers (hooks)"] > 0 and profile["regions_s"]["optimizer step (engine.step)"] > 0
    own = [f["own_s"] for f in profile["functions_by_own_time"]]
    assert len(own) == 15 and own == sorted(own, reverse=True) and all(f["calls"] > 0 for f in profile["functions_by_own_time"])
    for name, item in result["items"].items():
        assert "error" not in item, f"{name}: {item.get('error')}"
        assert item["median_s"] > 0 and len(item["step_seconds"]) == 1
        assert (tmp_path / "items" / f"{name}.log").exists()
    assert result["shapes"]["time_budget_s"] == 0
    # A ratio, not a timing check: under -n 2 the other worker's load makes tiny steps noisy.
    assert result["ratios"]["distill_over_unavoidable"] > 0 and "distill_over_unavoidable" in result["targets"]


def test_train_speed_budget_spent_in_warmup_keeps_what_the_first_steps_cost(tmp_path):
    # The second GPU run's budget ended inside the warmup (Triton tuning): then no item has a timed
    # step, and the result still says so item by item, with the seconds its warmup steps took.
    result = _run_benchmark("train_speed.py", tmp_path, "--quick", "--warmup", "1", "--steps", "2", "--seq_len", "64",
                            "--time-budget", "0", "--build", "sequential")
    assert result["shapes"]["build"] == "sequential"
    for name, item in result["items"].items():
        assert "no step after the 1 warmup steps" in item.get("error", ""), f"{name}: {item}"
        assert len(item["warmup_step_seconds"]) == 1 and item["warmup_step_seconds"][0] > 0
    assert result["pass"] is False
