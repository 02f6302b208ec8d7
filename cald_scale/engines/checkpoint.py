"""Durable DeepSpeed checkpoints: a tag counts only once every rank has sealed its part.

DeepSpeed writes a tag folder file by file; a job killed half-way leaves a partial folder
(and may already point ``latest`` at it), and a file that is written but not fsynced can
be lost or truncated by a node crash even after a clean exit. So a save goes:

1. every rank: DeepSpeed writes its shards, we write the rank's RNG states;
2. every rank: fsync the files it owns and the tag's folders, then write its completion
   marker ``cald_done_rank_NNNNN.json`` (sizes and CRC32s of its files), itself fsynced;
3. rank 0, after all markers: the tag manifest (``cald_manifest.json``, fsynced, and the
   checkpoints folder fsynced), and only then are older tags deleted.

On resume, each rank verifies a share of the markers (their files' sizes and checksums),
the ranks agree on the newest tag complete everywhere, and corrupt or partial tags are
skipped for older ones, never deleted before a newer complete one exists. A rank checks
the markers it wrote itself when the world size is unchanged, so the check is spread over
the nodes. The storage must be one every rank shares: rank 0 alone writes the manifest,
prunes old tags and holds the run's records, and a requeued job may land on other nodes. A
rank that cannot see a tag another rank sees sealed stops the run, naming both, instead of
starting it over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..fileio import atomic_write_text, fsync_path
from .distributed import all_true, barrier, gather_objects, rank, world_size
from .ds_files import parse_state_file
from .preemption import Preempted
from .safe_load import load_data, refusal, weights_only_loads

__all__ = [
    "save_checkpoint", "load_latest_checkpoint", "load_either_precision", "complete_tags", "verify_tag", "seal_rank", "tag_world_size",
    "CheckpointLoadError", "CheckpointSaveError", "MANIFEST",
]

logger = logging.getLogger("cald_scale.checkpoint")
MANIFEST = "cald_manifest.json"
FORMAT = 2
_TAG = re.compile(r"^step_(\d+)$")
_MARKER = "cald_done_rank_{:05d}.json"
_RNG = "cald_rng_rank_{:05d}.pt"
_RNG_FILE = re.compile(r"^cald_rng_rank_(\d+)\.pt$")


# -- files ---------------------------------------------------------------------------------
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _owner(relative: str) -> int:
    """Which rank wrote a file: DeepSpeed's per-rank shards and our RNG files name their rank;
    the rest (rank 0's model states, ``latest``, the helper script) are rank 0's."""
    name = Path(relative).name
    if (state := parse_state_file(name)) is not None and state.data_rank is not None:
        return state.data_rank
    match = _RNG_FILE.match(name)
    return int(match.group(1)) if match else 0


def _is_ours(name: str) -> bool:
    return name == MANIFEST or name.startswith("cald_done_rank_") or name.startswith(".")


Owner = Callable[[str], "int | None"]
"""Which rank wrote a checkpoint file (its path inside the tag), when the default rule does not
know (pipeline mode's per-stage files); None falls back to the default rule."""


def _owned_files(folder: Path, me: int, owner: Owner | None = None) -> list[Path]:
    def rank_of(relative: str) -> int:
        mapped = owner(relative) if owner is not None else None
        return _owner(relative) if mapped is None else mapped

    return sorted(p for p in folder.rglob("*") if p.is_file() and not _is_ours(p.name) and rank_of(str(p.relative_to(folder))) == me)


# -- sealing -------------------------------------------------------------------------------
def seal_rank(folder: Path, step: int, me: int, world: int, owner: Owner | None = None) -> None:
    """Fsync this rank's files and the tag's folders, then write its completion marker."""
    entries = {}
    for path in _owned_files(folder, me, owner):
        fsync_path(path)
        entries[str(path.relative_to(folder))] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(sub)
    fsync_path(folder)
    marker = {"step": step, "rank": me, "world_size": world, "files": entries}
    atomic_write_text(folder / _MARKER.format(me), json.dumps(marker, indent=1), durable=True)


def _write_manifest(folder: Path, step: int, world: int) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps({"format": FORMAT, "step": step, "world_size": world}, indent=1), durable=True)
    fsync_path(folder.parent)


def _check_files(folder: Path, entries: dict) -> str | None:
    for name, meta in entries.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, its marker says {meta['size']}"
        if _crc32(path) != meta["crc32"]:
            return f"{name} fails its checksum (corrupt)"
    return None


def tag_world_size(folder: Path) -> int | None:
    """The number of ranks that saved the tag (None without a readable manifest)."""
    try:
        return int(json.loads((folder / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_tag(folder: Path, me: int = 0, world: int = 1) -> str | None:
    """None when this rank's share of the tag is complete and intact, else the reason it is not.

    Rank ``me`` of ``world`` checks the markers i with i % world == me (one rank alone
    checks them all); the manifest, written last, must exist for every rank.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (half-written: the job stopped while saving)"
    # NOTE: any damage to a manifest or marker (bytes that are not UTF-8, JSON of another
    # shape) makes the tag unusable, named, so that the start falls back to an older one.
    damaged = (OSError, ValueError, KeyError, TypeError, AttributeError)
    try:
        content = json.loads(manifest.read_text())
        if "files" in content:  # format 1 (one manifest by rank 0, no markers): still resumable
            return _check_files(folder, content["files"]) if me == 0 else None
        saved_world = int(content["world_size"])
    except damaged as err:
        return f"unreadable manifest ({type(err).__name__}: {err})"
    for i in range(me, saved_world, world):
        marker = folder / _MARKER.format(i)
        if not marker.is_file():
            return f"rank {i}'s completion marker is missing (it never finished sealing its part)"
        try:
            reason = _check_files(folder, json.loads(marker.read_text())["files"])
        except damaged as err:
            return f"unreadable marker of rank {i} ({type(err).__name__}: {err})"
        if reason is not None:
            return reason
    return None


def _tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


class CheckpointLoadError(RuntimeError):
    """Complete checkpoints exist but none of them loads: never silently start over."""


def complete_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Tags complete on every rank, newest first (collective when distributed: every rank calls it).

    A half-written tag (no manifest: the job stopped while saving) is skipped. A sealed tag
    that fails its checks (a truncated or corrupt file) is skipped for an older one too, but
    when it leaves no tag at all this raises CheckpointLoadError: a run whose checkpoints are
    all damaged must not silently start over (and then delete them as it saves)."""
    me, world = rank(), world_size()
    tags = _tags(Path(ckpt_dir))
    local, damaged, sealed = [], [], []
    for step, path in tags:
        if (path / MANIFEST).is_file():
            sealed.append(step)
        reason = verify_tag(path, me, world)
        if reason is None:
            local.append(step)
            continue
        logger.warning("ignoring checkpoint %s: %s", path, reason)
        if step in sealed:  # sealed, then damaged
            damaged.append(f"{path.name}: {reason}")
    steps = set(local)
    views = gather_objects((local, damaged, sealed))
    for other, other_damaged, _ in views:
        steps &= set(other)
        damaged += [d for d in other_damaged if d not in damaged]
    _check_shared(Path(ckpt_dir), [set(seen) for _, _, seen in views])
    if not steps and damaged:
        raise CheckpointLoadError(
            f"{ckpt_dir} holds checkpoints, but every one is damaged ({'; '.join(damaged)}); refusing to start over. "
            "Restore them, or move them away to start a new run."
        )
    return [(step, path) for step, path in tags if step in steps]


def _check_shared(ckpt_dir: Path, sealed: list[set[int]]) -> None:
    """Every rank must see the same sealed tags (``sealed[r]``: the steps rank r sees with a
    manifest). A rank that sees none of another's would start the run over and its rank 0 would
    prune the tags the others still hold: checkpoint storage local to each node."""
    seen = set().union(*sealed)
    for r, mine in enumerate(sealed):
        if missing := sorted(seen - mine):
            other = next(q for q, theirs in enumerate(sealed) if missing[0] in theirs)
            raise CheckpointLoadError(
                f"rank {r} does not see the complete checkpoint(s) {', '.join(f'step_{s:08d}' for s in missing)} that rank {other} sees in "
                f"{ckpt_dir}: output.run_dir must be on storage every node shares (a node-local folder cannot resume a run, and a "
                "requeued job may start on other nodes)"
            )


# -- RNG -----------------------------------------------------------------------------------
def _rng_state() -> dict:
    """Every stream's state as tensors, numbers and tuples, so the file loads as data (``safe_load``)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(folder: Path, me: int) -> None:
    """This rank's RNG states; on a different world size, rank 0's for ranks it never had."""
    path = folder / _RNG.format(me)
    if not path.is_file():
        logger.info("checkpoint %s has no RNG states of rank %d (saved on fewer ranks): it takes rank 0's", folder, me)
        path = folder / _RNG.format(0)
    if not path.is_file():
        logger.warning("checkpoint %s holds no RNG states; random streams restart from the seed", folder)
        return
    state = load_data(path)
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning(
                "checkpoint %s holds CUDA RNG states of %d device(s), this process sees %d: the CUDA streams (dropout) restart "
                "from the seed", folder, len(state["cuda"]), torch.cuda.device_count(),
            )


# -- save / load ---------------------------------------------------------------------------
def save_checkpoint(
    engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, *, exclude_frozen: bool = False,
    also_save: Callable[[Path], None] | None = None, owner: Owner | None = None,
) -> Path:
    """Save on all ranks, seal every rank's part durably, then mark complete and prune old tags.

    ``owner`` maps a file to the rank that wrote it where DeepSpeed's names alone do not say
    (pipeline mode), so each rank seals exactly its own files.

    ``exclude_frozen`` leaves frozen parameters out (they are rebuilt from the teacher).
    ``also_save(tag_dir)`` writes more state into the same tag (a trajectory teacher's
    engine) before the tag is sealed.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step_{step:08d}"
    folder = ckpt_dir / tag
    me, world = rank(), world_size()
    if me == 0 and folder.exists():
        if (folder / MANIFEST).is_file():  # complete: of a timeline this run left (it did not load)
            _supersede(ckpt_dir, folder, step)
        else:
            shutil.rmtree(folder)  # a stale partial save of this same step
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MARKER.format(me)).unlink(missing_ok=True)  # this rank's stale marker, from a save of this step that died
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "world_size": world}, save_latest=True, exclude_frozen_parameters=exclude_frozen)
        torch.save(_rng_state(), folder / _RNG.format(me))
        if also_save is not None:
            also_save(folder)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
        raise CheckpointSaveError(_save_failure(ckpt_dir, step, err)) from err
    barrier()  # every rank's files exist before any rank seals (rank 0 owns shared files)
    seal_rank(folder, step, me, world, owner)
    barrier()
    if me == 0:
        _write_manifest(folder, step, world)
        _prune(ckpt_dir, step, keep_last)
    barrier()
    return folder


SUPERSEDED = "superseded"


def _prune(ckpt_dir: Path, step: int, keep_last: int) -> None:
    """After the step-``step`` tag is complete: keep the newest ``keep_last`` complete tags up to
    it and delete older ones and older partial tags.

    Tags newer than ``step`` belong to a timeline this run has left: it resumed from an older
    tag because they did not load (damaged, or a changed config). They must neither take one
    of the ``keep_last`` places (a damaged step 200 would outlive the good step 130 and 100)
    nor be resumed from again, so complete ones move to ``superseded/`` (kept for a look, and
    named in the log) and partial ones are deleted.
    """
    for s, p in _tags(ckpt_dir):
        if s <= step:
            continue
        if not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)
            continue
        _supersede(ckpt_dir, p, step)
    complete = [(s, p) for s, p in _tags(ckpt_dir) if (p / MANIFEST).is_file()]
    for _, old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    # Partial tags older than the newest complete one can never be used again.
    for s, p in _tags(ckpt_dir):
        if s < step and not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)


