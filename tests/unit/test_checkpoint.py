"""Checkpoint durability: per-rank seals, half-written and corrupt tags, fsync failures, RNG states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from ports import free_port
from gloo_ranks import run_on_ranks

from cald_scale.engines import checkpoint
from cald_scale.engines.checkpoint import MANIFEST, _restore_rng, _rng_state, _write_manifest, complete_tags, seal_rank, tag_world_size, verify_tag


def _tag(root, step, *, world=2, sealed=None, manifest=True):
    """A tag as DeepSpeed lays it out for ``world`` ranks; ``sealed``: the ranks that finished sealing."""
    folder = root / f"step_{step:08d}"
    (folder / "teacher").mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"client state" * 50)
    (folder / "teacher" / "extra.pt").write_bytes(b"trajectory teacher" * 10)
    for r in range(world):
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * 300)
        (folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(bytes([r + 7]) * 100)
    for r in range(world) if sealed is None else sealed:
        seal_rank(folder, step, r, world)
    if manifest:
        _write_manifest(folder, step, world)
    return folder


def test_each_rank_seals_exactly_its_own_files(tmp_path):
    folder = _tag(tmp_path, 4, world=3)
    owned = {r: set(json.loads((folder / f"cald_done_rank_{r:05d}.json").read_text())["files"]) for r in range(3)}
    assert owned[1] == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    # Rank 0 also owns the shared files (its model states, the trajectory teacher's folder).
    assert {"mp_rank_00_model_states.pt", "teacher/extra.pt"} <= owned[0]
    assert not owned[0] & owned[1] and not owned[1] & owned[2]
    assert tag_world_size(folder) == 3
    # Every rank checks its share; together they cover every marker.
    assert [verify_tag(folder, me, 2) for me in range(2)] == [None, None]


def test_half_written_corrupt_and_unsealed_tags_are_never_chosen(tmp_path, caplog):
    _tag(tmp_path, 2)
    corrupt = _tag(tmp_path, 4)
    _tag(tmp_path, 6, sealed=[0])  # rank 1 died before sealing (manifest forged to test the marker alone)
    _tag(tmp_path, 8, manifest=False)  # killed before rank 0 wrote the manifest
    (tmp_path / "latest").write_text("step_00000008")  # deepspeed may already point at it
    victim = corrupt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert [step for step, _ in complete_tags(tmp_path)] == [2]
    assert "half-written" in caplog.text and "checksum" in caplog.text and "rank 1's completion marker is missing" in caplog.text


def test_damaged_checkpoints_alone_are_refused_not_started_over(tmp_path):
    """With no intact tag left, a sealed but damaged one stops the run (a fresh start would
    overwrite the run and delete the tag at its first save); half-written ones alone do not."""
    _tag(tmp_path, 2, manifest=False)
    assert complete_tags(tmp_path) == []  # killed while saving its first checkpoint: start over
    tag = _tag(tmp_path, 4)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"short")
    with pytest.raises(checkpoint.CheckpointLoadError, match="every one is damaged .*step_00000004: .* bytes.*refusing to start over"):
        complete_tags(tmp_path)
    _tag(tmp_path, 1)  # an intact older tag: the run falls back to it
    assert [step for step, _ in complete_tags(tmp_path)] == [1]


def test_a_tag_whose_fsync_failed_is_never_sealed(tmp_path, monkeypatch):
    _tag(tmp_path, 3)

    def failing_fsync(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "fsync_path", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        _tag(tmp_path, 5)
    folder = tmp_path / "step_00000005"
    assert not list(folder.glob("cald_done_rank_*")) and not (folder / MANIFEST).exists()
    monkeypatch.undo()
    _write_manifest(folder, 5, 2)  # even with a manifest, the unsealed ranks keep it out
    assert [step for step, _ in complete_tags(tmp_path)] == [3]


def test_truncated_or_missing_files_are_detected(tmp_path):
    tag = _tag(tmp_path, 3)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"short")
    assert "bytes" in verify_tag(tag)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert "missing" in verify_tag(tag)
    (tag / MANIFEST).write_text("{not json")
    assert "unreadable" in verify_tag(tag)


@pytest.mark.parametrize("marker", [b"\xff\xfe not text", b"[1, 2]", b'{"files": [1]}', b'{"files": {"mp_rank_00_model_states.pt": {"crc32": 1}}}'])
def test_a_damaged_marker_or_manifest_falls_back_to_the_tag_before(tmp_path, marker, caplog):
    _tag(tmp_path, 1)
    newer = _tag(tmp_path, 2)
    (newer / "cald_done_rank_00000.json").write_bytes(marker)
    assert [step for step, _ in complete_tags(tmp_path)] == [1]
    assert "unreadable marker of rank 0" in caplog.text
    (newer / MANIFEST).write_bytes(marker)
    assert verify_tag(newer).startswith("unreadable manifest")


def test_format_1_tags_stay_resumable(tmp_path):
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    entries = {"mp_rank_00_model_states.pt": {"size": 10, "crc32": checkpoint._crc32(folder / "mp_rank_00_model_states.pt")}}
    (folder / MANIFEST).write_text(json.dumps({"step": 1, "files": entries}))
    assert verify_tag(folder) is None
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    assert "checksum" in verify_tag(folder)


def test_newest_complete_first(tmp_path):
    for step in (1, 10, 5):
        _tag(tmp_path, step)
    (tmp_path / "not_a_tag").mkdir()
    assert [step for step, _ in complete_tags(tmp_path)] == [10, 5, 1]
    assert complete_tags(tmp_path / "missing") == []


@pytest.mark.parametrize("saved_by", ["now", "before_stop_56"])
def test_rng_states_round_trip(tmp_path, saved_by):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    # Files saved before stop 56 hold numpy's key as an array: still read, as data.
    state = _rng_state() if saved_by == "now" else {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(state, tmp_path / "cald_rng_rank_00000.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    _restore_rng(tmp_path, 0)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    # A rank the checkpoint never had (resumed on more ranks) takes rank 0's states.
    _restore_rng(tmp_path, 3)
    assert random.random() == expected[0]


def _one_rank(script: str, folder, *args: str, env: dict | None = None):
    """``script`` in a process of its own, a DeepSpeed world of one: argv is (folder, a free port, *args)."""
    import subprocess
    import sys

    port = free_port()
    return subprocess.run([sys.executable, "-c", script, str(folder), str(port), *args], capture_output=True, text=True, timeout=300, env=env)


_FULL_DISK = r"""
import os, resource, signal, sys
from pathlib import Path

