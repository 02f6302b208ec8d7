"""Checkpoint durability: per-rank seals, half-written and corrupt tags, fsync failures, RNG states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

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


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(_rng_state(), tmp_path / "cald_rng_rank_00000.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    _restore_rng(tmp_path, 0)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    # A rank the checkpoint never had (resumed on more ranks) takes rank 0's states.
    _restore_rng(tmp_path, 3)
    assert random.random() == expected[0]
