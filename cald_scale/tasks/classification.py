"""The sequence classification task: an encoder teacher with a pooled head, scored by accuracy and macro-F1.

The teacher is a pretrained encoder (BERT, RoBERTa; the built-in all-MiniLM-L6-v2) that
gets a new head sized by the task's labels, or a classifier this trainer fine-tuned before
(a "Std." run's export: the target teacher, and the waypoints). Batches are padded and
length-bucketed; evaluation walks the validation and test splits once, every rank through
the same number of forwards, and sums confusion matrices over ranks.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..conversion.registry import get_adapter
from ..conversion.teacher import classifier_teacher, open_teacher, resolve_teacher_source
from ..data.classification import load_classification_data
from ..data.classification_batches import IGNORE_INDEX, BucketedBatches, eval_batches_by_length, tokenize_splits
from ..engines.zero3 import begin_step
from ..eval import eval_mode
from ..eval.classification import confusion_matrix, metrics_from_confusion
from .student_source import student_init_source

__all__ = ["ClassificationTask", "evaluate_classifier"]

logger = logging.getLogger("cald_scale.tasks")

EVAL_SPLITS = ("validation", "test")


class ClassificationTask:
    """What the trainer asks of a task, for sequence classification (see ``tasks/__init__.py``)."""

    name = "classification"

    def __init__(self, cfg, *, is_main: bool, data_only: bool = False):
        self.cfg = cfg
        if resolve_teacher_source(cfg.teacher)[0] == "gguf":  # before de-quantising it (a minute, for nothing)
            raise ValueError(
                f"teacher {cfg.teacher.name_or_path!r} is a GGUF checkpoint, a causal LM: sequence classification takes an "
                "encoder (BERT, RoBERTa; e.g. teacher.name_or_path=all-minilm-l6-v2) or a classifier fine-tuned by cald_scale"
            )
        base, self.tokenizer = open_teacher(cfg.teacher)
        # Every rank reads the same cached splits (one builds them under a file lock).
        self.data = load_classification_data(cfg.classification)
        def for_task(source):  # the task's head on an encoder: the teacher's, and student.init_from's
            return classifier_teacher(source, self.data.label_names, pooling=cfg.task.pooling, seed=cfg.train.seed)

        self.source = for_task(base)
        get_adapter(self.source.config.teacher_hf_config())  # an unconvertible family fails now, before any weight is read
        _check_positions(cfg.classification.max_length, self.source.config.teacher_hf_config(), self.source.name)
        # The paper converts the pretrained encoder (same seeded head) while the fine-tuned one guides.
        self.student_source = None if data_only else student_init_source(cfg, self.source, self.tokenizer, for_task)
        if is_main:
            counts = {name: len(split) for name, split in self.data.splits.items()}
            logger.info("classification data %s: %d labels, splits %s, counts %s", self.data.name, self.data.num_labels, counts, self.data.stats or "none")
        self.splits = None

    def open_data(self) -> None:
        self.splits = tokenize_splits(self.data, self.tokenizer, self.cfg.classification.max_length)
        vocab_size = self.source.config.teacher_hf_config().vocab_size
        for name, split in self.splits.items():  # the embedding's own IndexError, mid-evaluation, otherwise
            top = int(split.tokens.max()) if len(split.tokens) else -1
            if top >= vocab_size:
                raise ValueError(
                    f"teacher {self.source.name!r}: its tokenizer gives token id {top} in the {name} split, but the encoder embeds "
                    f"{vocab_size} (vocab_size): the folder's tokenizer is not its model's"
                )
        truncated = {name: split.num_at_max_length for name, split in self.splits.items() if split.num_at_max_length}
        if truncated:
            logger.info("examples cut at classification.max_length=%d (or exactly that long): %s", self.cfg.classification.max_length, truncated)
        missing = [name for name in EVAL_SPLITS if name not in self.splits or len(self.splits[name]) == 0]
        if missing:
            raise ValueError(
                f"classification data {self.data.name!r} has no {' and no '.join(missing)} split, and a run scores both: give "
                + " and ".join(f"classification.{name}_fraction > 0 (carved from train) or {name} files" for name in missing)
            )

    def data_summary(self) -> dict:
        """The prepared data (``cald-scale prepare-data``): each split's examples, the labels."""
        return {
            "dataset": self.data.name,
            "labels": self.data.label_names,
            "splits": {name: len(split) for name, split in self.splits.items()},
            "skipped": self.data.stats,
        }

    @staticmethod
    def data_lines(summary: dict) -> list[str]:
        return [f"{name:>10}: {count:>9,} examples, {len(summary['labels'])} labels ({summary['dataset']})" for name, count in summary["splits"].items()]

    def data_identity(self) -> dict:
        """What decides the run's batches and scores: the splits' cache key (their files' content
        and the split settings) and the examples each split holds."""
        return {"data": self.data.key, "examples": {name: len(split) for name, split in self.data.splits.items()}}

    def tokens_per_micro_batch(self, micro_batch: int) -> int:
        return 0  # padded batches: the trainer counts each batch's real tokens

    def train_batches(self, micro_batch: int, replica: int, replicas: int, device: torch.device) -> Callable[[int], dict]:
        """``next_batch(cursor)``: this replica's length-bucketed micro-batch number ``cursor``."""
        train = self.splits["train"]
        grad_accum = self.cfg.train.grad_accum
        sampler = BucketedBatches(train.lengths, micro_batch, replica, replicas, self.cfg.train.seed, grad_accum=grad_accum)

        def next_batch(cursor: int) -> dict:
            batch = train.batch(sampler.indices(cursor // grad_accum, cursor % grad_accum))
            return {name: value.to(device) for name, value in batch.items()}

        return next_batch

    def evaluator(self, models, replica: int, replicas: int) -> Callable[[str], dict]:
        """``evaluate(which)``: accuracy, macro-F1 and CE of the "student" or "teacher" on validation and test."""
        micro = self.cfg.eval.micro_batch_size
        plans = {name: eval_batches_by_length(self.splits[name].lengths, micro, replica, replicas) for name in EVAL_SPLITS}
        device = models.student_engine.device

        def evaluate(which: str) -> dict:
            view = models.teacher if which == "teacher" else models.student
            engines = (models.teacher_engine, models.student_engine)
            return {
                name: evaluate_classifier(view, self.splits[name], plans[name], device, before_batch=lambda: begin_step(*engines))
                for name in EVAL_SPLITS
            }

        return evaluate

    @staticmethod
    def headline(scores: dict) -> str:
        v = scores["validation"]
        return f"validation accuracy {v['accuracy']:.4f}, macro-F1 {v['macro_f1']:.4f}"

    @staticmethod
    def step_metrics(scores: dict) -> dict:
        return {f"eval/{name}/{key}": s[key] for name, s in scores.items() for key in ("accuracy", "macro_f1", "loss")}

    def summary(self, teacher: dict | None, before: dict, after: dict, teacher_after: dict | None) -> dict:
        """The report's task part: both splits side by side, and the test-set headline."""
        sets = {
            name: {
                "teacher": (teacher or {}).get(name),
                "student_before": before[name],
                "student_after": after[name],
                **({"teacher_after": teacher_after[name]} if teacher_after else {}),
            }
            for name in after
        }
        test = sets["test"]
        acc = lambda s: s["accuracy"] if s else None  # noqa: E731
        f1 = lambda s: s["macro_f1"] if s else None  # noqa: E731
        return {
            "labels": self.data.label_names,
            "data_stats": self.data.stats,
            "accuracy_teacher": acc(test["teacher"]),
            "accuracy_student_before": acc(test["student_before"]),
            "accuracy_student_after": acc(test["student_after"]),
            "macro_f1_teacher": f1(test["teacher"]),
            "macro_f1_student_after": f1(test["student_after"]),
            "eval_sets": sets,
            "headline": [
                ("test accuracy: teacher", acc(test["teacher"])),
                ("test accuracy: converted student, before training", acc(test["student_before"])),
                ("test accuracy: student, after training", acc(test["student_after"])),
                ("test macro-F1: teacher / student", (f1(test["teacher"]), f1(test["student_after"]))),
                ("validation accuracy: student, after training", acc(sets["validation"]["student_after"])),
            ],
        }


@torch.no_grad()
def evaluate_classifier(view, split, batches, device: torch.device, *, before_batch: Callable[[], None] | None = None) -> dict:
    """Accuracy, macro-F1 and mean CE of a classifier's layerwise ``view`` on this rank's
    ``batches`` of ``split``, summed over all ranks (dropout off while scoring)."""
    with eval_mode(view.model):
        matrix = torch.zeros(view.vocab_size, view.vocab_size, dtype=torch.long, device=device)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # summed CE, examples, examples with non-finite logits
        for b in batches:
            batch = {k: v.to(device) for k, v in split.batch(b.indices, b.num_valid).items()}
            if before_batch is not None:
                before_batch()
            logits = view.logits(batch).float()
            matrix += confusion_matrix(logits, batch["labels"], view.vocab_size)
            scored = batch["labels"] != IGNORE_INDEX
            totals[0] += F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum").double()
            totals[1] += scored.sum()
            totals[2] += (scored & ~torch.isfinite(logits).all(-1)).sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(matrix)
            dist.all_reduce(totals)
    metrics = {**metrics_from_confusion(matrix.cpu()), "loss": (totals[0] / totals[1].clamp(min=1)).item(), "nonfinite_examples": int(totals[2])}
    if metrics["nonfinite_examples"]:
        # NOTE: argmax over NaN logits still names a class: a diverged model must not read as a score.
        metrics["accuracy"] = metrics["macro_f1"] = float("nan")
    return metrics


def _check_positions(max_length: int, encoder_config, name: str) -> None:
    """Refuse a max_length the encoder has no position embedding for (now, not as a shape error
    in its first forward). RoBERTa-style position ids start after the padding index."""
    positions = getattr(encoder_config, "max_position_embeddings", None)
    if positions is None:
        return
    offset = encoder_config.pad_token_id + 1 if encoder_config.model_type in ("roberta", "xlm-roberta") and encoder_config.pad_token_id is not None else 0
    if max_length > positions - offset:
        raise ValueError(
            f"classification.max_length={max_length} exceeds what teacher {name!r} has positions for "
            f"({positions - offset}: max_position_embeddings {positions}" + (f" less {offset} for its padding offset" if offset else "") + ")"
        )
