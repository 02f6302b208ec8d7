"""Checkpoint completeness: manifests, half-written tags, corruption, newest-complete-first."""

from __future__ import annotations

from cald_scale.engines.checkpoint import (
    MANIFEST,
    _write_manifest,
    complete_tags,
    verify_tag,
)


def _tag(root, step, *, complete=True, payload=b"weights"):
    folder = root / f"step_{step:08d}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model_states.pt").write_bytes(payload * 100)
    (folder / "sub" / "optim_states.pt").write_bytes(payload * 300)
    if complete:
        _write_manifest(folder, step)
    return folder


def test_half_written_and_corrupt_tags_are_skipped(tmp_path, caplog):
    old = _tag(tmp_path, 2)
    corrupt = _tag(tmp_path, 4)
    _tag(tmp_path, 6, complete=False)  # killed while saving: no manifest
    (tmp_path / "latest").write_text("step_00000006")  # deepspeed may already point at it
    victim = corrupt / "sub" / "optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert [step for step, _ in complete_tags(tmp_path)] == [2]
    assert "half-written" in caplog.text and "checksum" in caplog.text
    assert verify_tag(old) is None


def test_truncated_or_missing_files_are_detected(tmp_path):
    tag = _tag(tmp_path, 3)
    (tag / "model_states.pt").write_bytes(b"short")
    assert "bytes" in verify_tag(tag)
    (tag / "model_states.pt").unlink()
    assert "missing" in verify_tag(tag)
    (tag / MANIFEST).write_text("{not json")
    assert "unreadable" in verify_tag(tag)


def test_newest_complete_first(tmp_path):
    for step in (1, 10, 5):
        _tag(tmp_path, step)
    (tmp_path / "not_a_tag").mkdir()
    assert [step for step, _ in complete_tags(tmp_path)] == [10, 5, 1]
    assert complete_tags(tmp_path / "missing") == []

