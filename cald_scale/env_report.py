"""What this machine gives cald_scale, and what would fail or run slowly here, before a job is launched.

    cald-scale env [--json]

Checks the installed releases against the tested ones, the accelerator and its precision, the
mixer kernels a GPU student runs (without them it runs the pure-PyTorch path), DeepSpeed's
ability to build its ops, the caches (writable, free space, file locks), the offline flags and
built-in assets, SLURM and what a multi-node launch passes to the other nodes. Each line is
"ok", "warn" (runs, slower or with a caveat) or "fail" (a job would stop); the exit status is 1
when one fails. Run it on a login node and inside an allocation, and attach `--json` to a bug report.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["add_arguments", "run", "Check", "collect"]

# The settings a job reads that a multi-node launch must pass on, as launch/slurm/train_deepspeed.sbatch does.
_FORWARDED_PREFIXES = ("CALD_", "HF_", "TRANSFORMERS_", "WANDB_", "TORCH_", "TOKENIZERS_", "TRITON_")
# Below this, a cache cannot hold a tokenised corpus and a de-quantised teacher of the sizes shipped.
_MIN_FREE_GB = 5.0


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str
    """"ok", "warn" or "fail"."""
    value: str
    note: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace) -> int:
    checks = collect()
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:>4}  {c.name:<{width}}  {c.value}" + (f"  ({c.note})" if c.note else ""))
    return 1 if any(c.status == "fail" for c in checks) else 0


def collect() -> list[Check]:
    """Every check, in the order printed; one that raises is a warned line of its own."""
    checks: list[Check] = []
    for check in (_releases, _accelerator, _kernels, _compiler, _caches, _offline_assets, _slurm, _multinode):
        try:
            checks.extend(check())
        except Exception as err:  # noqa: BLE001 - the report goes on; its own failure is a warned line, not the machine's
            checks.append(Check(check.__name__.strip("_"), "warn", f"not checked: the check raised {type(err).__name__}: {err}"))
    return checks


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _releases() -> list[Check]:
    import torch

    from packaging.requirements import Requirement

    from .engines.deepspeed_version import ALLOW_ENV, TESTED_DEEPSPEED, is_tested
    from .fileio import env_flag

    checks = [Check("python", "ok", platform.python_version(), sys.executable)]
    checks.append(Check("cald_scale", "ok", _version("cald-scale") or "not installed (run from a checkout)"))
    checks.append(Check("torch", "ok", torch.__version__, f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"))
    deepspeed = _version("deepspeed")
    if deepspeed is None:
        checks.append(Check("deepspeed", "fail", "not installed", f"pip install deepspeed=={TESTED_DEEPSPEED}"))
    elif not is_tested(deepspeed):
        allowed = env_flag(ALLOW_ENV)
        checks.append(Check("deepspeed", "warn" if allowed else "fail", deepspeed, f"tested on {TESTED_DEEPSPEED} only" + ("; allowed by " + ALLOW_ENV if allowed else f" (or {ALLOW_ENV}=1)")))
    else:
        checks.append(Check("deepspeed", "ok", deepspeed))
    transformers = _version("transformers")
    if transformers is None:
        checks.append(Check("transformers", "fail", "not installed"))
    else:
        # The range pyproject.toml pins, as the installed package declares it.
        declared = next((r.specifier for r in map(Requirement, importlib.metadata.requires("cald-scale") or []) if r.name == "transformers"), None)
        tested = declared is None or declared.contains(transformers)
        checks.append(Check("transformers", "ok" if tested else "warn", transformers, "" if tested else f"tested on {declared} (pyproject's range); generation uses its private internals"))
    for package, needed in (("megatron-core", True), ("datasets", True), ("wandb", False)):
        found = _version(package)
        status = "ok" if found else "fail" if needed else "warn"
        checks.append(Check(package, status, found or "not installed", "" if found or needed else "runs log to metrics.jsonl only"))
    return checks


def _accelerator() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        if Path("/dev/nvidia0").exists():
            why = "a CPU build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda} sees no device"
            return [Check("accelerator", "warn", "CPU only, on a machine with an NVIDIA device", f"{why}: the job would train on the CPU")]
        return [Check("accelerator", "ok", "CPU only", "fp32 engines on gloo; the mixers run their pure-PyTorch path")]
    checks = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        checks.append(Check(f"gpu {index}", "ok", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", "ok" if bf16 else "warn", "supported" if bf16 else "not supported", "" if bf16 else "the engines compute in fp32 (bf16 'auto')"))
    return checks


def _kernels() -> list[Check]:
    import torch

    from .mixers.ops._cuda import INSTALL_HINT, kernel_groups

    if not torch.cuda.is_available():
        return [Check("mixer kernels", "ok", "not used on CPU", "the pure-PyTorch path, tested against them")]
    checks = []
    for group, (ok, reason) in kernel_groups().items():
        checks.append(Check(f"kernel {group}", "ok" if ok else "warn", "importable" if ok else "missing", "" if ok else f"{reason}; the pure-PyTorch path runs, slower: {INSTALL_HINT}"))
    flash = importlib.util.find_spec("flash_attn") is not None
    checks.append(Check("flash-attn", "ok", "importable" if flash else "not installed", "" if flash else "teachers and kept attention run sdpa"))
    return checks


def _compiler() -> list[Check]:
    """DeepSpeed compiles an op on first use with a C++ compiler and ninja: on CPU its shared-memory
    allreduce, and with an offloaded optimizer its CPU Adam. On a GPU with the shipped non-offload
    configs it builds nothing, so a missing tool only warns there."""
    import torch

    from .engines.op_builds import build_folder

    compiler = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]
    missing = [tool for tool in (compiler, "ninja") if shutil.which(tool) is None]
    folder = build_folder()
    problem = _writable(folder)
    if missing:
        builds = "every launch builds DeepSpeed's CPU allreduce" if not torch.cuda.is_available() else "an offloaded optimizer builds DeepSpeed's CPU Adam"
        status = "fail" if not torch.cuda.is_available() else "warn"
        return [Check("op builds", status, f"{' and '.join(missing)} not found", f"{builds}: install a C++ compiler and ninja (pip install ninja, on PATH)")]
    if problem:
        return [Check("op builds", "fail", str(folder), f"DeepSpeed's build folder (TORCH_EXTENSIONS_DIR) is {problem}")]
    return [Check("op builds", "ok", f"{shutil.which(compiler)}, {shutil.which('ninja')}", f"built into {folder}")]


def _caches() -> list[Check]:
    from .fileio import NO_LOCKS, cache_root, work_cache_dir

    checks = []
    caches = {"cache (teachers, corpora)": cache_root(), "data cache (default)": Path(work_cache_dir(None, "data"))}
    writable = set()
    for name, folder in caches.items():
        problem = _writable(folder)
        if problem:
            checks.append(Check(name, "fail", str(folder), problem))
            continue
        writable.add(_existing_parent(folder))
        free = shutil.disk_usage(_existing_parent(folder)).free / 1e9
        status = "ok" if free >= _MIN_FREE_GB else "warn"
        checks.append(Check(name, status, str(folder), f"{free:.1f} GB free" + ("" if status == "ok" else f", under {_MIN_FREE_GB:.0f} GB")))
    if _writable(Path.cwd()) is None:
        writable.add(Path.cwd())
    for folder in sorted(writable):
        if not _locks_work(folder, NO_LOCKS):
            checks.append(Check("file locks", "warn", f"not supported in {folder}", "ranks and jobs sharing it run unlocked: prepare data with `cald-scale prepare-data` first"))
    return checks


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _writable(folder: Path) -> str | None:
    """None, or why files cannot be written in ``folder``: probed there, or where a job would
    create it (its nearest existing parent); nothing is left behind."""
    probe = _existing_parent(folder)
    if not probe.is_dir():
        return f"not writable: {probe} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".cald_env_"):
            pass
    except OSError as err:
        return f"not writable: {err.strerror or err} ({probe})"
    return None


def _locks_work(folder: Path, no_locks: frozenset) -> bool:
    import fcntl

    with tempfile.NamedTemporaryFile(dir=folder, prefix=".cald_env_lock_") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in no_locks:
                return False
            raise
    return True


def _offline_assets() -> list[Check]:
    from .conversion.teacher import BUILTIN_TEACHERS
    from .fileio import env_flag

    flags = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") if env_flag(name)]
    checks = [Check("hub access", "ok", f"offline ({', '.join(flags)})" if flags else "allowed", "hub ids download once, into the HF cache" if not flags else "")]
    for name, (package, _, install) in BUILTIN_TEACHERS.items():
        found = importlib.util.find_spec(package) is not None
        checks.append(Check(f"teacher {name}", "ok" if found else "warn", "installed" if found else "not installed", "" if found else install))
    npm = shutil.which("npm")
    checks.append(Check("npm", "ok" if npm else "warn", npm or "not found", "" if npm else "the built-in Brown corpus is fetched with npm once (or copy its tarball into the cache)"))
    return checks


def _slurm() -> list[Check]:
    tools = {tool: shutil.which(tool) for tool in ("sbatch", "srun", "scontrol")}
    if not any(tools.values()):
        return [Check("slurm", "ok", "not installed", "launch/slurm/ needs sbatch and srun")]
    missing = [tool for tool, path in tools.items() if path is None]
    job = os.environ.get("SLURM_JOB_ID")
    value = f"in job {job} ({os.environ.get('SLURM_JOB_NUM_NODES', '?')} node(s))" if job else "available"
    return [Check("slurm", "warn" if missing else "ok", value, f"{', '.join(missing)} not found" if missing else "")]


def _multinode() -> list[Check]:
    """What `deepspeed --hostfile` passes the other nodes' ranks: NCCL_*, PYTHON*, UCX*, MLFLOW* and
    the lines of .deepspeed_env; the settings a job reads that are set here but not listed there
    stay here (launch/slurm/train_deepspeed.sbatch writes them into a file of its own)."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    files = [Path(name)] if os.path.isabs(name) else [Path.home() / name, Path.cwd() / name]
    listed: set[str] = set()
    checks = []
    for path in (f for f in files if f.is_file()):
        lines = path.read_text().splitlines()
        # NOTE: deepspeed splits every line at its first "=": a blank or comment line stops the launch.
        bad = [n for n, line in enumerate(lines, 1) if "=" not in line]
        if bad:
            checks.append(Check("deepspeed env file", "fail", str(path), f"line(s) {bad[:5]} hold no NAME=value: deepspeed's launcher stops on them (no blank or comment lines)"))
        names = {line.split("=", 1)[0].strip() for line in lines if "=" in line}
        if exposed := sorted(n for n in names if _credential(n)):
            checks.append(Check("deepspeed env file", "warn", f"{', '.join(exposed)} in {path}", "deepspeed puts each line on the pdsh command line, which any user of a node can read: keep credentials in files on the shared home"))
        listed |= names
    pdsh = shutil.which("pdsh")
    checks.append(Check("pdsh", "ok", pdsh or "not found", "" if pdsh else "needed only by `deepspeed --hostfile` across nodes; launch/slurm/train_srun.sbatch needs none"))
    unlisted = sorted(var for var in os.environ if var.startswith(_FORWARDED_PREFIXES) and not _credential(var) and var not in listed)
    if unlisted:
        checks.append(Check(
            "multi-node environment", "warn", f"{', '.join(unlisted)} not in {' or '.join(str(f) for f in files)}",
            "a `deepspeed --hostfile` launch's other nodes would not see them (launch/slurm's batch scripts pass them)",
        ))
    return checks


def _credential(name: str) -> bool:
    """A variable never to put in a launch file (deepspeed puts each line on the pdsh command line),
    by launch/slurm/train_deepspeed.sbatch's rule: TOKEN, KEY, SECRET, PASSW or CREDENTIAL anywhere
    in the name, except HF_TOKEN_PATH, TOKENIZERS_* and *_DISABLE_* flags."""
    upper = name.upper()
    if upper == "HF_TOKEN_PATH" or "_DISABLE_" in upper:
        return False
    return any(word in upper.removeprefix("TOKENIZERS_") for word in ("TOKEN", "KEY", "SECRET", "PASSW", "CREDENTIAL"))
