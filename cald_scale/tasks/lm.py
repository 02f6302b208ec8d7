"""The causal LM task: next-token prediction on a corpus, scored by held-out perplexity."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..conversion.discovery import is_encoder
from ..conversion.registry import get_adapter
from ..conversion.teacher import open_teacher
from ..data import ShardedBatches
from ..data.run_sets import open_run_datasets
from ..eval.perplexity import eval_indices
from ..generation.context import check_context
from .student_source import student_init_source

__all__ = ["LanguageModelingTask"]


def refuse_encoder(source) -> None:
    """An encoder (BERT-like, or a classifier cald_scale fine-tuned) is no causal LM: say which task
    takes it, rather than build it as a "causal" teacher or fail inside transformers."""
    config = source.config
    classifier = config.model_type == "cald_classifier"
    if classifier or is_encoder(config):
        raise ValueError(
            f"teacher {source.name!r} is {'a sequence classifier' if classifier else f'a {config.model_type} encoder'}, not a causal LM: "
            "set task.kind=classification to convert it for a classification task"
        )


class LanguageModelingTask:
    """What the trainer asks of a task, for causal LMs (see ``tasks/__init__.py``)."""

    name = "causal_lm"

    def __init__(self, cfg, *, is_main: bool, data_only: bool = False):
        self.cfg = cfg
        self.source, self.tokenizer = open_teacher(cfg.teacher)
        refuse_encoder(self.source)
        adapter = get_adapter(self.source.config)  # an unconvertible family fails now, before any weight is read
        # Positions past the teacher's trained range give no teacher behaviour to learn, nor one a kept
        # attention layer or a kept position table (GPT-2) knows: refused where a phase is guided or
        # either stays; an unguided student of mixers alone has no such limit (a longer context is what it is for).
        conversion = cfg.student.conversion
        kept = not conversion.converts or conversion.attention_every or conversion.attention_layers or adapter.position_table_fixed
        if any(phase.guidance != "none" for phase in cfg.phases) or kept:
            check_context(self.source.config, cfg.data.seq_len, "the teacher", remedy="lower data.seq_len")
        self.student_source = None if data_only else student_init_source(cfg, self.source, self.tokenizer)
        self._is_main = is_main
        self.train_set = self.eval_sets = None

    def open_data(self) -> None:
        """Rank 0 tokenises (or `cald-scale prepare-data` did); the others wait outside any collective."""
        cfg = self.cfg
        datasets = open_run_datasets(
            cfg.data, self.tokenizer, other_corpora=cfg.eval.other_corpora, max_eval_sequences=cfg.eval.max_sequences,
            vocab_size=self.source.config.vocab_size, model_name=str(self.source), is_rank0=self._is_main,
        )
        self.train_set, self.eval_sets = datasets.train, datasets.evals
        self._cache = datasets.corpus.meta_path

    def data_summary(self) -> dict:
        """The prepared data (``cald-scale prepare-data``): each set's tokens and sequences."""
        sets = {"train": self.train_set, **self.eval_sets}
        return {
            "corpus": self.cfg.data.corpus,
            "cache": self._cache,
            "sets": {name: {"corpus": ds.name, "tokens": ds.num_tokens, "sequences": len(ds)} for name, ds in sets.items()},
            "seq_len": self.cfg.data.seq_len,
        }

    @staticmethod
    def data_lines(summary: dict) -> list[str]:
        return [
            f"{name:>10}: {entry['tokens']:>12,} tokens = {entry['sequences']:>9,} sequences of {summary['seq_len']} ({entry['corpus']})"
            for name, entry in summary["sets"].items()
        ]

    def data_identity(self) -> dict:
        """What decides the run's batches and its own held-out score (``PackedSequences.identity``)."""
        return {"train": self.train_set.identity, "heldout": self.eval_sets["heldout"].identity}

    def tokens_per_micro_batch(self, micro_batch: int) -> int:
        return micro_batch * self.cfg.data.seq_len

    def train_batches(self, micro_batch: int, replica: int, replicas: int, device: torch.device) -> Callable[[int], dict]:
        """``next_batch(cursor)``: this replica's micro-batch number ``cursor`` (a pure function of it)."""
        grad_accum = self.cfg.train.grad_accum
        batches = ShardedBatches(len(self.train_set), micro_batch, replica, replicas, self.cfg.train.seed, grad_accum=grad_accum)

        def next_batch(cursor: int) -> dict:
            rows = batches.indices(cursor // grad_accum, cursor % grad_accum)
            return {"input_ids": torch.stack([self.train_set[i]["input_ids"] for i in rows]).to(device)}

        return next_batch

    def evaluator(self, models, replica: int, replicas: int) -> Callable[[str], dict]:
        """``evaluate(which)``: held-out perplexity of the "student" or "teacher" on every eval set."""
        indices = {name: eval_indices(len(ds), self.cfg.eval.max_sequences, replica, replicas) for name, ds in self.eval_sets.items()}
        return lambda which: models.perplexity(which, self.eval_sets, indices, self.cfg.eval.micro_batch_size)

    @staticmethod
    def headline(scores: dict) -> str:
        return f"held-out ppl {scores['heldout']['ppl']:.2f}"

    @staticmethod
    def step_metrics(scores: dict) -> dict:
        return {f"eval/{name}/ppl": s["ppl"] for name, s in scores.items()}

    @staticmethod
    def summary(teacher: dict | None, before: dict, after: dict, teacher_after: dict | None) -> dict:
        """The report's task part: every eval set side by side, and the held-out headline."""
        teacher = teacher or {}
        sets = {
            name: {
                "teacher": teacher.get(name, {}).get("ppl"),
                # NOTE: an eval set added on resume has no score from before training (n/a).
                "student_before": before.get(name, {}).get("ppl"),
                "student_after": after[name]["ppl"],
                "tokens": after[name]["tokens"],
                **({"teacher_after": teacher_after[name]["ppl"]} if teacher_after else {}),
            }
            for name in after
        }
        own = sets["heldout"]
        # A non-finite score after training (a diverged or overflowing student) has no ratio: n/a, not "inf x better".
        gain = own["student_before"] / own["student_after"] if own["student_before"] and math.isfinite(own["student_after"]) else None
        return {
            "ppl_teacher": own["teacher"],
            "ppl_student_before": own["student_before"],
            "ppl_student_after": own["student_after"],
            "ppl_improvement_x": gain,
            "ppl_vs_teacher_x": own["student_after"] / own["teacher"] if own["teacher"] else None,
            "eval_sets": sets,
            "eval_tokens": own["tokens"],
            "headline": [
                ("held-out ppl: teacher", own["teacher"]),
                ("held-out ppl: converted student, before training", own["student_before"]),
                ("held-out ppl: student, after training", own["student_after"]),
                ("improvement (before / after)", f"{gain:.1f}x" if gain is not None else None),
                *((f"{name} ppl: teacher / student", (s["teacher"], s["student_after"])) for name, s in sets.items() if name != "heldout"),
            ],
        }
