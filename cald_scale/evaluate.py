"""Teacher and student perplexity on the same held-out tokens of any corpus, or side by
side on lm-eval-harness tasks.

  cald-scale evaluate runs/default                          # the run's own eval split
  cald-scale evaluate runs/default --corpus wiki --corpus notes.txt --json ppl.json
  python -m cald_scale.evaluate runs/default/student --teacher smollm2-135m-instruct
  cald-scale evaluate runs/default --tasks hellaswag,arc_easy --limit 200 --json tasks.json
  cald-scale evaluate runs/default --tasks my_tasks/quiz.yaml --num_fewshot 5

PATH is a run folder (its config.json is the run config; student/ the exported student),
an exported student folder or a Bamba export of one (its config names the teacher; --teacher
overrides; with no --corpus it is scored on data.corpus's default, the Brown corpus; a run's
own student/ or bamba/ is scored as its run folder is, with the run's data settings). A corpus is anything data.corpus accepts: a built-in name, local text files, or a megatron
.bin/.idx prefix; text is tokenised once with the teacher's tokenizer and cached. A task
(--tasks) is an lm-eval task, group or tag name, a task YAML file or a folder of them; its
data must be readable by `datasets` (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 keep it off
the network). Both models see the teacher's tokenizer and the same prompts. Single process,
plain PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config_loader import from_dict
from .conversion.modeling import CaldStudentConfig
from .cli import check_output_file, device_arg, non_negative_int, positive_int
from .conversion.weights import check_complete
from .conversion.teacher import DTYPES, TeacherConfig, dtype_name, dtype_of, load_teacher
from .data import DataConfig, PackedSequences, held_out_sequences
from .data.heldout import same_corpus
from .data.tokenise import tokenizer_identity
from .distill.stages import LayerwiseModel
from .eval import harness
from .eval.perplexity import WholeModel, eval_indices, perplexity
from .fileio import atomic_write_text, read_json
from .generation.context import check_context
from .metrics import json_safe

logger = logging.getLogger("cald_scale.evaluate")

__all__ = ["EvalTarget", "add_arguments", "evaluate", "evaluate_tasks", "format_table", "main", "refuse_classifier", "resolve_target", "run"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalTarget:
    """What to evaluate: a student folder, its teacher and the data settings to score with."""

    student_dir: Path
    """An exported student (HF folder), or a Bamba export of one."""
    teacher: TeacherConfig | None
    """The teacher to score beside it (None: the student alone)."""
    data: DataConfig
    """The run's data settings (an exported student alone: the defaults)."""
    micro_batch_size: int = 4
    """Sequences per forward (the run's eval.micro_batch_size)."""
    max_sequences: int = 32
    """Held-out sequences scored per corpus (the run's eval.max_sequences): the run's own scores."""
    dtype: str = "float32"
    """The student's compute dtype: the run's teacher.dtype, which config.json records as the
    engines computed in (an exported student alone: float32), whether or not the teacher is scored too."""
    head_chunk_tokens: int | None = None
    """Tokens per logits chunk: the run's loss.head_chunk_tokens (None: automatic)."""
    heldout_identity: dict | None = None
    """The run's own held-out split as its first session read it (its data.json): scoring that
    corpus again must read the same split. None: a student alone, or a run from before the record."""


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a run folder or an exported student)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a run folder or an exported student)")
    return read_json(path)


def _is_run_config(config: object) -> bool:
    return isinstance(config, dict) and "teacher" in config and "data" in config


def _is_run_folder(folder: Path) -> bool:
    try:
        return _is_run_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return False


RUN_EXPORTS = {"student": CaldStudentConfig.model_type, "bamba": "bamba"}
"""A run's exports: folder name -> model_type (student/ when it finishes; bamba/ with output.export_bamba)."""


def run_of(folder: Path) -> Path | None:
    """The training run ``folder`` is, or whose export (``student/``, ``bamba/``) it is; None for any other folder."""
    if _is_run_folder(folder):
        return folder
    return folder.parent if folder.name in RUN_EXPORTS and _is_run_folder(folder.parent) else None


