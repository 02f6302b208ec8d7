"""Triton autotuning choices shared between processes (cald_scale.mixers.ops._autotune_cache).

Real Triton kernels, tuned for real by Triton's own autotuner, on the CPU: TRITON_INTERPRET=1
runs the kernels in Triton's interpreter, and the kernel's ``do_bench`` (a hook Triton's
``autotune`` takes) times each config on the CPU and counts the benchmarks, which are what the
cache exists to skip. The winning config carries a ``pre_hook``, the case Triton's own disk
cache refuses. Each process is a fresh Python, as two ranks or two benchmark steps are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

KERNELS = textwrap.dedent(
    '''
    import torch
    import triton
    import triton.language as tl

    BENCH_CALLS = []
    PRE_HOOK_CALLS = []


    def count_bench(fn, quantiles):
        # The second config wins, the one with a pre_hook (Triton's disk cache skips such kernels).
        BENCH_CALLS.append(1)
        fn()
        timing = 2.0 if len(BENCH_CALLS) % 2 else 1.0
        return [timing, timing, timing]


    def zero_out(nargs):
        PRE_HOOK_CALLS.append(1)
        nargs["out_ptr"].zero_()


    @triton.autotune(
        configs=[triton.Config({"BLOCK": 16}, num_warps=2), triton.Config({"BLOCK": 32}, num_warps=4, pre_hook=zero_out)],
        key=["n"],
        do_bench=count_bench,
    )
    @triton.jit
    def double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)


    def double(x):
        out = torch.empty_like(x)
        double_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, out, x.numel())
        return out
    '''
)

# One process: import the kernels, sync, launch (tuning unless a choice came in), and report.
# "entry": the module-level entry point that the scan wrappers call, with its atexit save.
PROCESS = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from cald_scale.mixers.ops import _autotune_cache

    path, stamp, entry = sys.argv[1], sys.argv[2], sys.argv[3] == "entry"
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        if entry:
            _autotune_cache.MODULE_PREFIX = "cald_test_kernels."
            import cald_test_kernels.double as k
            _autotune_cache.sync()  # the real stamp: "cpu | triton <version> | mamba_ssm none"
        else:
            import cald_test_kernels.double as k
            choices = _autotune_cache.AutotuneChoices(path, module_prefix="cald_test_kernels.", stamp=stamp)
            choices.sync()
        x = torch.arange(100, dtype=torch.float32)
        correct = torch.equal(k.double(x), x * 2)
        if not entry:
            choices.sync()
    (chosen,) = k.double_kernel.cache.values()
    print(json.dumps({
        "correct": correct,
        "bench_calls": len(k.BENCH_CALLS),
        "pre_hook_calls": len(k.PRE_HOOK_CALLS),
        "chosen": k.double_kernel.configs.index(chosen),
        "warnings": [str(w.message) for w in caught],
    }))
    """
)


