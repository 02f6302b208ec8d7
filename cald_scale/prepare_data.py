"""Tokenise a run's corpora ahead of the job, resumably.

    cald-scale prepare-data [--recipe R.yaml] [key.path=value ...]

Takes the same recipe and overrides as `launch/train.py`, so it builds exactly the caches
the job reads: data.corpus (train and held-out splits), data.eval_corpus and every
eval.other_corpora set, tokenised with the teacher's tokenizer (a built-in GGUF teacher is
converted once on the way); for the classification task, the fixed splits of
`classification`. The teacher is checked as the job checks it (its family convertible, the
context within its positions), so a run it would refuse stops here; student.init_from is not
opened. Work is saved part by part: killed, the same command resumes
from the last finished part. Run it once (one process, e.g. a CPU job on the cluster)
before a multi-node run; the job then finds the caches complete and starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from .cli import Once

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, action=Once, help="YAML recipe (the embedded default when omitted)")
    parser.add_argument("--json", action="store_true", help="print the caches as JSON")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, as for launch/train.py")


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_run_config
    from .tasks import open_task

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cald_scale").setLevel(logging.INFO)
    try:
        cfg = load_run_config(args.recipe, args.overrides)
    except ConfigError as err:
        raise ValueError(f"config error: {err}") from None
    started = time.time()
    # The task as the job opens it (its teacher and tokenizer resolved and checked: a teacher the
    # job would refuse is refused now), then its data. student.init_from may not exist yet.
    task = open_task(cfg, is_main=True, data_only=True)
    task.open_data()
    summary = {**task.data_summary(), "seconds": round(time.time() - started, 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(task.data_lines(summary)))
        print(f"ready in {summary['seconds']} s; the job reads these caches as they are")
    return 0


if __name__ == "__main__":  # `python -m cald_scale.prepare_data ...`: the same as `cald-scale prepare-data ...`
    import sys

    from cald_scale.cli import main

    sys.exit(main(["prepare-data", *sys.argv[1:]]))
