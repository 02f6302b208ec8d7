"""Teacher and student perplexity on the same held-out tokens of any corpus.

  cald-scale evaluate runs/default                          # the run's own eval split
  cald-scale evaluate runs/default --corpus wiki --corpus notes.txt --json ppl.json
  python -m cald_scale.evaluate runs/default/student --teacher smollm2-135m-instruct

PATH is a run folder (its config.json is the run config; student/ the exported student)
or an exported student folder (its config names the teacher; --teacher overrides). A
corpus is anything data.corpus accepts: a built-in name, local text files, or a megatron
.bin/.idx prefix; text is tokenised once with the teacher's tokenizer and cached. Single
process, plain PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .configuration import from_dict
from .conversion.modeling import CaldStudentConfig
from .conversion.teacher import DTYPES, TeacherConfig, load_teacher
from .data import DataConfig, PackedSequences, held_out_sequences
from .distill.stages import LayerwiseModel
from .eval.perplexity import eval_indices, perplexity
from .fileio import atomic_write_text

__all__ = ["EvalTarget", "add_arguments", "evaluate", "format_table", "main", "resolve_target", "run"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalTarget:
    """What to evaluate: a student folder, its teacher and the data settings to score with."""

    student_dir: Path
    """An exported student (HF folder)."""
    teacher: TeacherConfig | None
    """The teacher to score beside it (None: the student alone)."""
    data: DataConfig
    """The run's data settings (an exported student alone: the defaults)."""
    micro_batch_size: int = 4
    """Sequences per forward (the run's eval.micro_batch_size)."""


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a run folder or an exported student)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a run folder or an exported student)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def resolve_target(path: str | Path, *, teacher: str | None = None, no_teacher: bool = False) -> EvalTarget:
    """The EvalTarget of a run folder or an exported student folder; `teacher` overrides
    the teacher's name_or_path, `no_teacher` leaves it out."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    if config.get("model_type") == CaldStudentConfig.model_type:
        named = teacher or config.get("teacher_name_or_path")
        if not named and not no_teacher:
            raise ValueError(
                f"student {folder} does not name its teacher (teacher_name_or_path): pass --teacher or --no_teacher"
            )
        teacher_cfg = TeacherConfig(name_or_path=named) if named else None
        target = EvalTarget(student_dir=folder, teacher=teacher_cfg, data=DataConfig())
    elif "teacher" in config and "data" in config:
        student_dir = folder / "student"
        if not (student_dir / "config.json").is_file():
            raise FileNotFoundError(f"run folder {folder} has no student/ (it is exported when the run finishes)")
        # NOTE: runs from before data.txt_document_chars existed read a .txt file as one document.
        data = from_dict(DataConfig, {"txt_document_chars": None, **config["data"]}, "data")
        teacher_cfg = from_dict(TeacherConfig, config["teacher"], "teacher")
        if teacher:
            teacher_cfg = dataclasses.replace(teacher_cfg, name_or_path=teacher)
        batch = config.get("eval", {}).get("micro_batch_size", EvalTarget.micro_batch_size)
        target = EvalTarget(student_dir=student_dir, teacher=teacher_cfg, data=data, micro_batch_size=batch)
    else:
        raise ValueError(
            f"{folder / 'config.json'} is neither a run config (teacher and data sections) nor "
            f"an exported student's (model_type {CaldStudentConfig.model_type!r})"
        )
    return dataclasses.replace(target, teacher=None) if no_teacher else target


def _score(
    model: PreTrainedModel,
    held_out: dict[str, PackedSequences],
    max_sequences: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, dict]:
    """Perplexity of `model` on the first `max_sequences` sequences of each held-out set."""
    layerwise = LayerwiseModel(model.to(device).eval())
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
    teacher = tokenizer = None
    if target.teacher is not None:
        teacher, tokenizer, _ = load_teacher(target.teacher)
    else:
        tokenizer = AutoTokenizer.from_pretrained(target.student_dir)
    corpora = list(dict.fromkeys(corpora or [data.eval_corpus or data.corpus]))
    held_out = {
        name: held_out_sequences(name, tokenizer, data, max_tokens=max_sequences * data.seq_len, is_rank0=True)
        for name in corpora
    }
    batch_size = batch_size or target.micro_batch_size

    # NOTE: one model in memory at a time: the teacher is scored and freed before the student loads.
    teacher_scores = {}
    if teacher is not None:
        teacher_scores = _score(teacher, held_out, max_sequences, batch_size, device)
    del teacher
    dtype = DTYPES[target.teacher.dtype] if target.teacher is not None else torch.float32
    student = AutoModelForCausalLM.from_pretrained(target.student_dir, dtype=dtype)
    student_scores = _score(student, held_out, max_sequences, batch_size, device)

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("path", help="a run folder (runs/NAME) or an exported student folder")
    add("--corpus", action="append", help="held-out text to score (repeatable): a built-in corpus, "
        "text files or a megatron prefix; default: the run's own eval split")
    add("--max_sequences", type=_positive_int, default=32, help="sequences scored per corpus (default 32)")
    add("--seq_len", type=_positive_int, help="tokens per sequence (default: the run's data.seq_len, else 256)")
    add("--batch_size", type=_positive_int,
        help="sequences per forward (default: the run's eval.micro_batch_size, else 4)")
    add("--teacher", help="teacher name_or_path, overriding the run's or the student's")
    add("--no_teacher", action="store_true", help="score the student alone")
    add("--device", help="torch device (default: cuda when available, else cpu)")
    add("--json", metavar="OUT", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cald_scale").setLevel(logging.INFO)
    target = resolve_target(args.path, teacher=args.teacher, no_teacher=args.no_teacher)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = evaluate(
        target, args.corpus, max_sequences=args.max_sequences, seq_len=args.seq_len,
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
        atomic_write_text(Path(args.json), json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cald_scale.evaluate ...`: the same as `cald-scale evaluate ...`."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
