"""Triton autotuning choices kept on disk, so that one process reuses what another measured.

Triton benchmarks every config of an autotuned kernel the first time a process meets a tuning
key (the kernel's size arguments and the dtypes of its tensors). Its own disk cache
(``TRITON_CACHE_AUTOTUNING=1``) skips kernels whose configs carry a ``pre_hook``, and most of
mamba_ssm's backward SSD kernels do (the hook zeroes an output before each trial). So every rank
of a job and every benchmark process tunes them again: 20-90 s a process on an H200
(benchmarks/results/gpu_h200_2026-12-04_second/README.md).

Here a choice is kept as the index of the winning config in the kernel's own list, by kernel
and tuning key, under a stamp of the device, triton and mamba_ssm versions; a file written
under another stamp is left alone. Loading puts the chosen config into the autotuner's
in-memory cache, exactly where Triton's benchmark would have put it, so Triton skips the
benchmark (the config's pre_hook still runs before each launch, as after a benchmark).

Opt-in: ``CALD_TRITON_AUTOTUNE_CACHE=<file.json>``. ``benchmarks/gpu_check.sh`` sets it and
starts from the choices a previous GPU run committed in ``benchmarks/results/triton_autotune/``.
``CALD_TRITON_UNTUNED=1`` instead runs every kernel's smallest config without tuning at all
(``pin_smallest_configs``): gpu_check's numerical parity steps, where speed does not matter.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import os
import sys
import warnings
from pathlib import Path

from ...fileio import update_json

__all__ = ["ENV_VAR", "UNTUNED_VAR", "AutotuneChoices", "autotune_choices", "find_autotuners", "pin_smallest_configs", "smallest_config", "sync"]

ENV_VAR = "CALD_TRITON_AUTOTUNE_CACHE"
UNTUNED_VAR = "CALD_TRITON_UNTUNED"
MODULE_PREFIX = "mamba_ssm.ops.triton."
FORMAT = 1


def _autotuner_class():
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return None
    return Autotuner


def find_autotuners(module_prefix: str) -> dict[str, object]:
    """{"module.kernel": Autotuner} in the imported modules under ``module_prefix`` (a heuristics wrapper is looked through)."""
    autotuner = _autotuner_class()
    if autotuner is None:
        return {}
    found = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(module_prefix) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            while value is not None and not isinstance(value, autotuner) and hasattr(value, "fn"):
                value = value.fn
            if isinstance(value, autotuner):
                found[f"{module_name}.{attr}"] = value
    return found


def smallest_config(configs: list) -> object:
    """The config with the smallest tiles (the product of its integer meta-parameters), then the
    fewest pipeline stages and warps: the one least likely to exceed a device's shared memory or
    registers in any dtype."""
    def size(config) -> tuple:
        tiles = math.prod(v for v in config.kwargs.values() if isinstance(v, int) and not isinstance(v, bool))
        return tiles, config.num_stages, config.num_warps

    return min(configs, key=size)


def pin_smallest_configs(module_prefix: str) -> int:
    """Leave each autotuner under ``module_prefix`` only its smallest config, so that it never
    benchmarks (Triton runs a lone config directly, its pre_hook included); returns how many
    autotuners were pinned now. For numerical checks, where any config is as right as another
    and tuning is most of the time: a float32 parity step on an H200 spent its whole 54-81 s
    cap compiling and timing the SSD scan's configs."""
    pinned = 0
    for tuner in find_autotuners(module_prefix).values():
        if len(tuner.configs) > 1:
            tuner.configs = [smallest_config(tuner.configs)]
            pinned += 1
    return pinned


def _stamp() -> str:
    """Which tunings a file's choices are valid for: the device and the kernels' versions."""
    import importlib.metadata as md

    import torch

    versions = []
    for package in ("triton", "mamba_ssm"):
        try:
            versions.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            versions.append(f"{package} none")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return " | ".join([device, *versions])


