"""Train: `deepspeed launch/train.py --ds_config ds_configs/zero3.json [--recipe R.yaml] [key.path=value ...]`.

The same from an installed package, with no checkout: `cald-scale train [...]` (one process),
or `deepspeed --module cald_scale.launch [...]` (ranks). A ds_config that is no file here is
looked up among the shipped ones by name (`--ds_config zero3`; the default `ds_configs/zero3.json`).

With no recipe the embedded default runs: SmolLM2-135M -> its 25% attention hybrid (Mamba2 in 22
of 30 layers) on the Brown corpus, teacher-forced alignment of the mixers first, then end-to-end
CALD (recipes/align_then_e2e.yaml spells it out).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from .cli import Once
from .config import ConfigError, load_run_config
from .config_loader import explained_yaml
from .engines.distributed import close_distributed
from .engines.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptedWhileStarting
from .errors import user_errors

__all__ = ["add_arguments", "build_parser", "finish", "leave", "main", "record_early_signals", "run"]

TRACEBACK_VAR = "CALD_TRACEBACK"

USER_ERRORS = user_errors()


def record_early_signals() -> list[str]:
    """Record SLURM's warning signal and SIGTERM instead of dying of them, until the run's
    PreemptionWatch takes over: the job then stops cleanly with the preempted exit code and is
    requeued, not failed. Call it first thing (launch/train.py does, before torch, DeepSpeed and
    transformers take ~10 s a rank to import); returns the list the names land in."""
    seen: list[str] = []
    for number in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(number, lambda n, frame: seen.append(signal.Signals(n).name))
    return seen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config (ZeRO-3): a file, or a shipped one by name (zero3, pipeline, ...)")
    parser.add_argument("--recipe", default=None, action=Once, help="YAML recipe; the embedded default when omitted")
    parser.add_argument("--print_config", action="store_true", help="check the run config and the ds_config (as any machine runs it: the precision is checked against this machine's when the job starts), print the run config and exit")
    parser.add_argument("--explain", action="store_true", help="with --print_config: each key's documentation as a YAML comment above it")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, early_signals: list[str] | None = None) -> None:
    """Parse, check and run the training job; errors end in one line (``CALD_TRACEBACK=1``: raised)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    _run(parser, args, early_signals if early_signals is not None else [])


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, early_signals: list[str]) -> None:
    from .train import check_ds_config, refuse_foreign_folder, train

    if args.explain and not args.print_config:
        # NOTE: alone it would start the job it meant to explain (the default: minutes to hours).
        parser.exit(2, f"{parser.prog}: error: --explain documents the config --print_config prints: add --print_config (nothing was run)\n")
    try:
        cfg = load_run_config(args.recipe, args.overrides)
    except ConfigError as err:  # one line that names the key, not a traceback
        _one_line(parser, 2, f"config error: {err}")
    if args.print_config:
        import yaml

        # NOTE: the SLURM scripts ask this for the run folder and write their logs there next: a
        # folder that holds something else (a model) is refused before they do.
        try:
            refuse_foreign_folder(Path(cfg.output.run_dir))
            # NOTE: stdout is the config alone (the SLURM scripts parse it): DeepSpeed's logger,
            # made on its first import here, prints its notices ("Setting accelerator to CPU") to stdout.
            with contextlib.redirect_stdout(sys.stderr):
                check_ds_config(cfg, args.ds_config)
        except ConfigError as err:
            _one_line(parser, 2, f"config error: {err}")
        except (ValueError, OSError, *USER_ERRORS) as err:  # a bad file, another DeepSpeed than the tested one
            _one_line(parser, 2, f"error: {err}")
        print(explained_yaml(cfg) if args.explain else yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    _release_early_signals(cfg.train.preemption_signals, early_signals)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")  # the command's, not the library's
    try:
        train(cfg, args.ds_config, early_signals=early_signals)
    except USER_ERRORS as err:  # bad input: one line that names it (the run folder is left intact)
        _one_line(parser, 1, f"error: {err}")
    except (ValueError, OSError, ImportError) as err:  # a bad setting or file, a package to install: one line
        _one_line(parser, 1, f"error: {err}\n({TRACEBACK_VAR}=1 shows where it was raised)")
    except Preempted as stop:  # a complete checkpoint is saved: the batch script requeues on this code
        if isinstance(stop, PreemptedWhileStarting):  # this rank alone stopped: the others may be anywhere
            print(f"preempted: {stop}", file=sys.stderr)
            _leave(PREEMPTED_EXIT_CODE)
        parser.exit(PREEMPTED_EXIT_CODE, f"preempted: {stop}\n")


def run(args: argparse.Namespace) -> int:
    """``cald-scale train``: the job in this process, then the same exit as launch/train.py's.
    Signals are recorded from here, after the package's own import (launch/train.py: from its start)."""
    early = record_early_signals()
    return finish(lambda: _run(build_parser(), args, early))


def finish(job) -> NoReturn:
    """Run ``job`` and leave the process as a training rank must (never returns)."""
    try:
        code = job()
    except SystemExit as stop:
        code = stop.code
    leave(code)


def leave(code: int | str | None = 0) -> NoReturn:
    """End a process that trained, as a training rank must: a script that called ``train()`` on
    CPU ends with this (``code``: the exit status, or a message that exits 1), once it has closed
    what it opened itself. The exit handlers run; the interpreter's finalization does not, so a
    file left open is not flushed and a thread still running is not waited for."""
    if code in (None, 0, PREEMPTED_EXIT_CODE):  # every rank ends here, at the same step
        # Close the group while the interpreter is whole. Not after an error: with ranks still
        # inside a collective it could wait forever.
        # NOTE: this alone does not stop gloo's worker threads (importing DeepSpeed or torch._dynamo
        # after the group was made keeps it alive: measured, cause not found), and one still releasing a
        # finished collective's tensors when finalization starts aborts the rank (SIGABRT,
        # "terminate called without an active exception"; pytorch/pytorch PR 179291). _leave
        # skips finalization for that too.
        close_distributed()
    _leave(code)


def _one_line(parser: argparse.ArgumentParser, code: int, message: str) -> None:
    """Exit with the error in one line; with CALD_TRACEBACK=1, raise it with its traceback instead
    (called inside the ``except`` that caught it)."""
    if os.environ.get(TRACEBACK_VAR) == "1":
        raise
    parser.exit(code, message + "\n")


def _release_early_signals(watched, early_signals: list[str]) -> None:
    """A recorded signal the run does not treat as preemption (train.preemption_signals) gets
    its default action back, and is delivered again if it came."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        if number.name not in watched:
            signal.signal(number, signal.SIG_DFL)
            if number.name in early_signals:
                os.kill(os.getpid(), number)


def _leave(code) -> NoReturn:
    """Exit with ``code`` without the interpreter's finalization.

    It walks every object torch, transformers and DeepSpeed made (~3 s per rank, measured), and
    its module teardown makes Triton's nanobind bindings print "leaked instance" lines, and a gloo
    thread still freeing a collective's tensors then can abort the rank (see ``leave``). A training
    run has closed its checkpoints, metrics and wandb by now; the exit handlers still run, then
    the buffers are flushed.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"), as Python exits on anything but an int
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # `deepspeed --module cald_scale.launch`, `python -m cald_scale.launch`
    _early = record_early_signals()
    finish(lambda: main(early_signals=_early))
