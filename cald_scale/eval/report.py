"""The end-of-run report: JSON for machines, Markdown for people."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..fileio import atomic_write_text
from ..metrics import json_safe

__all__ = ["format_cell", "write_report"]


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def format_cell(value) -> str:
    """A report table cell: floats at 4 significant digits, trailing zeros kept (a pair reads
    "17.90 / 47.93", not "17.9 / 47.93"), a pair as "a / b" (a task's teacher / student row),
    no score (an unguided run's teacher) as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, (tuple, list)):
        return " / ".join(map(format_cell, value))
    if isinstance(value, float):
        return f"{value:#,.4g}".removesuffix(".") if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    import deepspeed
    import transformers

    report = {
        **report,
        "hardware": _hardware(),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
    }
    # Strict JSON: a non-finite score (a diverged student) is null, as in metrics.jsonl.
    json_path = atomic_write_text(Path(run_dir) / "report.json", json.dumps(json_safe(report), indent=2, default=str, allow_nan=False))

    mem = report.get("peak_memory", {})
    rows = [
        ("teacher", f"{report['teacher']} ({report['teacher_source']})"),
        ("student mixer", report["mixer"]),
        *(tuple(row) for row in report.get("headline", ())),  # the task's scores
        ("optimizer steps", report["steps"]),
        ("tokens seen", report["tokens_seen"]),
        ("training tokens/s", report["train_tokens_per_s"]),
        ("training seconds (all sessions)", report.get("train_seconds")),
        ("wall seconds (this session)", report.get("wall_seconds_this_session")),
        ("non-finite micro-batches (or stages) skipped", report["nan_skipped"]),
        ("optimizer steps skipped (non-finite gradients)", report.get("steps_skipped", 0)),
        ("ranks", report["world_size"]),
        ("precision scored in: starting point / end", list((report.get("scored_in") or {}).values()) or None),
        ("peak RSS, largest rank, all sessions (GiB)", mem.get("cpu_max_rss_bytes", 0) / 2**30),
    ]
    if "gpu_max_allocated_bytes" in mem:
        rows.append(("peak GPU memory, largest rank, all sessions (GiB)", mem["gpu_max_allocated_bytes"] / 2**30))
    rows += [("hardware", report["hardware"]), ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items()))]
    lines = ["# CALD run report", "", "| | |", "|---|---|"] + [f"| {k} | {format_cell(v)} |" for k, v in rows]
    lines += ["", f"Student (HF format): `{report['student_dir']}`", ""]
    md_path = atomic_write_text(Path(run_dir) / "report.md", "\n".join(lines))
    print("\n".join(lines), flush=True)
    return json_path, md_path
