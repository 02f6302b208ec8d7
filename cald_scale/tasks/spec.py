"""What the config, the trainer and the commands know of each task kind before a task is opened.

A task kind is one ``TaskSpec`` in ``TASKS``: the facts about it that settle a config
(which section holds its data, whether its batches are padded, whether pipeline mode runs
it, what layout its students keep by default) and the class that runs it (imported only
when a run opens it). A new task (speech recognition, say) is one entry here, one value of
``TaskConfig.kind`` and a class in ``tasks/`` with the methods ``tasks/__init__.py`` lists.
"""

from __future__ import annotations

import dataclasses
import importlib

__all__ = ["TaskSpec", "TASKS", "DATA_SECTIONS", "task_spec"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str
    """``task.kind`` in a config."""
    task_class: str
    """"module:Class" of the task (``open_task``), imported when a run opens it."""
    data_section: str
    """The config section that holds its data: "data" (a text corpus) or "classification"
    (labelled splits). The other data sections are unread, and refused when set."""
    seq_len_key: str
    """The key of ``data_section`` that bounds a sequence's tokens (tokens per step)."""
    padded: bool
    """Batches are padded to their longest example, so a step's tokens vary: phases are given
    in steps or fractions, never in tokens."""
    pipeline: bool
    """Pipeline mode (``train.pipeline_stages``) runs it."""
    perplexity: bool
    """Scored by held-out perplexity, so ``eval.max_sequences`` and ``eval.other_corpora`` apply."""
    pooled_head: bool
    """Its head pools the sequence, so ``task.pooling`` applies."""
    attention_every: int
    """``student.conversion.attention_every`` when a config leaves it null: 4 keeps a quarter
    of a causal LM's attention (benchmarks/results/recovery.md, layouts); 0 converts every layer."""

    @property
    def unread_sections(self) -> tuple[str, ...]:
        """The other kinds' data sections, which a run of this kind never reads."""
        return tuple(section for section in DATA_SECTIONS if section != self.data_section)

    def seq_len(self, cfg) -> int:
        """The longest sequence of run config ``cfg``, in tokens."""
        return getattr(getattr(cfg, self.data_section), self.seq_len_key)

    def open(self, cfg, *, is_main: bool, data_only: bool = False):
        """The task of run config ``cfg``, its teacher source resolved (``data_only``: to prepare
        its data, so ``student.init_from`` is not opened; it may not exist yet)."""
        module, name = self.task_class.split(":")
        return getattr(importlib.import_module(module), name)(cfg, is_main=is_main, data_only=data_only)


TASKS: dict[str, TaskSpec] = {
    spec.kind: spec
    for spec in (
        TaskSpec(
            kind="causal_lm", task_class="cald_scale.tasks.lm:LanguageModelingTask", data_section="data", seq_len_key="seq_len",
            padded=False, pipeline=True, perplexity=True, pooled_head=False, attention_every=4,
        ),
        TaskSpec(
            kind="classification", task_class="cald_scale.tasks.classification:ClassificationTask", data_section="classification",
            seq_len_key="max_length", padded=True, pipeline=False, perplexity=False, pooled_head=True, attention_every=0,
        ),
    )
}

DATA_SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(spec.data_section for spec in TASKS.values()))
"""Every task's data section (each has a ``cache_dir``)."""


def task_spec(kind: str) -> TaskSpec:
    try:
        return TASKS[kind]
    except KeyError:
        raise ValueError(f"task.kind={kind!r} is no task: one of {', '.join(TASKS)}") from None