import deepspeed
import torch

from cald_scale.engines.checkpoint import CheckpointSaveError, complete_tags, save_checkpoint

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Linear(64, 64)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={"train_batch_size": 1})
ckpt = Path(sys.argv[1])
save_checkpoint(engine, ckpt, 1, {}, keep_last=3)
# From here every file this process writes stops at 4 KB (EFBIG, as a full disk stops it with ENOSPC).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(engine, ckpt, 2, {}, keep_last=3)
except CheckpointSaveError as err:
    print("SAVE ERROR:", err)
print("COMPLETE:", [step for step, _ in complete_tags(ckpt)])
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_keeps_the_last_complete_one(tmp_path):
    """A real write failure (the file size limit) inside DeepSpeed's own save of a real engine."""
    ckpt = tmp_path / "checkpoints"
    proc = _one_rank(_FULL_DISK, ckpt)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-4000:]
    line = next(line for line in out.splitlines() if line.startswith("SAVE ERROR:"))
    assert f"could not write the step-2 checkpoint in {ckpt}" in line and "GiB free there" in line
    assert "the last complete checkpoint: step 1" in line and "rerun to resume" in line
    assert "COMPLETE: [1]" in out  # the failed tag is never taken for a complete one


def _complete_tags_on_rank(rank: int, folders: list[str]) -> dict:
    """One of two gloo ranks, each looking at its own checkpoints folder (storage local to its node)."""
    from pathlib import Path

    try:
        return {"tags": [step for step, _ in complete_tags(Path(folders[rank]))]}
    except checkpoint.CheckpointLoadError as err:
        return {"error": str(err)}


def _two_ranks(tmp_path, folders) -> list[dict]:
    return run_on_ranks(_complete_tags_on_rank, tmp_path / "ranks", [str(f) for f in folders])