@pytest.fixture
def run_process(tmp_path):
    package = tmp_path / "pkg" / "cald_test_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "double.py").write_text(KERNELS)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkg"), str(REPO)])}
    env.pop("CALD_TRITON_AUTOTUNE_CACHE", None)

    def run(path: Path, stamp: str = "device A | triton x | mamba_ssm y", entry: bool = False) -> dict:
        if entry:
            env["CALD_TRITON_AUTOTUNE_CACHE"] = str(path)
        proc = subprocess.run(
            [sys.executable, "-c", PROCESS, str(path), stamp, "entry" if entry else "class"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        env.pop("CALD_TRITON_AUTOTUNE_CACHE", None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["correct"], "the kernel computed the wrong values"
        return result

    return run


def test_second_process_reuses_the_first_ones_choice_without_benchmarking(run_process, tmp_path):
    path = tmp_path / "choices" / "autotune.json"
    first = run_process(path)
    assert first["bench_calls"] == 2, "the first process should tune both configs"
    assert first["chosen"] == 1
    saved = json.loads(path.read_text())["stamps"]["device A | triton x | mamba_ssm y"]
    (index, config_text), = saved["cald_test_kernels.double.double_kernel"].values()
    assert list(saved["cald_test_kernels.double.double_kernel"]) == ["(100, 'torch.float32', 'torch.float32')"]
    # The config's text as Triton writes it (its fields vary by version: 3.9 adds ir_override).
    assert index == 1 and config_text.startswith("BLOCK: 32, num_warps: 4, num_ctas: 1, num_stages: 3")

    second = run_process(path)
    assert second["bench_calls"] == 0, "the choice on disk should spare the second process the benchmark"
    assert second["chosen"] == 1
    assert second["pre_hook_calls"] >= 1, "the chosen config's pre_hook must still run before the launch"
    assert second["warnings"] == []


def test_another_stamp_tunes_again_and_keeps_both(run_process, tmp_path):
    path = tmp_path / "autotune.json"
    run_process(path, stamp="device A")
    other = run_process(path, stamp="device B")
    assert other["bench_calls"] == 2, "choices measured on another device or version must not be used"
    assert set(json.loads(path.read_text())["stamps"]) == {"device A", "device B"}


def test_stale_config_text_is_not_trusted(run_process, tmp_path):
    path = tmp_path / "autotune.json"
    run_process(path)
    data = json.loads(path.read_text())
    for entries in data["stamps"].values():
        for choices in entries.values():
            for key in choices:
                choices[key][1] = "BLOCK: 64, num_warps: 8"  # the kernel's config list changed
    path.write_text(json.dumps(data))
    again = run_process(path)
    assert again["bench_calls"] == 2
    (entries,) = json.loads(path.read_text())["stamps"].values()
    (index, config_text), = entries["cald_test_kernels.double.double_kernel"].values()
    assert (index, config_text.split(",")[0]) == (1, "BLOCK: 32"), "the retuned choice should replace the stale one"


def test_unreadable_file_warns_tunes_and_is_rewritten(run_process, tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{ not json")
    result = run_process(path)
    assert result["bench_calls"] == 2
    assert any("ignoring unreadable autotuning choices" in w and str(path) in w for w in result["warnings"]), result["warnings"]
    assert json.loads(path.read_text())["format"] == 1


def test_entry_point_saves_at_exit_what_was_tuned_after_the_last_sync(run_process, tmp_path):
    """The scan wrapper syncs before each launch, so a process's last tuning (its last backward
    pass) is only saved by the exit hook; a second process then skips the benchmark."""
    path = tmp_path / "autotune.json"
    first = run_process(path, entry=True)
    assert first["bench_calls"] == 2
    assert path.exists(), "the exit hook did not save the choice tuned after the last sync"
    second = run_process(path, entry=True)
    assert second["bench_calls"] == 0


# A step killed by its time cap: tuned, then blocked until ``timeout`` sends SIGTERM.
KILLED = textwrap.dedent(
    """
    import time
    import torch
    from cald_scale.mixers.ops import _autotune_cache
    _autotune_cache.MODULE_PREFIX = "cald_test_kernels."
    import cald_test_kernels.double as k
    _autotune_cache.sync()
    k.double(torch.arange(100, dtype=torch.float32))
    print("tuned", flush=True)
    time.sleep(120)
    """
)


def test_a_process_killed_by_sigterm_saves_what_it_tuned_first(run_process, tmp_path):
    """gpu_check's caps end a step with SIGTERM, which skips atexit: the choices tuned so far are
    saved anyway, the process still dies of SIGTERM, and the next process skips the benchmark."""
    path = tmp_path / "autotune.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkg"), str(REPO)]), "CALD_TRITON_AUTOTUNE_CACHE": str(path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "tuned", proc.stderr.read()[-3000:]
        assert not path.exists(), "nothing should be saved before the signal (no sync after the tuning launch)"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
    assert path.exists(), "SIGTERM lost the choice tuned after the last sync"
    assert run_process(path, entry=True)["bench_calls"] == 0


UNTUNED_PROCESS = textwrap.dedent(
    """
    import json
    import torch
    from cald_scale.mixers.ops import _autotune_cache

    _autotune_cache.MODULE_PREFIX = "cald_test_kernels."
    import cald_test_kernels.double as k
    _autotune_cache.sync()
    x = torch.arange(100, dtype=torch.float32)
    print(json.dumps({
        "correct": torch.equal(k.double(x), x * 2),
        "bench_calls": len(k.BENCH_CALLS),
        "configs": [c.kwargs["BLOCK"] for c in k.double_kernel.configs],
    }))
    """
)


def test_untuned_runs_the_smallest_config_without_benchmarking(run_process, tmp_path):
    # The same kernel tunes both configs and picks the larger one when tuning is on (above).
    env = {**os.environ, "TRITON_INTERPRET": "1", "CALD_TRITON_UNTUNED": "1", "CALD_TRITON_AUTOTUNE_CACHE": str(tmp_path / "unused.json")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "pkg"), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", UNTUNED_PROCESS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"correct": True, "bench_calls": 0, "configs": [16]}
    assert not (tmp_path / "unused.json").exists(), "untuned runs neither load nor save choices"


def test_smallest_config_orders_by_tiles_then_stages_and_warps():
    import triton
    from cald_scale.mixers.ops._autotune_cache import smallest_config

    configs = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=2, num_warps=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=3, num_warps=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=3, num_warps=8),
    ]
    assert smallest_config(configs) is configs[2]


def test_save_merges_under_a_lock_so_parallel_processes_keep_each_others_choices(tmp_path):
    """Parallel train_speed items (and ranks) each read the file, merge and write it back: one
    process's write between another's read and write dropped that one's choices. The merge now
    waits for the lock another process holds, and merges what that process wrote meanwhile."""
    import threading
    import time

    from cald_scale.fileio import file_lock
    from cald_scale.mixers.ops._autotune_cache import AutotuneChoices

    path = tmp_path / "autotune.json"
    choices = AutotuneChoices(path, module_prefix="cald_no_such_kernels.", stamp="device A")
    with file_lock(tmp_path / "autotune.json.lock"):  # another process is merging
        saver = threading.Thread(target=choices.save)
        saver.start()
        time.sleep(0.5)
        assert saver.is_alive(), "save did not wait for the lock another process holds"
        path.write_text(json.dumps({"format": 1, "stamps": {"device B": {"k": {"(1,)": [0, "BLOCK: 16"]}}}}))
    saver.join(timeout=30)
    assert not saver.is_alive()
    assert set(json.loads(path.read_text())["stamps"]) == {"device A", "device B"}, "the other process's choices were dropped"


# A SIGTERM while the choices are being saved (the file's lock held): the handler saved again,
# and its second flock waited for this very process, forever (helper-79).
SIGTERM_IN_SAVE = textwrap.dedent(
    """
    import os, sys, threading, time
    from cald_scale import fileio
    from cald_scale.mixers.ops import _autotune_cache as ac

    ac.AutotuneChoices._count = lambda self: 1  # "a kernel was tuned since the last save"
    ac.AutotuneChoices.autotuners = lambda self: {}
    ac._stamp = lambda: "stamp"
    real_write = fileio.atomic_write_text  # the merge's write (fileio.update_json)

    def slow_write(path, text):  # a slow disk: the write inside the lock takes a while
        print("writing", flush=True)
        time.sleep(1.5)
        real_write(path, text)

    fileio.atomic_write_text = slow_write
    choices = ac.autotune_choices()  # installs the SIGTERM handler
    threading.Timer(0.5, lambda: os.kill(os.getpid(), 15)).start()
    choices.sync()
    print("not reached", flush=True)
    """
)


def test_a_sigterm_during_a_save_lets_it_finish_then_ends_the_process(tmp_path):
    path = tmp_path / "autotune.json"
    env = {**os.environ, "CALD_TRITON_AUTOTUNE_CACHE": str(path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_SAVE], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "writing" in proc.stdout and "not reached" not in proc.stdout
    assert json.loads(path.read_text())["stamps"] == {"stamp": {}}, "the save in progress was not finished"