def refuse_classifier(folder: Path, config: dict, command: str) -> None:
    """A sequence classifier (model or run) is not a causal LM: say so, and where its scores are."""
    if config.get("model_type") == "cald_classifier" or config.get("task", {}).get("kind") == "classification":
        raise ValueError(
            f"{folder} is a sequence classifier: `cald-scale {command}` works on causal LMs; "
            "a classification run's report.json holds its teacher and student accuracy and macro-F1 on validation and test"
        )


def resolve_target(
    path: str | Path, *, teacher: str | None = None, no_teacher: bool = False, remedy: str = "pass --teacher NAME_OR_PATH or --no_teacher",
    check_weights: bool = True,
) -> EvalTarget:
    """The EvalTarget of a run folder, an exported student folder or its Bamba export; `teacher`
    overrides the teacher's name_or_path (its other settings kept, bar a GGUF file name that
    belonged to the old path), `no_teacher` leaves it out. ``remedy`` ends the message for a
    student that names no teacher (what the caller's user can pass). ``check_weights``: read the
    student's weight headers (False: the caller has)."""
    if teacher and no_teacher:
        raise ValueError(f"--teacher {teacher} and --no_teacher contradict each other: give one")
    folder = Path(path).expanduser().resolve()  # "." inside a run's student/ is that student/
    config = _read_config(folder)
    refuse_classifier(folder, config, "evaluate")
    kind = config.get("model_type")
    if kind in RUN_EXPORTS.values() and run_of(folder) is not None and RUN_EXPORTS.get(folder.name) == kind:
        # A run's own export: scored as its run is, on the run's split and settings (the
        # defaults' split of the same corpus may hold documents the run trained on).
        logger.info("%s is the %s export of run %s: scoring it with the run's data settings", folder, folder.name, folder.parent)
        target = _run_target(folder.parent, read_json(folder.parent / "config.json"), folder, teacher)
    elif kind in RUN_EXPORTS.values():
        named = teacher or config.get("teacher_name_or_path")
        if not named and not no_teacher:
            why = " (exported before Bamba folders recorded it)" if kind == "bamba" else ""
            raise ValueError(f"{kind} model {folder} does not name its teacher (teacher_name_or_path){why}: {remedy}")
        teacher_cfg = TeacherConfig(name_or_path=named) if named else None
        target = EvalTarget(student_dir=folder, teacher=teacher_cfg, data=DataConfig())
    elif _is_run_config(config):
        student_dir = folder / "student"
        if not (student_dir / "config.json").is_file():
            raise FileNotFoundError(f"run folder {folder} has no student/ (it is exported when the run finishes)")
        target = _run_target(folder, config, student_dir, teacher)
    else:
        raise ValueError(
            f"{folder / 'config.json'} is neither a run config (teacher and data sections) nor that of an exported "
            f"student (model_type {CaldStudentConfig.model_type!r}) or of its Bamba export (model_type 'bamba')"
        )
    # NOTE: before anything is scored: a student file cut short failed in from_pretrained, with the
    # safetensors library's traceback, after the whole teacher had been scored.
    if check_weights:
        check_complete(target.student_dir)
    return dataclasses.replace(target, teacher=None) if no_teacher else target


def _run_target(folder: Path, config: dict, student_dir: Path, teacher: str | None) -> EvalTarget:
    """The run in ``folder`` (its run config ``config``), scoring ``student_dir`` (one of its exports)
    with the run's data, eval settings and held-out split; ``teacher`` overrides its teacher's path."""
    # NOTE: runs from before data.txt_document_chars existed read a .txt file as one document.
    data = from_dict(DataConfig, {"txt_document_chars": None, **config["data"]}, "data")
    teacher_cfg = from_dict(TeacherConfig, config["teacher"], "teacher")
    if teacher:
        teacher_cfg = dataclasses.replace(teacher_cfg, name_or_path=teacher, gguf_file=None)
    batch = config.get("eval", {}).get("micro_batch_size", EvalTarget.micro_batch_size)
    sequences = config.get("eval", {}).get("max_sequences", EvalTarget.max_sequences)
    chunk = config.get("loss", {}).get("head_chunk_tokens")
    recorded = read_json(folder / "data.json").get("heldout") if (folder / "data.json").is_file() else None
    return EvalTarget(
        student_dir=student_dir, teacher=teacher_cfg, data=data, micro_batch_size=batch, max_sequences=sequences,
        dtype=dtype_name(dtype_of(teacher_cfg.dtype)), head_chunk_tokens=chunk,
        heldout_identity=recorded,
    )