def test_checkpoints_on_storage_the_ranks_do_not_share_stop_the_run_instead_of_starting_over(tmp_path):
    """Rank 0's node holds the sealed tags, rank 1's folder is empty (node-local run folders, or a
    requeue onto other nodes): both ranks stop, naming the tag and the shared storage they need,
    where the run used to start over at step 0 and prune the tags it could not see."""
    node0, node1 = tmp_path / "node0" / "checkpoints", tmp_path / "node1" / "checkpoints"
    for step in (2, 4):
        _tag(node0, step)
    node1.mkdir(parents=True)
    for rank in _two_ranks(tmp_path, [node0, node1]):
        assert "rank 1 does not see the complete checkpoint(s) step_00000002, step_00000004 that rank 0 sees" in rank["error"]
        assert "output.run_dir must be on storage every node shares" in rank["error"]
    # One folder both ranks see (shared storage): the newest tag complete everywhere.
    assert _two_ranks(tmp_path / "shared", [node0, node0]) == [{"tags": [4, 2]}] * 2


@pytest.mark.parametrize("keep_last", [1, 2])
def test_tags_newer_than_the_saved_step_neither_take_its_place_nor_are_resumed_again(tmp_path, keep_last):
    """A run resumed from step 100 because step 200 is damaged, then saved step 130: step 130
    (and with keep_last 2 step 100) must survive, and step 200 leaves the resumable tags."""
    _tag(tmp_path, 100)
    damaged = _tag(tmp_path, 200)
    victim = damaged / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(b"\x00" + victim.read_bytes()[1:])
    _tag(tmp_path, 250, manifest=False)  # a half-written save of that timeline too
    _tag(tmp_path, 130)
    checkpoint._prune(tmp_path, 130, keep_last)
    assert [step for step, _ in complete_tags(tmp_path)] == [130, 100][:keep_last]
    assert sorted(p.name for p in (tmp_path / checkpoint.SUPERSEDED).iterdir()) == ["step_00000200"]
    assert not (tmp_path / "step_00000250").exists()


def test_a_complete_tag_at_the_step_a_resumed_run_saves_is_moved_aside_not_deleted(tmp_path, caplog):
    """Step 125 did not load (a transient error), the run resumed from 100 and saves step 125 again."""
    from pathlib import Path

    class Engine:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"the resumed run's")

    _tag(tmp_path, 100, world=1)
    _tag(tmp_path, 125, world=1)
    checkpoint.save_checkpoint(Engine(), tmp_path, 125, {}, keep_last=3)
    aside = tmp_path / checkpoint.SUPERSEDED / "step_00000125"
    assert (aside / "mp_rank_00_model_states.pt").read_bytes() == b"client state" * 50 and verify_tag(aside) is None
    assert (tmp_path / "step_00000125" / "mp_rank_00_model_states.pt").read_bytes() == b"the resumed run's"
    assert [step for step, _ in complete_tags(tmp_path)] == [125, 100] and "moved to" in caplog.text
    _tag(tmp_path, 150, world=1, manifest=False)  # a partial save of the same step is replaced, as before
    checkpoint.save_checkpoint(Engine(), tmp_path, 150, {}, keep_last=3)
    assert sorted(p.name for p in aside.parent.iterdir()) == ["step_00000125"]


def _load_on_rank(rank: int, folder: str) -> dict | None:
    """One of two gloo ranks resuming; rank 1 cannot read the newest tag (a local read error)."""
    from pathlib import Path

    class Engine:
        device = torch.device("cpu")

        def load_checkpoint(self, load_dir, tag, load_module_strict):
            if rank == 1 and tag == "step_00000002":
                raise OSError(5, "Input/output error")
            return str(Path(load_dir) / tag), {"tag": tag}

    return checkpoint.load_latest_checkpoint(Engine(), Path(folder))


