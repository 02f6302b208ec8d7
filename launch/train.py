"""Entry point: `deepspeed launch/train.py --ds_config ds_configs/zero3.json [--recipe R.yaml] [key.path=value ...]`.

With no recipe the embedded default runs: SmolLM2-135M -> its 25% attention hybrid (Mamba2 in 22
of 30 layers) on the Brown corpus, teacher-forced alignment of the mixers first, then end-to-end
CALD (recipes/align_then_e2e.yaml spells it out).
"""

from __future__ import annotations

import signal

# NOTE: first, before the imports below (torch, DeepSpeed, transformers: ~10 s a rank, longer on a
# shared file system). Until the run's PreemptionWatch takes over, SLURM's warning signal or a
# SIGTERM is recorded here instead of ending the rank by its default action: the job then stops
# cleanly with the preempted exit code and is requeued, not failed.
_EARLY_SIGNALS: list[str] = []


def _record_early(number: int, frame) -> None:
    _EARLY_SIGNALS.append(signal.Signals(number).name)


for _number in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_number, _record_early)

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from cald_scale.cli import Once  # noqa: E402
from cald_scale.config import ConfigError, load_run_config  # noqa: E402
from cald_scale.config_loader import explained_yaml  # noqa: E402
from cald_scale.engines.distributed import close_distributed  # noqa: E402
from cald_scale.engines.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptedWhileStarting  # noqa: E402
from cald_scale.errors import user_errors  # noqa: E402
from cald_scale.train import check_ds_config, refuse_foreign_folder, train  # noqa: E402

TRACEBACK_VAR = "CALD_TRACEBACK"

USER_ERRORS = user_errors()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config (ZeRO-3)")
    parser.add_argument("--recipe", default=None, action=Once, help="YAML recipe; the embedded default when omitted")
    parser.add_argument("--print_config", action="store_true", help="check the run config and the ds_config, print the run config and exit")
    parser.add_argument("--explain", action="store_true", help="with --print_config: each key's documentation as a YAML comment above it")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
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
    _release_early_signals(cfg.train.preemption_signals)
    try:
        train(cfg, args.ds_config, early_signals=_EARLY_SIGNALS)
    except USER_ERRORS as err:  # bad input: one line that names it (the run folder is left intact)
        _one_line(parser, 1, f"error: {err}")
    except (ValueError, OSError, ImportError) as err:  # a bad setting or file, a package to install: one line
        _one_line(parser, 1, f"error: {err}\n({TRACEBACK_VAR}=1 shows where it was raised)")
    except Preempted as stop:  # a complete checkpoint is saved: the batch script requeues on this code
        if isinstance(stop, PreemptedWhileStarting):  # this rank alone stopped: the others may be anywhere
            print(f"preempted: {stop}", file=sys.stderr)
            _leave(PREEMPTED_EXIT_CODE)
        parser.exit(PREEMPTED_EXIT_CODE, f"preempted: {stop}\n")


def _one_line(parser: argparse.ArgumentParser, code: int, message: str) -> None:
    """Exit with the error in one line; with CALD_TRACEBACK=1, raise it with its traceback instead
    (called inside the ``except`` that caught it)."""
    if os.environ.get(TRACEBACK_VAR) == "1":
        raise
    parser.exit(code, message + "\n")


def _release_early_signals(watched) -> None:
    """A recorded signal the run does not treat as preemption (train.preemption_signals) gets
    its default action back, and is delivered again if it came."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        if number.name not in watched:
            signal.signal(number, signal.SIG_DFL)
            if number.name in _EARLY_SIGNALS:
                os.kill(os.getpid(), number)


def _leave(code) -> None:
    """Exit with ``code`` without the interpreter's finalization.

    It walks every object torch, transformers and DeepSpeed made (~3 s per rank, measured), and
    its module teardown makes Triton's nanobind bindings print "leaked instance" lines. By now
    checkpoints, metrics and wandb are closed; the exit handlers still run, then the buffers are
    flushed.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    if isinstance(code, str):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    if code in (None, 0, PREEMPTED_EXIT_CODE):  # every rank ends here, at the same step
        # Stop the process group's threads while the interpreter is whole. Left to its shutdown,
        # gloo's can abort a rank after a finished run (SIGABRT, "terminate called without an
        # active exception"; seen once on a 2-rank pipeline run; pytorch/pytorch PR 179291).
        # Not after an error: with ranks still inside a collective it could wait forever.
        close_distributed()
    _leave(code)