def _load_teacher(target: EvalTarget):
    """The target's teacher and its tokenizer, which must be the student's own: both are scored
    on the same tokens, so another teacher's vocabulary would score the student on text
    tokenised as it never saw it (a smaller one passes every id check)."""
    teacher, tokenizer, _ = load_teacher(target.teacher)
    if teacher.config.model_type == CaldStudentConfig.model_type:
        raise ValueError(f"teacher {target.teacher.name_or_path} is a converted student, not a teacher: name the model it was converted from")
    if (target.student_dir / "tokenizer_config.json").is_file():
        own = AutoTokenizer.from_pretrained(target.student_dir)
        if tokenizer_identity(own)["vocab_sha256"] != tokenizer_identity(tokenizer)["vocab_sha256"]:
            raise ValueError(
                f"teacher {target.teacher.name_or_path} tokenises differently from the student in {target.student_dir} "
                f"(vocabularies of {len(tokenizer)} and {len(own)} tokens, or other merges): the two are scored on the "
                "same tokens, so name the student's own teacher (or use --no_teacher)"
            )
    return teacher, tokenizer


def _load_student(target: EvalTarget) -> PreTrainedModel:
    """The exported student, in the run's compute dtype (the same with or without its teacher)."""
    return AutoModelForCausalLM.from_pretrained(target.student_dir, dtype=DTYPES[target.dtype])


def _score(
    model: PreTrainedModel,
    held_out: dict[str, PackedSequences],
    max_sequences: int,
    batch_size: int,
    device: torch.device,
    head_chunk_tokens: int | None,
) -> dict[str, dict]:
    """Perplexity of `model` on the first `max_sequences` sequences of each held-out set."""
    model = model.to(device).eval()
    # NOTE: a Bamba export has no family adapter to run it block by block: scored whole, the same numbers.
    view = WholeModel if model.config.model_type == "bamba" else LayerwiseModel
    layerwise = view(model, head_chunk_tokens=head_chunk_tokens)
    scores = {}
    for name, sequences in held_out.items():
        # NOTE: a clear error, not an embedding index error, for a prefix of another tokenizer.
        sequences.vocab_size = layerwise.vocab_size
        indices = eval_indices(len(sequences), max_sequences, rank=0, world_size=1)
        scores[name] = perplexity(layerwise, sequences, indices, batch_size, device)
    return scores


