"""Tokenise a run's corpora ahead of the job, resumably.

    cald-scale prepare-data [--recipe R.yaml] [key.path=value ...]

Takes the same recipe and overrides as `launch/train.py`, so it builds exactly the caches
the job reads: data.corpus (train and held-out splits), data.eval_corpus and every
eval.other_corpora set, tokenised with the teacher's tokenizer (a built-in GGUF teacher is
converted once on the way); for the classification task, the fixed splits of
`classification`. Work is saved part by part: killed, the same command resumes
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
    from .conversion.teacher import open_teacher
    from .data.run_sets import open_run_datasets

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cald_scale").setLevel(logging.INFO)
    try:
        cfg = load_run_config(args.recipe, args.overrides)
    except ConfigError as err:
        raise ValueError(f"config error: {err}") from None
    started = time.time()
    if cfg.task.kind == "classification":
        return _prepare_classification(cfg, args, started)
    source, tokenizer = open_teacher(cfg.teacher)
    sets = open_run_datasets(
        cfg.data, tokenizer, other_corpora=cfg.eval.other_corpora, max_eval_sequences=cfg.eval.max_sequences,
        vocab_size=source.config.vocab_size, model_name=str(source), is_rank0=True,
    )
    sets_by_name = {"train": sets.train, **sets.evals}
    summary = {
        "corpus": cfg.data.corpus,
        "cache": sets.corpus.meta_path,
        "sets": {name: {"corpus": ds.name, "tokens": ds.num_tokens, "sequences": len(ds)} for name, ds in sets_by_name.items()},
        "seq_len": cfg.data.seq_len,
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, entry in summary["sets"].items():
            print(f"{name:>10}: {entry['tokens']:>12,} tokens = {entry['sequences']:>9,} sequences of {cfg.data.seq_len} ({entry['corpus']})")
        print(f"ready in {summary['seconds']} s; the job reads these caches as they are")
    return 0


def _prepare_classification(cfg, args: argparse.Namespace, started: float) -> int:
    """The classification task's split cache (``classification.cache_dir``), built once."""
    from .tasks.classification import ClassificationTask

    task = ClassificationTask(cfg, is_main=True)
    task.open_data()
    summary = {
        "dataset": task.data.name,
        "labels": task.data.label_names,
        "splits": {name: len(split) for name, split in task.splits.items()},
        "skipped": task.data.stats,
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, count in summary["splits"].items():
            print(f"{name:>10}: {count:>9,} examples, {len(summary['labels'])} labels ({summary['dataset']})")
        print(f"ready in {summary['seconds']} s; the job reads this split cache as it is")
    return 0


if __name__ == "__main__":  # `python -m cald_scale.prepare_data ...`: the same as `cald-scale prepare-data ...`
    import sys

    from cald_scale.cli import main

    sys.exit(main(["prepare-data", *sys.argv[1:]]))
