"""One job at a time in a run folder, preemption before the run is built, and resumes refused
before any engine is built when the checkpoint was saved in another mode or layout."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_ranks

from cald_scale.config_loader import ConfigError
from cald_scale.engines.preemption import Preempted, PreemptionWatch
from cald_scale.engines.reshard import OPTIMIZER_GROUPS, plan_resume
from cald_scale.fileio import hold_lock

REPO = Path(__file__).resolve().parents[2]


def test_a_signals_notice_says_what_happens_next_before_and_during_training(caplog):
    """It said "while the run starts: before its first step" of a run many steps in."""
    import os
    import signal

    with caplog.at_level("WARNING", logger="cald_scale.preemption"), PreemptionWatch(("SIGUSR1",)) as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
    for stage in ("training", "finishing"):
        with caplog.at_level("WARNING", logger="cald_scale.preemption"), PreemptionWatch(("SIGUSR1",)) as watch:
            watch.stage = stage
            os.kill(os.getpid(), signal.SIGUSR1)
    notices = [r.getMessage() for r in caplog.records if "received SIGUSR1" in r.getMessage()]
    assert notices == [
        "received SIGUSR1: stopping before the first step (the run is starting: at its next wait or check)",
        "received SIGUSR1: stopping after this step, with a checkpoint",
        "received SIGUSR1: stopping after the final evaluation, with the last step's checkpoint (the requeued job evaluates and exports); "
        "once the export has begun, the run finishes instead",
    ]


def test_a_signal_received_before_the_watch_counts_once_it_begins():
    with PreemptionWatch(("SIGUSR1",), received_before=["SIGTERM", "SIGUSR1"]) as watch:
        assert watch.requested(torch.device("cpu")) == "SIGUSR1"
    with PreemptionWatch(("SIGUSR1",), received_before=["SIGTERM"]) as watch:  # not a preemption signal of this run
        assert watch.requested(torch.device("cpu")) is None
    assert "before training started" in str(Preempted(None, "SIGUSR1"))
    # A resumed session stopped before its first step says its checkpoint stands (it said "before
    # training started" of a run 2 steps in), and keeps saying so once pickled to the other ranks.
    resumed = pickle.loads(pickle.dumps(Preempted(None, "SIGUSR1", resumed_at=2)))
    assert "before this session's first step: the checkpoint at step 2 stands" in str(resumed) and resumed.resumed_at == 2
    assert "stopped at step 3 on SIGTERM: checkpoint saved" in str(Preempted(3, "SIGTERM"))


def test_a_signal_before_the_first_step_of_a_fresh_run_claims_no_checkpoint(tmp_path):
    """Signalled while a fresh run is built: nothing has trained, so nothing is saved, no
    preempted.json says a checkpoint exists, and the message says so (it said "step 0: checkpoint saved")."""
    from types import SimpleNamespace

    from cald_scale.train import _Run

    def save(at):
        raise AssertionError("nothing to save at step 0")

    fresh = SimpleNamespace(state=SimpleNamespace(last_saved=0), save=save, env=SimpleNamespace(is_main=True), run_dir=tmp_path)
    with pytest.raises(Preempted, match="before training started"):
        _Run.stop_preempted(fresh, 0, "SIGUSR1")
    assert not (tmp_path / "preempted.json").exists()
    saved = []
    resumed = SimpleNamespace(state=SimpleNamespace(last_saved=2), save=saved.append, env=SimpleNamespace(is_main=True), run_dir=tmp_path)
    with pytest.raises(Preempted, match="stopped at step 3 on SIGUSR1: checkpoint saved"):
        _Run.stop_preempted(resumed, 3, "SIGUSR1")
    assert saved == [3] and (tmp_path / "preempted.json").is_file()


def _holder(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s lock until it is killed."""
    code = (
        "import sys, time; from cald_scale.fileio import hold_lock; "
        "h = hold_lock(sys.argv[1], 'pid 1 on node-a', wait_s=0); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_lock_waits_for_its_holder_then_names_it(tmp_path):
    lock = tmp_path / ".lock"
    holder = _holder(lock)
    try:
        waited = []
        started = time.monotonic()
        with pytest.raises(BlockingIOError, match=r"pid 1 on node-a still holds .*\.lock after 1 s"):
            hold_lock(lock, "pid 2", wait_s=1.0, poll_s=0.1, on_wait=waited.append)
        assert waited == ["pid 1 on node-a"] and time.monotonic() - started >= 1.0
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    handle = hold_lock(lock, "pid 2 on node-b", wait_s=5.0, poll_s=0.1)
    assert lock.read_text() == "pid 2 on node-b\n"  # the holder's line, not the earlier one's
    handle.close()


def test_a_preemption_signal_ends_the_wait_for_a_run_folder_and_stops_every_rank(tmp_path):
    """A requeued job waiting for its predecessor's ranks to leave the folder stops on the
    warning signal (it would wait ``output.lock_wait_s``); the stop pickles whole, as
    ``on_main`` hands it to every rank."""
    import pickle

    from cald_scale.engines.preemption import PreemptedWhileStarting, raise_if_preempted

    lock = tmp_path / ".lock"
    holder = _holder(lock)
    try:
        started = time.monotonic()
        with PreemptionWatch(("SIGUSR1",)) as watch:
            watch._record(signal.SIGUSR1, None)
            with pytest.raises(PreemptedWhileStarting, match="stopped on SIGUSR1 while waiting for another job") as stop:
                hold_lock(lock, "pid 2", wait_s=60.0, poll_s=0.1, interrupt=lambda: raise_if_preempted("waiting for another job to leave it"))
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    again = pickle.loads(pickle.dumps(stop.value))
    assert type(again) is PreemptedWhileStarting and str(again) == str(stop.value) and again.signal_name == "SIGUSR1"
    assert str(pickle.loads(pickle.dumps(Preempted(3, "SIGTERM")))) == str(Preempted(3, "SIGTERM"))


def test_a_preemption_signal_during_a_universal_conversion_is_not_a_bad_checkpoint(tmp_path):
    """The conversion (a checkpoint saved on another number of ranks) stops on the signal: the
    run stops with it, where any other failure of a tag means "try the older one"."""
    from cald_scale.engines.checkpoint import load_latest_checkpoint
    from cald_scale.engines.preemption import PreemptedWhileStarting

    tried = []

    def converting(tag: Path) -> Path:
        tried.append(tag.name)
        raise PreemptedWhileStarting("SIGUSR1", f"converting {tag.name} to the universal format")

    tags = [(4, tmp_path / "step_00000004"), (2, tmp_path / "step_00000002")]
    with pytest.raises(PreemptedWhileStarting):
        load_latest_checkpoint(None, tmp_path, tags=tags, source=converting)
    assert tried == ["step_00000004"]


def test_a_run_folder_in_use_is_waited_for_while_its_holder_ends(tmp_path):
    """The case it exists for: a rerun while the last job's ranks still save; the rerun goes on once they end."""
    lock = tmp_path / ".lock"
    holder = _holder(lock)
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
    waits = []
    started = time.monotonic()
    handle = hold_lock(lock, "pid 3", wait_s=30.0, poll_s=0.1, on_wait=waits.append)
    waited = time.monotonic() - started
    assert lock.read_text().strip() == "pid 3"  # the lock is ours now, and says so
    handle.close()
    holder.wait()
    assert len(waits) == 1 and 0.5 < waited < 10  # it waited for the holder's end, once told, not the whole wait_s


def _tag(folder: Path, *, ds_config: dict, dp: int, stages: int = 0, client: dict | None = None) -> Path:
    """A checkpoint tag as DeepSpeed lays it out: its config and the client state in rank 0's model
    states, one optimizer shard per data-parallel rank (and per stage in pipeline mode)."""
    folder.mkdir(parents=True)
    states = {"ds_config": ds_config, **(client or {})}
    if stages:
        torch.save(states, folder / "mp_rank_00_model_states.pt")
        for stage in range(stages):
            for rank in range(dp):
                (folder / f"zero_pp_rank_{rank}_mp_rank_{stage:02d}_optim_states.pt").write_bytes(b"")
    else:
        torch.save(states, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        for rank in range(dp):
            (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return folder


def test_a_checkpoint_resumes_only_in_its_own_mode_and_pipeline_layout(tmp_path):
    zero3 = [(4, _tag(tmp_path / "z" / "step_4", ds_config={"train_batch_size": 4}, dp=2))]
    piped = [(4, _tag(tmp_path / "p" / "step_4", ds_config={"train_batch_size": 4, "pipeline": {"stages": 2}}, dp=1, stages=2))]

    with pytest.raises(ConfigError, match=r"saved by ZeRO-3 mode and this run is a 2-stage pipeline .* resume it with train.pipeline_stages=0"):
        plan_resume(zero3, 1, global_batch=4, pipeline_stages=2)
    with pytest.raises(ConfigError, match=r"saved by a 2-stage pipeline and this run is ZeRO-3 mode .* resume it with train.pipeline_stages=2"):
        plan_resume(piped, 2, global_batch=4)
    with pytest.raises(ConfigError, match=r"saved by a 2-stage pipeline and this run is a 1-stage pipeline"):
        plan_resume(piped, 1, global_batch=4, pipeline_stages=1)
    # Pipeline checkpoints are not resharded: the same replicas, and the same global batch, as in ZeRO-3 mode.
    with pytest.raises(ConfigError, match=r"saved by 1 pipeline replica\(s\) and this run has 2: .* 2 ranks for 2 stages"):
        plan_resume(piped, 2, global_batch=4, pipeline_stages=2)
    with pytest.raises(ConfigError, match=r"global batch of 4 sequences, this run with 1 data-parallel rank\(s\) uses 8; set train.global_batch_size=4"):
        plan_resume(piped, 1, global_batch=8, pipeline_stages=2)

    # Another stage partition: each stage's shards hold other blocks.
    with pytest.raises(ConfigError, match=r"saved with pipeline.partition 'uniform' and this run's ds_config has \[0, 1, 4\]"):
        plan_resume(piped, 1, global_batch=4, pipeline_stages=2, partition=[0, 1, 4])
    same = plan_resume(piped, 1, global_batch=4, pipeline_stages=2)
    assert not same.universal and same.source(piped[0][1]) == piped[0][1]
    assert plan_resume(zero3, 1, global_batch=4).universal  # ZeRO-3 on other ranks: DeepSpeed's universal format


def test_a_checkpoint_that_did_not_record_its_optimizer_groups_resumes_with_their_old_layout(tmp_path, caplog):
    """Before 2026-12-05 the embedding, final norm and head shared the copied weights' optimizer
    groups; such a checkpoint's optimizer state has that layout, and only loads into it."""
    from cald_scale.config import load_run_config
    from cald_scale.train import _warn_joined_groups

    config = {"train_batch_size": 4}
    recorded = {OPTIMIZER_GROUPS: ["mixers", "mixers_no_decay", "copied", "outside"]}
    old = [(4, _tag(tmp_path / "old" / "step_4", ds_config=config, dp=1))]
    new = [(4, _tag(tmp_path / "new" / "step_4", ds_config=config, dp=1, client=recorded))]
    assert plan_resume([], 1).outside_groups and plan_resume(new, 1).outside_groups
    assert not plan_resume(old, 1).outside_groups
    # The newest tag unreadable: the loader skips it, and the next one decides the layout.
    broken = _tag(tmp_path / "new" / "step_6", ds_config=config, dp=1)
    (broken / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"torn")
    assert plan_resume([(6, broken), *new], 1).outside_groups
    assert not plan_resume([(6, broken), *old], 1).outside_groups

    cfg = load_run_config(overrides=["student.trainable=all", "phases=[{name: tf, steps: 2, mode: teacher_forced, trainable: all}, {name: e2e}]"])
    _warn_joined_groups(plan_resume(new, 1), cfg.plan(1), cfg.student.trainable)
    assert "predates" not in caplog.text
    _warn_joined_groups(plan_resume(old, 1), cfg.plan(1), cfg.student.trainable)
    assert "predates separate optimizer groups for the embedding, final norm and head" in caplog.text and "phase(s) 'tf'" in caplog.text


def test_a_preemption_signal_while_the_job_imports_stops_it_for_a_requeue(tmp_path):
    """SIGUSR1 before the run's watch exists (the imports take seconds a rank) does not kill the
    rank: it stops with the preempted exit code before building anything."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "launch/train.py", f"output.run_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    time.sleep(0.5)  # inside the imports (torch alone takes longer)
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "preempted: stopped on SIGUSR1 before training started" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Lustre mounted without flock answers ENOLCK: the job still runs (it cannot enforce one job
    per folder there, and says so); any other error of the folder is one line naming it."""
    import errno
    import fcntl

    from cald_scale.config import OutputConfig
    from cald_scale.train import _claim

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _claim(OutputConfig(run_dir=str(tmp_path / "run"))):
        assert (tmp_path / "run").is_dir()
    assert "takes no locks (No locks available): one job per folder is not enforced" in caplog.text
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"output.run_dir .*file/run: cannot write there \(Not a directory\)"):
        with _claim(OutputConfig(run_dir=str(tmp_path / "file" / "run"))):
            pass


def test_slurm_variables_become_torch_ranks_inside_an_srun_step_only(monkeypatch):
    """srun's tasks map SLURM_PROCID/SLURM_STEP_NUM_TASKS to RANK/WORLD_SIZE. A batch script's own
    shell has SLURM_PROCID=0 and the job's SLURM_NTASKS as well, but no step: a plain
    `python launch/train.py` there is a world of one, not rank 0 of 8 waiting 30 minutes for the rest."""
    from cald_scale.engines.distributed import _slurm_to_torch_env

    # A copy: what the mapping sets must not outlive the test (later tests in this process).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")})
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    _slurm_to_torch_env()  # the batch shell: no step
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    _slurm_to_torch_env()  # a task of `srun --ntasks=2`
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_PORT"] == str(29500 + 1234 % 1000)


def test_a_run_folder_that_holds_a_model_or_a_finished_runs_products_is_not_taken_over(tmp_path):
    """helper-77: output.run_dir naming the teacher's folder overwrote its config.json (and wrote
    checkpoints beside its weights); a finished run whose checkpoints were deleted to save disk
    lost its student and report to the next run started there; an empty run_dir (an unset
    "$RUN") filled the working directory. Each is refused in one line, with nothing written."""
    from cald_scale.config import OutputConfig, load_run_config
    from cald_scale.train import _check_run_dir, _claim

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    config = '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'
    (teacher / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"output.run_dir .*teacher holds a llama model \(its config.json is not a cald_scale run's\)"):
        with _claim(OutputConfig(run_dir=str(teacher))):
            pass
    assert sorted(p.name for p in teacher.iterdir()) == ["config.json"] and (teacher / "config.json").read_text() == config
    # The SLURM scripts ask --print_config for the run folder, then write their logs there: refused first.
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "launch/train.py", "--print_config", f"output.run_dir={teacher}"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds a llama model" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (teacher / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds something other than a run"):
        with _claim(OutputConfig(run_dir=str(teacher))):
            pass

    cfg = load_run_config(None, ["train.max_steps=4"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    with _claim(OutputConfig(run_dir=str(run))):  # a run's own folder is claimed as before
        assert _check_run_dir(run, cfg, resuming_at=None) == []  # a start that failed: taken over
    (run / "student").mkdir()
    (run / "report.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds what a finished run made \(student, report.json\) but no checkpoint to resume"):
        _check_run_dir(run, cfg, resuming_at=None)

    with pytest.raises(ValueError, match=r"output.run_dir must be a non-empty path, got ''"):
        load_run_config(None, ["output.run_dir="])


def test_a_full_disk_while_a_record_is_written_names_the_file(tmp_path, monkeypatch):
    """helper-77: a rerun on a full disk stopped with "[Errno 28] No space left on device" alone
    (a write's error names no file); the record's path is now in it, and no temp file is left."""
    import builtins
    import errno

    from cald_scale.fileio import atomic_write_text

    real_open = builtins.open

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", FullDisk)
    with pytest.raises(OSError, match=rf"No space left on device: writing {tmp_path / 'config.json'}") as err:
        atomic_write_text(tmp_path / "config.json", "{}")
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_a_damaged_run_record_is_named_with_the_way_out(tmp_path):
    """helper-77: a data.json holding [] stopped a resume in an AttributeError traceback; a
    truncated record is named too, and both say that deleting it has the run record it again."""
    import torch

    from cald_scale.engines.distributed import DistEnv
    from cald_scale.train import _once

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    path = tmp_path / "data.json"
    for content, message in (("[]", r"data.json is not this run's record \(it holds list, not an object\): delete it"),
                             ('{"source": ', r"data.json is not valid JSON .*: delete it to have this run record it again")):
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            _once(path, env, lambda: {"source": "x"}, resuming=True)
    path.write_text('{"source": "y"}')
    assert _once(path, env, lambda: {"source": "x"}, resuming=True) == {"source": "y"}


def test_the_run_folder_stays_locked_until_wandbs_finish_has_written_there(tmp_path, monkeypatch):
    """The lock was released before the metrics closed (wandb's finish writes its offline run into
    the folder): a job waiting on the folder could start while it still wrote."""
    import fcntl
    from types import SimpleNamespace

    import torch

    from cald_scale import train as train_module
    from cald_scale.config import load_run_config
    from cald_scale.engines.distributed import DistEnv

    run_dir = tmp_path / "run"
    seen = []

    def locked_now() -> bool:
        with open(run_dir / ".lock") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    def start(cfg, ds_config_path, env, stop_requested):
        seen.append(("start", locked_now()))
        return SimpleNamespace(
            device=env.device, first_step=0, plan=SimpleNamespace(total_steps=0), finish=lambda step, preempted: {"done": step},
            metrics=SimpleNamespace(close=lambda: seen.append(("metrics closed", locked_now()))),
        )

    monkeypatch.setattr(train_module, "init_distributed", lambda: DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    monkeypatch.setattr(train_module, "_start", start)
    assert train_module.train(load_run_config(overrides=[f"output.run_dir={run_dir}"]), "unused.json") == {"done": 0}
    assert seen == [("start", True), ("metrics closed", True)]
    assert not locked_now()  # released when the run returned


def _settings_check_on_rank(rank: int, folders: list, caches: list, overrides: list) -> str | None:
    """A rank whose environment names ``caches[rank]`` as its cache (None: no $CALD_SCALE_CACHE),
    started in ``folders[rank]``: the message the check raises there, None when it passes."""
    from cald_scale.config import load_run_config
    from cald_scale.train import _refuse_settings_that_differ_across_ranks

    os.chdir(folders[rank])
    os.environ.pop("CALD_SCALE_CACHE", None)
    if caches[rank] is not None:
        os.environ["CALD_SCALE_CACHE"] = caches[rank]
    cfg = load_run_config(None, ["output.run_dir=runs/here", *overrides[rank]])
    try:
        _refuse_settings_that_differ_across_ranks(cfg, "zero3.json")
    except ValueError as err:
        return str(err)
    return None


def test_a_rank_that_resolves_other_caches_than_rank_0_is_refused_by_name_on_every_rank(tmp_path):
    """A second node's rank launched without the first node's $CALD_SCALE_CACHE (deepspeed
    does not pass it on) resolves another data cache, and would wait for a corpus rank 0
    tokenises elsewhere; every rank stops with the setting named, the remedy said, before any
    folder is claimed. Ranks that agree pass, and so do ranks that differ only in what the run
    never reads: another task's data section, and the teacher cache of a teacher that is no
    GGUF file (helper-102). A teacher one rank cannot find is named before any rank opens it."""
    shared, here = str(tmp_path / "shared_cache"), [str(tmp_path)] * 2
    same = [[], []]
    assert run_on_ranks(_settings_check_on_rank, tmp_path / "agree", here, [shared, shared], same) == [None, None]

    messages = run_on_ranks(_settings_check_on_rank, tmp_path / "differ", here, [shared, None], same)
    assert messages[0] == messages[1] and messages[0] is not None
    message = messages[0]
    assert message.startswith("rank 1 (host ")
    assert f"config data.cache_dir is {str(tmp_path / '.cache' / 'cald_scale' / 'data')!r} there and {shared + '/data'!r} on rank 0" in message
    assert "classification" not in message and "the teacher" not in message and "run folder" not in message.split(". Every rank")[0]
    assert ".deepspeed_env" in message and "CALD_SCALE_CACHE" in message

    # The data cache given in the config: the environment no longer matters.
    given = [[f"data.cache_dir={tmp_path / 'data_cache'}"]] * 2
    assert run_on_ranks(_settings_check_on_rank, tmp_path / "given", here, [shared, None], given) == [None, None]

    # Started in another folder, where the relative teacher folder is missing: named before any rank opens it.
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    (tmp_path / "node0" / "teacher").mkdir()
    (tmp_path / "node0" / "teacher" / "config.json").write_text("{}")
    absolute = [[f"data.cache_dir={tmp_path / 'data_cache'}", f"output.run_dir={tmp_path / 'run'}", "teacher.name_or_path=./teacher"]] * 2
    nodes = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    messages = run_on_ranks(_settings_check_on_rank, tmp_path / "nodes", nodes, [shared, shared], absolute)
    assert messages[0] == messages[1] and "teacher" in messages[0], messages
    assert "does not exist" in messages[0] and "on rank 0" in messages[0]