def evaluate(
    target: EvalTarget,
    corpora: list[str] | None = None,
    *,
    max_sequences: int = 32,
    seq_len: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """One row per corpus (default: the run's own eval split): sequences, tokens, the
    teacher's and the student's perplexity on the same tokens, and student/teacher ratio."""
    device = torch.device(device)
    data = dataclasses.replace(target.data, seq_len=seq_len or target.data.seq_len)
    # NOTE: a model with attention is not scored beyond the positions it was trained on
    # (generate refuses the same context); a student of mixers alone takes any length.
    check_context(AutoConfig.from_pretrained(target.student_dir), data.seq_len, "the student", remedy="use a smaller --seq_len")
    teacher = tokenizer = None
    if target.teacher is not None:
        teacher, tokenizer = _load_teacher(target)
        check_context(teacher, data.seq_len, "the teacher", remedy="use a smaller --seq_len, or --no_teacher for the student alone")
    else:
        tokenizer = AutoTokenizer.from_pretrained(target.student_dir)
    corpora = list(dict.fromkeys(corpora or [data.eval_corpus or data.corpus]))
    held_out = {
        name: held_out_sequences(
            name, tokenizer, data, max_tokens=max_sequences * data.seq_len, is_rank0=True, seq_len_name="--seq_len"
        )
        for name in corpora
    }
    _check_same_heldout(target, data, held_out)
    batch_size = batch_size or target.micro_batch_size

    # NOTE: one model in memory at a time: the teacher is scored and freed before the student loads.
    teacher_scores = {}
    if teacher is not None:
        teacher_scores = _score(teacher, held_out, max_sequences, batch_size, device, target.head_chunk_tokens)
    del teacher
    student_scores = _score(_load_student(target), held_out, max_sequences, batch_size, device, target.head_chunk_tokens)

    rows = []
    for name in corpora:
        t, s = teacher_scores.get(name), student_scores[name]
        rows.append({
            "corpus": name,
            "sequences": min(len(held_out[name]), max_sequences),
            "tokens": s["tokens"],
            "teacher": t,
            "student": s,
            "ratio": s["ppl"] / t["ppl"] if t else None,
        })
    return rows


def _check_same_heldout(target: EvalTarget, data: DataConfig, held_out: dict) -> None:
    """The run's own corpus is scored on the held-out split the run kept apart: a corpus changed
    since (a line appended, a file added) is split anew, and the new "held-out" documents would
    include some the run trained on, so it is refused, as resuming the run is."""
    recorded = (target.heldout_identity or {}).get("source")
    own = data.eval_corpus or data.corpus
    for name, sequences in held_out.items():
        if recorded and same_corpus(name, own) and sequences.identity["source"] != recorded:
            raise ValueError(
                f"the held-out split of {name!r} is not the one run {target.student_dir.parent} kept apart (its data.json: "
                f"{recorded}, now {sequences.identity['source']}): the corpus changed since the run, so its new split may hold "
                "documents the run trained on. Restore the corpus, or score another corpus (--corpus)"
            )


def evaluate_tasks(
    target: EvalTarget,
    tasks: list[str] | harness.TaskSelection,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """lm-eval's results for the teacher (when the target has one) and the student on the
    same tasks and prompts: the teacher's tokenizer and context length serve both.
    {"teacher": ..., "student": ...}."""
    device = torch.device(device)
    selection = tasks if isinstance(tasks, harness.TaskSelection) else harness.select_tasks(tasks)
    options = dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size or target.micro_batch_size)
    results = {}
    # NOTE: one model in memory at a time, as for perplexity.
    if target.teacher is not None:
        teacher, tokenizer = _load_teacher(target)
        # NOTE: the student's config names no positions; without the teacher's length a long
        # prompt would be cut differently for the two.
        options["max_length"] = harness.context_length(teacher, tokenizer)
        results["teacher"] = harness.run_tasks(teacher.to(device), tokenizer, selection, **options)
        del teacher
    else:
        tokenizer = AutoTokenizer.from_pretrained(target.student_dir)
        # NOTE: the same length as with the teacher (the positions it and the student trained on),
        # so a student's scores do not depend on whether its teacher ran too.
        config = AutoConfig.from_pretrained(target.student_dir)
        # (A Bamba export's own config holds the teacher's positions.)
        teacher_config = config.teacher_hf_config() if hasattr(config, "teacher_hf_config") else config
        options["max_length"] = harness.context_length(teacher_config, tokenizer)
    results["student"] = harness.run_tasks(_load_student(target).to(device), tokenizer, selection, **options)
    return results


def format_table(rows: list[dict]) -> str:
    """corpus | tokens | teacher ppl | student ppl | ratio, aligned."""
    ppl = lambda score: f"{score['ppl']:.2f}" if score else "-"  # noqa: E731
    lines = [("corpus", "tokens", "teacher ppl", "student ppl", "ratio")]
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        lines.append((row["corpus"], str(row["tokens"]), ppl(row["teacher"]), ppl(row["student"]), ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def _limit(text: str) -> int | float:
    """Docs per task: a count, or below 1 a fraction of the task's docs."""
    value = float(text)
    if not value > 0 or (value >= 1 and not value.is_integer()):  # NaN fails "> 0"
        raise argparse.ArgumentTypeError(f"must be a whole number of docs or a fraction in (0, 1), got {text}")
    return int(value) if value >= 1 else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("path", help="a run folder (runs/NAME), an exported student folder or its Bamba export")
    add("--corpus", action="append", help="held-out text to score (repeatable): a built-in corpus, "
        "text files or a megatron prefix; default: the run's own eval split")
    add("--max_sequences", type=positive_int, help="sequences scored per corpus (default: the run's eval.max_sequences, else 32)")
    add("--seq_len", type=positive_int, help="tokens per sequence (default: the run's data.seq_len, else 256)")
    add("--tasks", action="append", metavar="TASK", help="run lm-eval-harness tasks instead of perplexity "
        "(repeatable or a comma list): task, group or tag names, task YAML files or folders of them")
    add("--limit", type=_limit, help="with --tasks: docs per task (below 1: a fraction of them; default all)")
    add("--num_fewshot", type=non_negative_int, help="with --tasks: few-shot examples (default: each task's own)")
    add("--batch_size", type=positive_int, help="sequences (lm-eval requests with --tasks) per forward "
        "(default: the run's eval.micro_batch_size, else 4)")
    add("--teacher", help="teacher name_or_path, overriding the run's or the student's")
    add("--no_teacher", action="store_true", help="score the student alone")
    add("--device", type=device_arg, help="torch device (default: cuda when available, else cpu)")
    add("--json", metavar="OUT", help="also write the results to this JSON file")


def _check_options(args: argparse.Namespace) -> None:
    """Perplexity options with --tasks, or task options without it, are a mistake, not ignored."""
    if args.tasks:
        given = [f"--{name}" for name in ("corpus", "max_sequences", "seq_len") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} score perplexity and do not apply to --tasks")
    else:
        given = [f"--{name}" for name in ("limit", "num_fewshot") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to lm-eval tasks: name them with --tasks")
    check_output_file(args.json)  # NOTE: before the work (hours of lm-eval tasks), not after it


def _jsonable(value):
    """numpy scalars and the like in lm-eval's results, as strict JSON (NaN as null)."""
    return json_safe(value.item()) if hasattr(value, "item") else str(value)


def _run_tasks(args: argparse.Namespace, target: EvalTarget, device: str) -> int:
    selection = harness.select_tasks(args.tasks)  # NOTE: before any model loads: task errors come first
    results = evaluate_tasks(
        target, selection, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=device
    )
    rows = harness.metric_rows(results)
    print(harness.format_table(rows, models=list(results)))
    if args.json:
        from lm_eval import __version__ as lm_eval_version

        keep = ("results", "groups", "n-samples", "versions", "n-shot", "higher_is_better")
        out = {
            "student": str(target.student_dir),
            "teacher": target.teacher.name_or_path if target.teacher else None,
            "tasks": list(selection.names),
            "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "lm_eval": lm_eval_version,
            "results": rows,
            "raw": {model: {key: raw[key] for key in keep if key in raw} for model, raw in results.items()},
        }
        atomic_write_text(Path(args.json), json.dumps(json_safe(out), indent=2, default=_jsonable, allow_nan=False))
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cald_scale").setLevel(logging.INFO)
    _check_options(args)
    target = resolve_target(args.path, teacher=args.teacher, no_teacher=args.no_teacher)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tasks:
        return _run_tasks(args, target, device)
    max_sequences = args.max_sequences or target.max_sequences
    rows = evaluate(
        target, args.corpus, max_sequences=max_sequences, seq_len=args.seq_len,
        batch_size=args.batch_size, device=device,
    )
    print(format_table(rows))
    if args.json:
        result = {
            "student": str(target.student_dir),
            "teacher": target.teacher.name_or_path if target.teacher else None,
            "seq_len": args.seq_len or target.data.seq_len,
            "results": rows,
        }
        atomic_write_text(Path(args.json), json.dumps(json_safe(result), indent=2, allow_nan=False))  # a diverged model's NaN: null
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cald_scale.evaluate ...`: the same as `cald-scale evaluate ...`."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
