"""Tasks: what the teacher and student are trained to do, and how a run is scored.

The trainer (``train.py``) is the same for every task; a task brings the rest:

- ``source`` and ``tokenizer``: where the teacher comes from (for classification, the
  pretrained encoder gets a task head sized by the task's labels);
- ``student_source``: where the student is converted from when that is not the teacher
  (``student.init_from``; else None);
- ``open_data()``: its datasets (rank 0 builds caches, the others wait outside collectives);
- ``data_identity()``: what decides its batches and held-out scores (a resumed run refuses other data);
- ``train_batches(micro_batch, replica, replicas, device)``: ``next_batch(cursor)``, a pure
  function of the micro-batch counter, so a resumed run sees the batches it would have seen;
  a batch is a dict of tensors (``input_ids``, and for padded tasks ``attention_mask``, ``labels``);
- ``evaluator(models, replica, replicas)``: ``evaluate("student" | "teacher")`` -> scores per set;
- ``headline`` / ``step_metrics`` / ``summary``: the log line, the metrics row and the report part;
- ``data_summary()``: what ``cald-scale prepare-data`` prints of the data it prepared (after ``open_data``).

How the model runs block by block and what its head computes (LM cross-entropy, class
cross-entropy, and the KL to the teacher) belongs to the model's layerwise view
(``distill/stages.py``, ``distill/encoder_stages.py``), so the distillation step needs no task.
What the config must know of a task kind before it is opened is its ``TaskSpec`` (``spec.py``).
"""

from __future__ import annotations

from .spec import TASKS, TaskSpec, task_spec

__all__ = ["TASKS", "TaskSpec", "open_task", "task_spec"]


def open_task(cfg, *, is_main: bool, data_only: bool = False):
    """The task of run config ``cfg`` (``cfg.task.kind``), with its teacher source resolved
    (``data_only``: for ``cald-scale prepare-data``, without ``student.init_from``)."""
    return task_spec(cfg.task.kind).open(cfg, is_main=is_main, data_only=data_only)
