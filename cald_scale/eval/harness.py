"""The lm-eval-harness bridge: lm-eval tasks run on an already-loaded causal LM.

  selection = select_tasks(["hellaswag", "my_tasks/quiz.yaml"])   # names, task YAML files, task folders
  results = run_tasks(model, tokenizer, selection, limit=100)      # lm-eval's results dict
  rows = metric_rows({"teacher": teacher_results, "student": student_results})

A task is an lm-eval task, group or tag name, a task YAML file (its folder is searched
for the files it includes) or a folder of task YAMLs (every task in it). Task data is read
through `datasets` as lm-eval does; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured by
`datasets` and huggingface_hub themselves, so an offline run never reaches the network and
a task whose data is not cached fails with one line. Single process, plain PyTorch.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LM_EVAL_REQUIREMENT", "TaskSelection", "context_length", "format_table", "metric_rows", "run_tasks", "select_tasks",
]

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13"
"""What `pip install` needs for the harness (pyproject's pin: TaskManager.task_index entries
with `kind` and `yaml_path` are read here, and 0.4.13 is the version tested)."""

log = logging.getLogger(__name__)


def _lm_eval():
    """The lm_eval package, or a one-line error saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as err:
        raise ValueError(f"lm-eval tasks need the lm-eval package: pip install '{LM_EVAL_REQUIREMENT}' ({err})") from err
    return lm_eval


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@dataclasses.dataclass(frozen=True)
class TaskSelection:
    """Resolved lm-eval tasks: the names to run and the TaskManager that knows them."""

    names: tuple[str, ...]
    """lm-eval task, group or tag names, in the order asked for (duplicates dropped)."""
    manager: Any
    """The lm_eval.tasks.TaskManager indexing lm-eval's tasks and the local task folders."""


def _yaml_tasks(manager, folder: Path) -> list[str]:
    """Names of the tasks defined by YAML files under `folder`."""
    folder = folder.resolve()
    return sorted(
        name for name, entry in manager.task_index.items()
        if entry.kind.name in ("TASK", "PY_TASK") and entry.yaml_path is not None
        and entry.yaml_path.resolve().is_relative_to(folder)
    )


def _names_a_path(spec: str) -> bool:
    """Whether a --tasks entry is a task file or folder, not a task name: it has a folder in it,
    a YAML suffix, or starts with ~ or . (a bare name is a name even where a folder of that name
    sits in the working directory: `--tasks hellaswag` beside a `hellaswag/` of results)."""
    return "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or Path(spec).suffix in (".yaml", ".yml")


def _task_name(manager, spec: str) -> str:
    if spec in manager.task_index:
        return spec
    close = difflib.get_close_matches(spec, manager.all_tasks, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else " (`lm-eval ls tasks` lists them)"
    if Path(spec).exists():
        hint += f"; for the local {'folder' if Path(spec).is_dir() else 'file'} of that name, give ./{spec}"
    raise ValueError(f"unknown lm-eval task {spec!r}: not a task, group or tag name, nor a task YAML file or folder{hint}")


def _file_task(manager, path: Path) -> str:
    """The task or group that the YAML file `path` defines."""
    path = path.resolve()
    names = [name for name, entry in manager.task_index.items() if entry.yaml_path and entry.yaml_path.resolve() == path]
    if not names:
        raise ValueError(f"{path} defines no lm-eval task or group (a task YAML has a `task:` or `group:` key)")
    return names[0]


def _refuse_shadowed(local_index, names: list[str]) -> None:
    """A task name given bare that a YAML in a given file's folder defines, when lm-eval has a
    task of that name too: the local YAML would silently replace lm-eval's (and a task YAML may
    run Python: `!function`). Giving the file's path selects it."""
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_defaults=True).task_index
    for name in names:
        if name in own:
            where = local_index.task_index[name].yaml_path
            raise ValueError(
                f"lm-eval task {name!r} is also defined by {where}, in the folder of a task you gave: the name is ambiguous; "
                f"give {where} itself to run that one, or move it away to run lm-eval's"
            )


