"""Crash-safe DeepSpeed checkpoints: a checkpoint counts only once its manifest is written.

DeepSpeed writes a tag folder file by file; a job killed half-way leaves a partial
folder (and may already point ``latest`` at it). We write a manifest (file sizes and
CRC32s) after every rank has finished, atomically, and resume from the newest tag whose
manifest matches its files, falling back to older ones; partial or corrupt tags are
skipped with a warning and never deleted before a newer complete one exists.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable

from ..fileio import atomic_write_text
from .distributed import barrier, rank

__all__ = ["save_checkpoint", "load_latest_checkpoint", "complete_tags", "CheckpointLoadError", "MANIFEST"]

logger = logging.getLogger("cald_scale.checkpoint")
MANIFEST = "cald_manifest.json"
_TAG = re.compile(r"^step_(\d+)$")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(folder: Path, step: int) -> None:
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in _files(folder)}
    atomic_write_text(folder / MANIFEST, json.dumps({"step": step, "files": entries}, indent=1))


def verify_tag(folder: Path) -> str | None:
    """None when the tag is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (half-written: the job stopped while saving)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, meta in entries.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta['size']}"
        if _crc32(path) != meta["crc32"]:
            return f"{name} fails its checksum (corrupt)"
    return None


def _tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete tags, newest first (verifies checksums)."""
    out = []
    for step, path in _tags(ckpt_dir):
        reason = verify_tag(path)
        if reason is None:
            out.append((step, path))
        else:
            logger.warning("ignoring checkpoint %s: %s", path, reason)
    return out


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, *, exclude_frozen: bool = False, also_save: Callable[[Path], None] | None = None
) -> Path:
    """Save on all ranks, then mark complete and prune old complete tags (rank 0).

    ``exclude_frozen`` leaves frozen parameters out (they are rebuilt from the teacher).
    ``also_save(tag_dir)`` writes more state into the same tag (a trajectory teacher's
    engine) before the manifest makes the tag complete.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step:08d}"
    if rank() == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # a stale partial save of this same step
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True, exclude_frozen_parameters=exclude_frozen)
    if also_save is not None:
        also_save(ckpt_dir / tag)
    barrier()
    if rank() == 0:
        _write_manifest(ckpt_dir / tag, step)
        complete = [(s, p) for s, p in _tags(ckpt_dir) if (p / MANIFEST).is_file()]
        for _, old in complete[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        # Partial tags older than the newest complete one can never be used again.
        for s, p in _tags(ckpt_dir):
            if s < step and not (p / MANIFEST).is_file():
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return ckpt_dir / tag


class CheckpointLoadError(RuntimeError):
    """Complete checkpoints exist but none of them loads: never silently start over."""


def load_latest_checkpoint(engine, ckpt_dir: Path, *, frozen_excluded: bool = False, also_load: Callable[[Path, dict], None] | None = None) -> dict | None:
    """Load the newest complete checkpoint; returns its client state, or None for a fresh run.

    A corrupt or unloadable tag is skipped for the previous one. When complete tags exist
    but none loads, this raises instead of letting the job restart from scratch over them.
    ``frozen_excluded``: the checkpoints were saved without frozen parameters (they come
    from the teacher), so the module state is loaded non-strictly. ``also_load(tag_dir,
    client_state)`` restores what ``also_save`` wrote (a failure there also falls back).
    """
    failures = []
    for step, path in complete_tags(Path(ckpt_dir)):
        try:
            load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=path.name, load_module_strict=not frozen_excluded)
            if load_path is not None and also_load is not None:
                also_load(path, client_state or {})
        except Exception as err:  # noqa: BLE001 - any failure means "try the previous one"
            logger.warning("checkpoint %s could not be loaded (%s: %s); trying an older one", path, type(err).__name__, err)
            failures.append(f"{path.name}: {type(err).__name__}: {str(err)[:300]}")
            continue
        if load_path is None:
            logger.warning("checkpoint %s could not be loaded; trying an older one", path)
            failures.append(f"{path.name}: DeepSpeed found nothing to load")
            continue
        logger.info("resumed from %s (step %d)", path, step)
        return client_state or {}
    if failures:
        raise CheckpointLoadError(
            f"{ckpt_dir} holds complete checkpoints but none loads ({'; '.join(failures)}); refusing to start over. "
            "Fix the cause (a changed model or config?) or move the checkpoints away to start a new run."
        )
    return None