def test_a_tag_that_fails_to_load_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Every rank resumes from the same tag: rank 0 alone would load step 2 and rank 1 step 1."""
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        _tag(folder, step)
    assert run_on_ranks(_load_on_rank, tmp_path / "ranks", str(folder)) == [{"tag": "step_00000001"}] * 2


@pytest.mark.parametrize("bf16", [False, True])
def test_state_file_names_are_read_as_deepspeed_writes_them(bf16):
    """The names come from DeepSpeed's own naming methods, so a rename there fails here first
    (ownership, the saved world size and pipeline stages are all read from these names)."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    from cald_scale.engines.checkpoint import _owner
    from cald_scale.engines.ds_files import StateFile, parse_state_file

    def name(path):
        return path.rsplit("/", 1)[-1]

    prefix = SimpleNamespace(_get_zero_ckpt_prefix=lambda dp, bf16_mode: DeepSpeedEngine._get_zero_ckpt_prefix(None, dp, bf16_mode))
    optim = name(DeepSpeedEngine._get_rank_zero_ckpt_name(prefix, "ckpt", "step_1", 3, 12, bf16))
    assert parse_state_file(optim) == StateFile("optim", 12, 3)
    zero3 = SimpleNamespace(zero_optimization_partition_weights=lambda: True, checkpoint_mp_rank=0)
    model = name(DeepSpeedEngine._get_ckpt_name(zero3, "ckpt", "step_1", pp_placeholder=5))
    assert parse_state_file(model) == StateFile("model", 5, 0)
    zero1 = SimpleNamespace(zero_optimization_partition_weights=lambda: False, checkpoint_mp_rank=2)
    assert parse_state_file(name(DeepSpeedEngine._get_ckpt_name(zero1, "ckpt", "step_1"))) == StateFile("model", None, 2)
    stage = SimpleNamespace(_local_start=7, global_rank=0, _grid=SimpleNamespace(_topo=SimpleNamespace(get_rank_repr=lambda rank: "")))
    assert parse_state_file(name(PipelineModule.ckpt_layer_path(stage, "ckpt/step_1", 0))) == StateFile("layer", None, 7)

    assert [_owner(optim), _owner(model), _owner("mp_rank_00_model_states.pt"), _owner("cald_rng_rank_00003.pt"), _owner("latest")] == [12, 5, 0, 3, 0]
    assert parse_state_file("zero_to_fp32.py") is None and parse_state_file(f"{model}.tmp") is None


_OTHER_PRECISION = r"""
import json, os, random, sys
from pathlib import Path

import deepspeed
import torch

from cald_scale.engines.checkpoint import complete_tags, load_latest_checkpoint, save_checkpoint

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")


def engine(bf16: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]


def moments(e):
    opt = e.optimizer
    return [(float(opt.optimizer.state[g]["step"]), float(opt.optimizer.state[g]["exp_avg"].norm())) for g in opt.fp32_partitioned_groups_flat]


for saved_bf16 in (True, False):
    ckpt = Path(sys.argv[1]) / ("bf16" if saved_bf16 else "fp32")
    e = engine(saved_bf16)
    x = torch.randn(2, 32, dtype=torch.bfloat16 if saved_bf16 else torch.float32)
    for _ in range(3):
        e.backward(e(x).float().pow(2).mean())
        e.step()
    save_checkpoint(e, ckpt, 3, {}, keep_last=3)
    after_save = (random.random(), torch.rand(2).tolist())  # what the saved RNG states draw next
    files = sorted(p.name for p in (ckpt / "step_00000003").glob("*optim_states.pt"))
    other = engine(not saved_bf16)  # reseeds torch
    random.seed(12345)
    load_latest_checkpoint(other, ckpt, tags=complete_tags(ckpt))
    resumed = (random.random(), torch.rand(2).tolist())
    print("RESULT", json.dumps({"saved_bf16": saved_bf16, "files": files, "saved": moments(e), "loaded": moments(other), "rng": [after_save, resumed]}))
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


def test_a_checkpoint_saved_in_bf16_resumes_in_float32_and_back(tmp_path):
    """A run moved between a bf16 GPU and a machine without (the ds_config's bf16 "auto") could
    never resume: DeepSpeed names a tag's optimizer shards by the saving engine's precision and
    looks only for its own name (helper-83). The shards hold the same fp32 masters and moments:
    both directions load them whole (step and Adam moments equal to what was saved), and the
    process's RNG states are the saved ones again."""
    proc = _one_rank(_OTHER_PRECISION, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["files"] for r in results] == [["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"], ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]]
    for r in results:
        assert r["loaded"] == r["saved"] and r["saved"][0][0] == 3.0 and r["saved"][0][1] > 0, r
        assert r["rng"][0] == r["rng"][1], r  # the resumed process draws on from the saved RNG states
    assert "was saved by bf16 engines and these compute in float32" in proc.stdout + proc.stderr
    assert "was saved by float32 engines and these compute in bf16" in proc.stdout + proc.stderr


