"""Where a converted student loses to its teacher on another domain: layer by layer, and token by token.

For a trained student (an exported student folder) and its teacher, on the held-out text
of each corpus (the training corpus's own held-out split and other domains):

- teacher-forced per-layer error: each student block runs on the teacher's own input
  h_{i-1} and is scored against the teacher's h_i with the training layer loss (MSE of
  layer-normed states), so every layer is measured alone, without the errors of the
  blocks before it;
- end to end, the per-token gap (student NLL - teacher NLL, nats), split into target
  tokens that already occur earlier in the sequence (in-context recall) and novel ones.

    python benchmarks/domain_gap.py runs/default/student
    python benchmarks/domain_gap.py benchmarks/runs/recovery/align_e2e_seed0/student --corpora shakespeare wiki

Writes benchmarks/results/domain_gap.json (--out to change). Single process, plain PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, output_file, write_result  # noqa: E402
from cald_scale.cli import positive_int  # noqa: E402


def _sequences(corpus: str, tokenizer, data_cfg, count: int) -> torch.Tensor:
    from cald_scale.data import held_out_sequences

    seqs = held_out_sequences(corpus, tokenizer, data_cfg, max_tokens=data_cfg.seq_len * count, is_rank0=True)
    return torch.stack([seqs[i]["input_ids"] for i in range(min(count, len(seqs)))])


@torch.no_grad()
def per_layer_errors(teacher, student, input_ids: torch.Tensor) -> list[float]:
    """Teacher-forced layer loss of every student block."""
    from cald_scale.distill.losses import layer_loss

    hidden = teacher.embed(input_ids)
    t_ctx, s_ctx = teacher.context(hidden, input_ids), student.context(student.embed(input_ids), input_ids)
    errors = []
    for i in range(teacher.num_layers):
        target = teacher.block(i, hidden, t_ctx)
        errors.append(layer_loss(student.block(i, hidden, s_ctx), target).item())
        hidden = target
    return errors


@torch.no_grad()
def token_gap(teacher_model, student_model, input_ids: torch.Tensor) -> dict:
    """Perplexities and the student's NLL gap over all, already-seen and novel target tokens."""
    from cald_scale.distill.losses import lm_cross_entropy

    targets = input_ids[:, 1:]
    nll = {name: lm_cross_entropy(model(input_ids=input_ids).logits, input_ids, reduction="none").view_as(targets) for name, model in (("teacher", teacher_model), ("student", student_model))}
    # seen[b, t]: the target token already occurs in input_ids[b, :t + 1].
    seen = (targets.unsqueeze(-1) == input_ids[:, :-1].unsqueeze(1)).tril().any(-1)
    out = {}
    for label, mask in (("all", torch.ones_like(seen)), ("seen", seen), ("novel", ~seen)):
        t, s = nll["teacher"][mask].mean().item(), nll["student"][mask].mean().item()
        out[label] = {"share": round(mask.float().mean().item(), 3), "teacher_ppl": math.exp(t), "student_ppl": math.exp(s), "gap_nats": s - t}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="an exported student folder (its config names the teacher)")
    parser.add_argument(
        "--corpora", nargs="+", default=None, help="held-out sets (anything data.corpus accepts); default: the run's own corpus, then wiki"
    )
    parser.add_argument("--sequences", type=positive_int, default=16, help="held-out sequences per corpus")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:  # a folder that is no student, a missing corpus: one line, as cald-scale's commands
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from cald_scale.conversion.teacher import load_teacher
    from cald_scale.distill.stages import LayerwiseModel
    from cald_scale.evaluate import resolve_target

    target = resolve_target(args.student)
    # NOTE: both in float32, as every recorded result (a bf16 run's config records bfloat16).
    teacher_model, tokenizer, _ = load_teacher(dataclasses.replace(target.teacher, dtype="float32"))
    student_model = AutoModelForCausalLM.from_pretrained(target.student_dir, dtype=torch.float32)
    teacher_model.eval()
    student_model.eval()
    teacher, student = LayerwiseModel(teacher_model), LayerwiseModel(student_model)
    data_cfg = target.data  # the run's own held-out split and settings (a bare student folder: the defaults)
    results = {"benchmark": "domain_gap", "machine": machine(), "student": str(target.student_dir), "teacher": target.teacher.name_or_path, "corpora": {}}
    # NOTE: the run's own held-out split by default (the default job trains on Brown), not a fixed list.
    corpora = args.corpora or list(dict.fromkeys([data_cfg.corpus, "wiki"]))
    for corpus in corpora:
        ids = _sequences(corpus, tokenizer, data_cfg, args.sequences)
        errors = per_layer_errors(teacher, student, ids)
        row = results["corpora"][corpus] = {
            "tokens": ids.numel(),
            "teacher_forced_layer_loss": errors,
            "teacher_forced_layer_loss_mean": sum(errors) / len(errors),
            "end_to_end": token_gap(teacher_model, student_model, ids),
        }
        print(f"{corpus}: layer loss mean {row['teacher_forced_layer_loss_mean']:.4f}; {row['end_to_end']}", flush=True)
    write_result("domain_gap", results, args.out)


if __name__ == "__main__":
    main()