def _supersede(ckpt_dir: Path, tag: Path, step: int) -> None:
    """Move a complete tag of a timeline this run has left into ``superseded/``."""
    aside = ckpt_dir / SUPERSEDED / tag.name
    shutil.rmtree(aside, ignore_errors=True)  # an earlier run's copy of the same step
    aside.parent.mkdir(exist_ok=True)
    tag.rename(aside)
    logger.warning(
        "checkpoint %s is not older than the step-%d one this run saves (it did not load when the run "
        "resumed): moved to %s, no longer resumed from; delete it once you no longer need it", tag, step, aside,
    )


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a quota, a lost mount): the run stops in one line."""


def _save_failure(ckpt_dir: Path, step: int, err: Exception) -> str:
    free = shutil.disk_usage(ckpt_dir).free / 2**30
    done = [s for s, p in _tags(ckpt_dir) if s < step and (p / MANIFEST).is_file()]
    last = f"step {done[0]}" if done else "none yet"
    return (
        f"could not write the step-{step} checkpoint in {ckpt_dir} ({type(err).__name__}: {err}); {free:.1f} GiB free there. "
        f"The half-written tag has no manifest and is never resumed from; the last complete checkpoint: {last}. "
        "Free some space (or lower output.keep_last), then rerun to resume."
    )


def load_either_precision(engine) -> None:
    """Let ``engine`` load a tag saved by engines of another precision (bf16 and fp32: a run
    moved between a bf16 GPU and a machine without, the ds_config's bf16 "auto" resolving
    differently). Their optimizer shards hold the same fp32 masters and moments; DeepSpeed names
    them by the saving engine's precision (``bf16_zero_pp_rank_...``) and looks only for its own
    name. Its fallback to the other name never runs (``_get_all_zero_checkpoint_names`` never
    returns None), so the names are chosen here: its own where they exist, else the other
    precision's where those do (else its own, for DeepSpeed's FileNotFoundError)."""
    own = getattr(engine, "_get_all_zero_checkpoint_names", None)
    if own is None or getattr(engine, "_cald_either_precision", False):  # not DeepSpeed's engine, or done
        return

    def names(load_dir, tag, bf16_mode):
        found = own(load_dir, tag, bf16_mode)
        if all(os.path.exists(name) for name in found):
            return found
        other = own(load_dir, tag, not bf16_mode)
        if all(os.path.exists(name) for name in other):
            logger.warning(
                "%s was saved by %s engines and these compute in %s: loading its optimizer shards (the same fp32 state)",
                Path(load_dir) / str(tag), "float32" if bf16_mode else "bf16", "bf16" if bf16_mode else "float32",
            )
            return other
        return found

    engine._get_all_zero_checkpoint_names = names
    engine._cald_either_precision = True


def load_latest_checkpoint(
    engine, ckpt_dir: Path, *, frozen_excluded: bool = False, also_load: Callable[[Path, dict], None] | None = None, tags: list[tuple[int, Path]] | None = None,
    source: Callable[[Path], Path] | None = None,
) -> dict | None:
    """Load the newest complete checkpoint; returns its client state, or None for a fresh run.

    A corrupt or unloadable tag is skipped for the previous one. When complete tags exist
    but none loads, this raises instead of letting the job restart from scratch over them.
    ``frozen_excluded``: the checkpoints were saved without frozen parameters (they come
    from the teacher), so the module state is loaded non-strictly. ``also_load(tag_dir,
    client_state)`` restores what ``also_save`` wrote (a failure there also falls back).
    ``tags``: the candidates (default: ``complete_tags(ckpt_dir)``, a collective).
    The loaded tag's RNG states are restored. ``source(tag_dir)``: the folder DeepSpeed loads
    for a tag (the tag itself, or its universal copy on a new world size: engines/reshard.py).
    """
    failures = []
    load_either_precision(engine)
    for step, path in complete_tags(Path(ckpt_dir)) if tags is None else tags:
        error = None
        try:
            with weights_only_loads():  # NOTE: DeepSpeed's loads too: a run folder can be someone else's
                folder = source(path) if source is not None else path
                load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=not frozen_excluded)
                if load_path is None:
                    error = "DeepSpeed found nothing to load"
                else:
                    if also_load is not None:
                        also_load(folder, client_state or {})
                    _restore_rng(path, rank())
        except Preempted:  # a signal during the universal conversion: stop, not "try the previous one"
            raise
        except Exception as err:  # noqa: BLE001 - any failure means "try the previous one"
            error = refusal(err) or f"{type(err).__name__}: {str(err)[:300]}"
        # NOTE: every rank must resume from the same tag: one that failed on any rank is skipped on
        # all, else the ranks would train from different steps. This covers failures outside
        # DeepSpeed's own collectives (its ZeRO-3 load gathers persistent parameters at the end):
        # a rank failing inside them leaves the others waiting there until the group's timeout.
        if not all_true(error is None, engine.device):
            error = error or "it failed on another rank"
            logger.warning("checkpoint %s could not be loaded (%s); trying an older one", path, error)
            failures.append(f"{path.name}: {error}")
            continue
        logger.info("resumed from %s (step %d)", path, step)
        return client_state or {}
    if failures:
        raise CheckpointLoadError(
            f"{ckpt_dir} holds complete checkpoints but none loads ({'; '.join(failures)}); refusing to start over. "
            "Fix the cause (a changed model or config?) or move the checkpoints away to start a new run."
        )
    return None