_PLANTED = r"""
import json, os, sys
from pathlib import Path

import deepspeed
import torch

from cald_scale.engines.checkpoint import CheckpointLoadError, complete_tags, load_latest_checkpoint, save_checkpoint, seal_rank

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
root, target = Path(sys.argv[1]), sys.argv[3]
marker = root / "payload_ran"


class Payload:
    def __reduce__(self):
        return (os.mkdir, (str(marker),))


def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]


e = engine()
e.backward(e(torch.randn(2, 16)).pow(2).mean())
e.step()
ckpt = root / "ckpt"
save_checkpoint(e, ckpt, 1, {"cursor": 7}, keep_last=2)
tag = ckpt / "step_00000001"
clean = load_latest_checkpoint(engine(), ckpt, tags=complete_tags(ckpt))
print("CLEAN", json.dumps(clean.get("cursor")))
if target != "none":
    # Someone with write access to the run folder plants code in a file and seals the tag again.
    path = next(tag.glob(target))
    state = torch.load(path, weights_only=False)
    state["extra"] = Payload()
    torch.save(state, path)
    seal_rank(tag, 1, 0, 1)
try:
    load_latest_checkpoint(engine(), ckpt, tags=complete_tags(ckpt))
    print("LOADED")
except CheckpointLoadError as err:
    print("REFUSED", err)
print("PAYLOAD", marker.exists())
from cald_scale.launch import leave
leave()  # as a training rank ends: no interpreter finalization under gloo
"""


@pytest.mark.parametrize("target,trust,torch_env", [
    ("*model_states.pt", "", {}), ("*optim_states.pt", "", {}), ("cald_rng_rank_*.pt", "", {}), ("cald_rng_rank_*.pt", "1", {}),
    # torch's own switches, as users set them (torch refuses every load with both of its set)
    ("none", "", {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}), ("none", "1", {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}),
])
def test_a_checkpoint_with_planted_code_is_refused_not_run(tmp_path, target, trust, torch_env):
    """Resuming reads a run folder that others may write (shared storage, a copied project):
    every file of the tag, DeepSpeed's and ours, loads as data. A pickled object that would run
    code stops the resume in one line naming the way out, and the code does not run;
    CALD_TRUST_CHECKPOINTS=1 loads a trusted folder with pickle."""
    import os

    proc = _one_rank(_PLANTED, tmp_path, target, env={**os.environ, "CALD_TRUST_CHECKPOINTS": trust, **torch_env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CLEAN 7" in proc.stdout  # an untouched checkpoint resumes with its client state
    if target == "none":
        assert "LOADED" in proc.stdout, proc.stdout
    elif trust:
        assert "LOADED" in proc.stdout and "PAYLOAD True" in proc.stdout
    else:
        assert "PAYLOAD False" in proc.stdout, proc.stdout
        refused = next(line for line in proc.stdout.splitlines() if line.startswith("REFUSED"))
        assert "pickled objects that are not plain data" in refused and "CALD_TRUST_CHECKPOINTS=1" in refused and "posix.mkdir" in refused, refused


def test_resume_loads_leave_the_callers_own_safe_globals_allowed(monkeypatch):
    """A resume's loads allow our and DeepSpeed's records for their duration; leaving, torch's
    safe_globals() removes what it added, so a record the caller had allowed for its own loads
    (numpy arrays, say) used to be gone afterwards."""
    import numpy as np
    import torch

    from cald_scale.engines.safe_load import weights_only_loads

    monkeypatch.delenv("CALD_TRUST_CHECKPOINTS", raising=False)
    before = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals([np.ndarray])
        with weights_only_loads():
            inside = set(torch.serialization.get_safe_globals())
        after = set(torch.serialization.get_safe_globals())
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert np.ndarray in inside and np.dtype in inside
    assert np.ndarray in after and np.dtype not in after
