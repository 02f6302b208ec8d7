"""The paper's guidance table for the LM track: unguided, target, trajectory, waypoint, hybrid.

SmolLM2-135M-Instruct -> Mamba2 on Shakespeare, every mode end to end on the same token
budget (25 steps x 4 x 256 = 25,600 tokens), 2 seeds each, scored on Shakespeare works the
runs never train on. The trajectory teacher is fine-tuned on the training corpus alongside
the student (AdamW, LR 1e-4, every step) and exports its checkpoints every third of the
run: those are the waypoints of the waypoint run (same seed), i.e. the
teacher's own fine-tuning trajectory on this corpus. Writes
benchmarks/results/guidance_lm{,_quick}.{json,md}.

    python benchmarks/guidance_lm.py           # 10 runs, ~1.5 h on 2 CPU cores
    python benchmarks/guidance_lm.py --quick   # 1 seed, 6 short steps
    python benchmarks/guidance_lm.py --trainable all   # every student weight trains (the paper's setting)

By default only the mixers train, as in the default job: the student's copied MLPs, norms
and embeddings stay the pretrained teacher's, so under trajectory and waypoint guidance
they cannot follow the teacher's own fine-tuning. ``--trainable all`` lets them (results
in guidance_lm_all.{json,md}).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALL_MAMBA2_ON_SHAKESPEARE, RESULTS, machine, overall_pass, write_result  # noqa: E402
from _runs import REPO, Run, launch  # noqa: E402

MODES = ("unguided", "target", "trajectory", "waypoint", "hybrid")


def phases(mode: str, steps: int, waypoints: list[str]) -> str:
    return {
        "unguided": "[{name: unguided, guidance: none}]",
        "target": "[{name: target, guidance: target}]",
        "trajectory": "[{name: trajectory, guidance: trajectory, trajectory: {lr: 1.0e-4, update_every: 1}}]",
        "waypoint": "[{name: waypoints, guidance: waypoint, waypoints: [" + ", ".join(waypoints) + "]}]",
        "hybrid": "[{name: target, fraction: 0.4, guidance: target}, {name: task_only, guidance: none}]",
    }[mode]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--trainable", choices=("mixers", "all"), default="mixers", help="what trains in the student (default: the mixers, as in the default job)")
    args = parser.parse_args(argv)
    name = ("guidance_lm_quick" if args.quick else "guidance_lm") + ("_all" if args.trainable == "all" else "")
    steps = 6 if args.quick else 25
    budget = [f"train.max_steps={steps}", "eval.other_corpora=[]", f"student.trainable={args.trainable}", *ALL_MAMBA2_ON_SHAKESPEARE] + (["data.seq_len=128", "eval.max_sequences=8"] if args.quick else [])
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    export_every = max(1, steps // 3)

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in seeds:
        for mode in MODES:
            waypoints = []
            if mode == "waypoint":
                folder = Run("trajectory", [], seed=seed).folder(name) / "teacher_waypoints"
                waypoints = [str(p.relative_to(REPO)) for p in sorted(folder.glob("step_*"))]
            extra = [f"output.export_teacher_every={export_every}"] if mode == "trajectory" else []
            runs[mode].append(launch(Run(mode, [f"phases={phases(mode, steps, waypoints)}", *budget, *extra], seed=seed), name))

    def mean(xs):
        return sum(xs) / len(xs)

    table = {
        mode: {
            "ppl": [r["final"]["heldout"] for r in rs],
            "mean_ppl": mean([r["final"]["heldout"] for r in rs]),
            "train_seconds": mean([r["train_seconds"] for r in rs]),
        }
        for mode, rs in runs.items()
    }
    teacher = runs["target"][0]["teacher"]["heldout"]
    ranked = sorted(table, key=lambda m: table[m]["mean_ppl"])
    results = {
        "benchmark": name,
        "machine": machine(),
        "teacher_ppl": teacher,
        "budget_tokens": runs["target"][0]["tokens"],
        "seeds": seeds,
        "student_trainable": args.trainable,
        "table": table,
        "ranking": ranked,
        "runs": runs,
        # NOTE: a run that fails stops the benchmark (launch raises), so every table is complete.
        "targets": {
            "guided_beats_unguided": {
                "what": "target-guided ends below unguided (the paper's central claim)",
                "value": [round(table["target"]["mean_ppl"], 1), round(table["unguided"]["mean_ppl"], 1)],
                "pass": table["target"]["mean_ppl"] < table["unguided"]["mean_ppl"],
            },
        },
    }
    results["pass"] = overall_pass(results["targets"])
    write_result(name, results)
    lines = [
        f"# Guidance modes, LM track ({results['machine']['date'][:10]}; SmolLM2-135M -> Mamba2, {results['budget_tokens']:,} tokens, seeds {seeds}; "
        f"trains: {'the mixers' if args.trainable == 'mixers' else 'every student weight'})",
        "",
        f"Teacher held-out perplexity: {teacher:.1f}; the trajectory teacher's own after fine-tuning alongside: "
        + " / ".join(f"{r['teacher_after'].get('heldout', float('nan')):.1f}" for r in runs["trajectory"]),
        "",
        "| mode | held-out ppl per seed | mean | x teacher | train s |",
        "|---|---|---|---|---|",
    ]
    for mode in ranked:
        row = table[mode]
        lines.append(f"| {mode} | {' / '.join(f'{p:.1f}' for p in row['ppl'])} | {row['mean_ppl']:.1f} | {row['mean_ppl'] / teacher:.2f} | {row['train_seconds']:.0f} |")
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    lines += [f"| {k}: {t['what']} | {t['value']} | {t['pass']} |" for k, t in results["targets"].items()]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