def select_tasks(specs: Sequence[str], *, check_data: bool = True) -> TaskSelection:
    """Resolve task names, task YAML files and task folders (a spec may be a comma list).

    With `check_data` every task is loaded once, so an unknown task or one whose data
    cannot be read fails here, before any model is loaded."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    # 1. split comma lists; paths become include folders, the rest are names
    specs = [part.strip() for spec in specs for part in spec.split(",") if part.strip()]
    if not specs:
        raise ValueError("no lm-eval task given (--tasks NAME, a task YAML file or a folder of them)")
    folders: dict[Path, None] = {}
    for spec in filter(_names_a_path, specs):
        path = Path(spec).expanduser()
        if path.is_dir():
            folders[path.resolve()] = None
        elif path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise ValueError(f"task file {spec} is not a YAML file (lm-eval tasks are .yaml)")
            folders[path.resolve().parent] = None
        else:
            raise FileNotFoundError(f"no such task file or folder: {spec}")
    named = [spec for spec in specs if not _names_a_path(spec)]

    # 2. one index: lm-eval's own tasks only when a name is not a local task (indexing them takes seconds)
    manager = TaskManager(include_path=list(folders), include_defaults=False) if folders else None
    if manager is not None and (local := [name for name in named if name in manager.task_index]):
        _refuse_shadowed(manager, local)
    if manager is None or any(name not in manager.task_index for name in named):
        manager = TaskManager(include_path=list(folders) or None, include_defaults=True)
    names: dict[str, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if not _names_a_path(spec):
            names[_task_name(manager, spec)] = None
        elif path.is_dir():
            found = _yaml_tasks(manager, path)
            if not found:
                raise ValueError(f"task folder {spec} holds no lm-eval task YAML")
            names.update(dict.fromkeys(found))
        else:
            names[_file_task(manager, path)] = None
    selection = TaskSelection(names=tuple(names), manager=manager)

    # 3. load each task once: missing data fails now, with the task's name
    if check_data:
        for name in selection.names:
            try:
                manager.load([name])
            except OSError as err:
                raise OSError(f"task {name!r}: its data could not be read ({_one_line(err)})") from err
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"task {name!r} could not be loaded ({_one_line(err)})") from err
    return selection


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    selection: TaskSelection,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results dict (`results`, `n-samples`, `versions`, ...; `samples` with
    `log_samples`) for `model` on the selected tasks, on the device the model is on.

    `limit`: docs per task (below 1: a fraction of them). `max_length`: tokens a request
    is cut to from the left (default: lm-eval's reading of the model's config). Few-shot
    examples are drawn with lm-eval's fixed seeds, so two models evaluated one after the
    other with the same `max_length` see the same prompts."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    # NOTE: HFLM warns that a model object makes most of its loading options moot; they are
    # indeed unused here, so that one warning is silenced.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        hf_logger.setLevel(level)
    with torch.no_grad():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(selection.names),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=selection.manager,
            log_samples=log_samples,
        )
    if results is None:  # NOTE: only a non-zero rank of a multi-process run gets None
        raise RuntimeError("lm-eval returned no results (run the harness in a single process)")
    return results


def context_length(model: PreTrainedModel | PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval gives `model` or a model of this config (its positions, else
    the tokenizer's model_max_length, else lm-eval's default)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(getattr(model, "config", model), tokenizer, default=HFLM._DEFAULT_MAX_LENGTH)


def _metrics(task_results: dict) -> dict[str, tuple[float, float | None]]:
    """{"acc": (value, stderr), "acc (filter)": ...} from one task's lm-eval results."""
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name == "none" else f"{metric} ({filter_name})"
        metrics[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return metrics


def metric_rows(results: dict[str, dict]) -> list[dict]:
    """One row per task and metric over models ({"teacher": results, "student": results}):
    task, metric, docs scored, and per model its value and stderr (None when it has none)."""
    models = list(results)
    tasks = list(dict.fromkeys(task for result in results.values() for task in result["results"]))
    rows = []
    for task in tasks:
        per_model = {model: _metrics(results[model]["results"].get(task, {})) for model in models}
        docs = None
        for model in models:
            docs = docs or results[model].get("n-samples", {}).get(task, {}).get("effective")
        for metric in dict.fromkeys(m for metrics in per_model.values() for m in metrics):
            row = {"task": task, "metric": metric, "docs": docs}
            for model in models:
                value, stderr = per_model[model].get(metric, (None, None))
                row[model], row[f"{model}_stderr"] = value, stderr
            rows.append(row)
    return rows


def format_table(rows: list[dict], models: Sequence[str] = ("teacher", "student")) -> str:
    """task | metric | docs | one column per model (value ± stderr) | last - first, aligned."""

    def cell(row: dict, model: str) -> str:
        value, stderr = row.get(model), row.get(f"{model}_stderr")
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    delta = len(models) == 2
    header = ("task", "metric", "docs", *models) + ((f"{models[1]} - {models[0]}",) if delta else ())
    lines = [header]
    for row in rows:
        line = (row["task"], row["metric"], str(row["docs"]) if row["docs"] is not None else "-")
        line += tuple(cell(row, model) for model in models)
        if delta:
            first, last = row.get(models[0]), row.get(models[1])
            line += (f"{last - first:+.4f}" if first is not None and last is not None else "-",)
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        " | ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )
