"""The ``cald-scale`` command: one subcommand per module (``cald-scale evaluate ...``).

A subcommand module has a docstring (its help), ``add_arguments(parser)`` and
``run(args) -> int``; add one by naming it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "Once", "device_arg", "main", "parse_args", "non_negative_int", "positive_float", "positive_int", "probability"]

COMMANDS: dict[str, str] = {
    "train": "cald_scale.launch",
    "evaluate": "cald_scale.evaluate",
    "generate": "cald_scale.generate",
    "export": "cald_scale.export.command",
    "prepare-data": "cald_scale.prepare_data",
    "env": "cald_scale.env_report",
}
"""Subcommand -> the module implementing it."""


# Argument types the subcommands share: a bad value is argparse's one-line usage error.
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class Once(argparse.Action):
    """An option that may be given once: a second ``--recipe`` is a usage error, not a silent
    replacement of the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}); give one")
        setattr(namespace, self.dest, values)


def device_arg(text: str):
    """An argparse type: a torch device this machine has ("cpu", "cuda", "cuda:1"); anything
    else is a usage error naming what there is, not a traceback from the first tensor moved."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu or cuda[:N]") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda[:N]")
    return device


def check_output_file(path, flag: str = "--json") -> None:
    """Refuse an output file option that names a folder, before the work it would record."""
    from pathlib import Path

    if path and Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder: name the file to write")


def _summary(doc: str) -> str:
    """A docstring's first paragraph on one line (the subcommand list's help)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: the command line) parsed into the subcommand's arguments (``args.run``
    runs it); a usage error exits with argparse's one line and status 2."""
    parser = argparse.ArgumentParser(prog="cald-scale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = module.__doc__ or ""
        sub = commands.add_parser(
            name, help=_summary(doc), description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    # NOTE: overrides may come after options too (launch/train.py parses them intermixed);
    # argparse takes a positional list once, so the rest of them are picked up here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns the exit
    status. A user error (missing path, unknown corpus, bad setting) is one line on stderr
    and status 2, with no traceback."""
    args = parse_args(argv)
    from .errors import user_errors

    try:
        return args.run(args)
    except (OSError, ValueError, ImportError, *user_errors()) as err:  # bad input or a package to install, named in one line
        print(f"cald-scale {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
