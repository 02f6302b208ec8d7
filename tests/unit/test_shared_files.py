"""Files that jobs share on a cluster's file system: temp names, stale temp folders, indexes
updated by several jobs at once, run ids that a crash may leave empty."""

from __future__ import annotations

import json
import multiprocessing
import threading

from cald_scale.fileio import atomic_dir, atomic_write_text


def test_writers_with_one_pid_never_share_a_temp_file(tmp_path):
    """Temp names were unique per pid: two nodes running the same pid (one pid namespace per
    container) on a shared file system, or two threads, tore each other's writes. Threads of
    one process share a pid, so they stand in for them here."""
    target, errors = tmp_path / "shared.json", []

    def write(tag: str) -> None:
        for i in range(300):
            try:
                atomic_write_text(target, json.dumps({"writer": tag, "i": i, "pad": "x" * 2000}))
            except OSError as err:
                errors.append(err)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 299  # whole, the last write of one writer
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]  # no temp file left


def test_a_killed_writers_temp_folders_are_cleared_by_the_next_holder_of_the_lock(tmp_path):
    """A SIGKILL (the OOM killer, during a GGUF teacher's conversion) skips atomic_dir's cleanup:
    its temp folder (28 GB at 7B) stayed in the shared cache for good."""
    target = tmp_path / "teachers" / "model-abc"
    stale = target.parent / f".{target.name}.tmp-killed"
    (stale / "sub").mkdir(parents=True)
    other = target.parent / ".other.tmp-keep"  # another target's: not this writer's to clear
    other.mkdir()
    with atomic_dir(target) as tmp:  # without clear_stale: left alone
        (tmp / "config.json").write_text('{"model_type": "llama"}')
    assert stale.is_dir()
    with atomic_dir(target.with_name("model-def"), clear_stale=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert stale.is_dir()  # another target's leftovers: kept
    with atomic_dir(target, replace=True, clear_stale=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and other.is_dir() and (target / "config.json").is_file()


def _digest(args) -> None:
    from pathlib import Path

    from cald_scale.conversion.teacher import _content_digest

    path, index = args
    _content_digest(Path(path), Path(index))


def test_jobs_hashing_other_gguf_files_at_once_keep_every_entry_of_the_index(tmp_path):
    """gguf_digests.json was read, extended and written back with no lock: of 8 jobs hashing
    8 files at once, 5 entries were kept, and the others hashed their whole file again next time."""
    files = []
    for i in range(8):
        path = tmp_path / f"model{i}.gguf"
        path.write_bytes(bytes([i]) * 4_000_000)
        files.append(str(path))
    index = tmp_path / "teachers" / "gguf_digests.json"
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_digest, [(path, str(index)) for path in files])
    kept = json.loads(index.read_text())
    assert sorted(key.split(":")[0] for key in kept) == sorted(files)


def test_an_empty_wandb_id_gets_a_new_one_instead_of_turning_wandb_off(tmp_path):
    """A crash between creating wandb_id.txt and writing it left it empty: wandb refused the empty
    id in every later session ("Run ID cannot be empty") and the run logged nothing to it."""
    from cald_scale.metrics import _wandb_id

    (tmp_path / "wandb_id.txt").write_text("")
    run_id = _wandb_id(tmp_path)
    assert run_id.isalnum() and len(run_id) == 12
    assert (tmp_path / "wandb_id.txt").read_text() == run_id and _wandb_id(tmp_path) == run_id


def test_a_durable_write_syncs_the_content_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """What survives a node crash: the new name must never point at unsynced content, and the
    rename itself is synced through the folder. A plain write syncs nothing."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "{}", durable=True)
    (kind0, synced), (kind1, moved, onto), (kind2, folder) = events
    assert (kind0, kind1, kind2) == ("fsync", "replace", "fsync")
    assert synced == moved and onto == str(target) and folder == str(tmp_path)
    events.clear()
    atomic_write_text(target, "{}")
    assert [e[0] for e in events] == ["replace"]


def test_a_process_is_known_gone_only_on_its_own_boot_and_pid_namespace():
    """What a file left by a process may be removed on: its process ended, as this process can
    tell it (same boot, same pid namespace; a pid reused by another process does not count as it)."""
    import subprocess

    from cald_scale.fileio import _start_ticks, process_gone, process_identity

    me = process_identity()
    child = subprocess.Popen(["sleep", "30"])
    try:
        theirs = {**me, "pid": child.pid, "start": _start_ticks(child.pid)}
        assert not process_gone(me) and not process_gone(theirs)
        assert process_gone({**theirs, "start": theirs["start"] - 1})  # the pid now names another process
    finally:
        child.kill()
        child.wait()
    assert process_gone(theirs)
    assert not process_gone({**theirs, "pid_namespace": me["pid_namespace"] + 1})  # another container's pid
    assert not process_gone({**theirs, "boot_id": "another boot"}) and not process_gone(None)