class AutotuneChoices:
    """The choices of every Triton autotuner in the modules under ``module_prefix``, kept in ``path``."""

    def __init__(self, path: str | os.PathLike, module_prefix: str = MODULE_PREFIX, stamp: str | None = None):
        self.path = Path(path)
        self.module_prefix = module_prefix
        self.stamp = stamp if stamp is not None else _stamp()
        self._loaded_modules: set[str] = set()
        self._saved_count = 0
        self._tuners: dict[str, object] = {}
        self._modules_seen = -1  # len(sys.modules) when the autotuners were last looked up
        self.saving = False  # inside save(): a SIGTERM then waits for it (``_save_on_sigterm``)
        self.pending_signal: int | None = None

    def autotuners(self) -> dict[str, object]:
        """{"module.kernel": Autotuner} for the modules imported so far."""
        # NOTE: looked up again only when a module was imported since: sync() runs before every
        # scan launch, and walking sys.modules there would cost more than the launch.
        if len(sys.modules) != self._modules_seen:
            self._modules_seen = len(sys.modules)
            self._tuners = find_autotuners(self.module_prefix)
        return self._tuners

    def _read(self) -> dict[str, dict[str, list]]:
        """This stamp's choices in the file: {kernel: {repr(key): [index, str(config)]}}; {} if none or unreadable."""
        try:
            data = json.loads(self.path.read_text())
            return data["stamps"].get(self.stamp, {}) if data.get("format") == FORMAT else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, AttributeError) as err:
            warnings.warn(f"{ENV_VAR}: ignoring unreadable autotuning choices in {self.path} ({type(err).__name__}: {err})")
            return {}

    def load(self) -> int:
        """Put the file's choices into the autotuners of modules not loaded before; returns how many."""
        tuners = {name: t for name, t in self.autotuners().items() if name.rsplit(".", 1)[0] not in self._loaded_modules}
        if not tuners:
            return 0
        self._loaded_modules.update(name.rsplit(".", 1)[0] for name in tuners)
        loaded = 0
        for name, entries in self._read().items():
            tuner = tuners.get(name)
            if tuner is None:
                continue
            for key_repr, (index, config_text) in entries.items():
                key = ast.literal_eval(key_repr)
                # NOTE: the config text guards against a kernel whose config list changed under
                # the same versions (an edited install): a stale index is skipped, not trusted.
                if key in tuner.cache or not 0 <= index < len(tuner.configs) or str(tuner.configs[index]) != config_text:
                    continue
                tuner.cache[key] = tuner.configs[index]
                loaded += 1
        # NOTE: what came from the file is saved already; what this process tuned before stays unsaved.
        self._saved_count += loaded
        return loaded

    def _count(self) -> int:
        return sum(len(tuner.cache) for tuner in self.autotuners().values())

    def save(self) -> None:
        """Merge the autotuners' choices into the file (atomically; other stamps kept).

        The read, merge and write hold a lock (``<file>.lock``): parallel processes (ranks,
        benchmark items) each merging into what they read would otherwise drop each other's
        choices. Where the file system has no flock, the merge goes on unlocked: a lost choice
        costs a retune, not the run."""
        self.saving = True
        try:
            self._merge_into_file()
        finally:
            self.saving = False
            if self.pending_signal is not None:  # a SIGTERM came during the save: now it ends the process
                _die_of(self.pending_signal)
        self._saved_count = self._count()

    def _merge_into_file(self) -> None:
        def merged(data):
            if not (isinstance(data, dict) and data.get("format") == FORMAT):
                data = {"format": FORMAT, "stamps": {}}
            mine = data["stamps"].setdefault(self.stamp, {})
            for name, tuner in self.autotuners().items():
                for key, config in tuner.cache.items():
                    try:
                        index = tuner.configs.index(config)
                    except ValueError:  # a config made by a prune function: not one of the list's
                        continue
                    mine.setdefault(name, {})[repr(key)] = [index, str(config)]
            return data

        update_json(self.path, merged, sort_keys=True)

    def sync(self) -> None:
        """Load choices for newly imported kernel modules; save when a kernel was tuned since the last save."""
        if len(sys.modules) != self._modules_seen:  # only an import can bring new kernels to load
            self.load()
        if self._count() > self._saved_count:
            try:
                self.save()
            except OSError as err:  # a read-only or full disk costs a retune later, not the run
                warnings.warn(f"{ENV_VAR}: could not save autotuning choices to {self.path}: {err}")
                self._saved_count = self._count()


_CHOICES: dict[str, AutotuneChoices] = {}


def autotune_choices() -> AutotuneChoices | None:
    """The process's AutotuneChoices for the file ``CALD_TRITON_AUTOTUNE_CACHE`` names; None when unset."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    if path not in _CHOICES:
        choices = _CHOICES[path] = AutotuneChoices(path, module_prefix=MODULE_PREFIX)
        atexit.register(choices.sync)  # what the last backward pass tuned
        _save_on_sigterm(choices)
    return _CHOICES[path]


def _save_on_sigterm(choices: AutotuneChoices) -> None:
    """Save before dying of SIGTERM too, which skips atexit.

    A benchmark step killed by its time cap (``timeout`` sends SIGTERM) lost every choice it had
    tuned since its last sync: on the third GPU run, two float32 parity steps each spent their cap
    tuning the SSD scan and left nothing for the next. The handler saves, then dies of the same
    signal. Only where nobody handles SIGTERM yet (the trainer's preemption handler owns it in a
    run) and on the main thread (the only one that may set handlers).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def save_then_die(signum, frame):
        # NOTE: a signal inside save() (its file lock held by this process) must not save again:
        # a second flock on the same file would wait for this very process, forever. That save
        # finishes, then dies of the signal.
        if choices.saving:
            choices.pending_signal = signum
            return
        try:
            choices.sync()
        finally:
            _die_of(signum)

    signal.signal(signal.SIGTERM, save_then_die)


def _die_of(signum: int) -> None:
    """End this process by ``signum`` as if no handler had caught it (its exit status says so)."""
    import signal

    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_untuned_modules_seen = -1


def sync() -> None:
    """Called before each kernel launch that may tune: cheap when nothing changed (a count of
    cache entries). With ``CALD_TRITON_UNTUNED=1`` every autotuner runs its smallest config
    untimed instead (``pin_smallest_configs``), and no choice is loaded or saved."""
    global _untuned_modules_seen
    if os.environ.get(UNTUNED_VAR) == "1":
        if len(sys.modules) != _untuned_modules_seen:  # only an import can bring new autotuners
            _untuned_modules_seen = len(sys.modules)
            pin_smallest_configs(MODULE_PREFIX)
        return
    choices = autotune_choices()
    if choices is not None:
        choices.sync()
