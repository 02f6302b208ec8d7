"""Process-group set-up for the deepspeed launcher, srun, or a plain single process."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import uuid
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "close_distributed", "release_distributed", "barrier", "rank", "world_size", "all_true", "mean_over_ranks", "gather_objects", "on_main", "refuse_differences_across_ranks"]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    made: tuple[str, ...] = ()
    """The environment variables ``init_distributed`` set itself (a world of one it made, in a
    plain process: a notebook, a user's script); ``release_distributed`` takes them back."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_to_torch_env() -> None:
    """Map SLURM's variables to torch's inside an srun step (deepspeed.init_distributed does not
    read SLURM's). Only there: a batch script's own shell has SLURM_PROCID=0 and the job's
    SLURM_NTASKS too, and a plain ``python launch/train.py`` in it would wait for ranks that
    never come."""
    if "RANK" in os.environ or "SLURM_STEP_ID" not in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout.split()
            os.environ["MASTER_ADDR"] = hosts[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LAUNCH_ID_DRAWN = False


def _draw_launch_id() -> None:
    """One id per launch, the same on every rank (every rank calls init_distributed): the notes
    a failed rank 0 leaves for the others name it, so the next launch (a requeue, a rerun on
    the same port) ignores them. Overwrites an id exported from an earlier job's environment."""
    global _LAUNCH_ID_DRAWN
    launch = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(launch, src=0)
    os.environ["CALD_LAUNCH_ID"] = launch[0]
    _LAUNCH_ID_DRAWN = True


def init_distributed() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU), on the
    DeepSpeed release the engines are tested on (``deepspeed_version``)."""
    import deepspeed

    from .deepspeed_version import check_deepspeed_version
    from .op_builds import clear_stale_build_locks

    check_deepspeed_version()
    _slurm_to_torch_env()
    before = set(os.environ)
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    made = tuple(sorted(set(os.environ) - before))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        clear_stale_build_locks()  # DeepSpeed builds its CPU allreduce op here, and others later
        try:
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        except dist.DistError as err:  # raised past the entry point's one-line errors otherwise
            raise _rendezvous_error(err) from err
        if device.type == "cpu":
            _unlink_shm_buffers()
    if not _LAUNCH_ID_DRAWN:
        _draw_launch_id()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device, made=made)


def _rendezvous_error(err: Exception) -> ConnectionError:
    """A failed rendezvous, named with what to change (an OSError: the entry points print it in one line)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    rank = os.environ.get("RANK", "?")
    if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
        return ConnectionError(
            f"rank {rank} cannot open the rendezvous port {where}: it is in use (another job on this machine?). "
            "Launch with another port: `deepspeed --master_port N ...`, or MASTER_PORT=N"
        )
    if isinstance(err, dist.DistStoreError):  # rank 0 waited for the others in vain
        return ConnectionError(
            f"rank {rank} timed out waiting for all {os.environ.get('WORLD_SIZE', '?')} ranks at the rendezvous {where} "
            f"(a rank that never started, or another port or host): {err}"
        )
    return ConnectionError(f"rank {rank} could not join the rendezvous at {where}: {err}")


def release_distributed(env: DistEnv) -> None:
    """Take back the variables ``init_distributed`` set for a world of one it made in this
    process (a user's script, a notebook), so the next tool there does not read RANK and
    WORLD_SIZE and take itself for a rank. Launched ranks keep the launcher's.

    NOTE: the process group itself stays for the life of the process: DeepSpeed keeps its
    groups in module globals (``deepspeed.utils.groups``), and an engine built after a
    destroy_process_group fails on them ("Group ... is not registered"). The next run here
    finds the group and uses it. On gloo, the script should then end as the training command
    does (``launch.leave``): a gloo thread still freeing a collective's tensors when the
    interpreter finalizes aborts the process."""
    for name in env.made:
        os.environ.pop(name, None)


def close_distributed() -> None:
    """Destroy every process group (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU shared-memory allreduce buffers once every rank has mapped them.

    NOTE: DeepSpeed's shm comm op creates one 69 MB /dev/shm file per rank and never
    unlinks it, so every CPU run left ranks x 69 MB of RAM-backed files behind (5.9 GB after
    a day of tests here). Every rank maps all the buffers during init_distributed; after a
    barrier the names are not needed, and the memory is freed when the last rank exits.
    """
    import glob

    barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{dist.get_rank()}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (all ranks must take the same branch)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (all pass the same keys): per-rank means of equal
    slices become the mean over the whole global batch."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {k: v / dist.get_world_size() for k, v in zip(keys, total.tolist())}


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (a collective: every rank calls it)."""
    if world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def refuse_differences_across_ranks(values: dict[str, object], *, why: str) -> None:
    """Raise on every rank when some rank's ``values`` differ from rank 0's, naming the first
    such rank, its host and each differing key with both values (a collective: every rank calls
    it, and every rank gets the same verdict, so none is left waiting). ``why``: what the
    difference breaks and how to make the ranks agree, for the message."""
    views = gather_objects((socket.gethostname(), values))
    host0, first = views[0]
    for other, (host, view) in enumerate(views[1:], start=1):
        differ = sorted(k for k in first.keys() | view.keys() if first.get(k) != view.get(k))
        if differ:
            shown = "; ".join(f"{k} is {view.get(k)!r} there and {first.get(k)!r} on rank 0" for k in differ[:6])
            more = f" ({len(differ)} settings in all)" if len(differ) > 6 else ""
            raise ValueError(f"rank {other} (host {host}) does not run the settings rank 0 (host {host0}) runs: {shown}{more}. {why}")


def on_main(fn: Callable[[], object]) -> None:
    """Run ``fn`` on rank 0 alone; whatever it raises is raised on every rank (a collective:
    every rank calls it). Without this, a rank-0 error leaves the others waiting in their next
    collective until the process group breaks, with a gloo or NCCL traceback of its own."""
    error: BaseException | None = None
    if rank() == 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then re-raised
            error = err
    if world_size() > 1:
        box = [_picklable(error)]
        dist.broadcast_object_list(box, src=0)
        if rank() != 0:
            error = box[0]
    if error is not None:
        raise error


def _picklable(error: BaseException | None) -> BaseException | None:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - e.g. an exception holding a lock: its message will do
        return RuntimeError(f"{type(error).__name__}: {error}")

