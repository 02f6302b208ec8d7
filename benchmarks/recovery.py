"""Conversion quality per token: held-out perplexity against training tokens, recipe by recipe.

Every recipe converts the same teacher (SmolLM2-135M-Instruct -> Mamba2) and trains on the
same token budget (the default job's 50 steps x 4 x 256 = 51,200 tokens); each is scored
on two held-out sets: the training corpus's own held-out documents (Shakespeare works the
run never trains on) and text from another domain (Wikipedia leads). Recipes:

- target:     one end-to-end CALD phase with the frozen teacher (the job before phases);
- hybrid:     target guided for 40% of the steps, then CE alone (teacher released);
- align_e2e:  teacher-forced alignment of the mixers for 70% of the steps, then end to end;
- each of them with attention-informed mixer init (+attn_init) and with logit KL (+kl);
- +all: every student weight trains in the end-to-end phases (the paper's setting); without
  it only the mixers ever train and the copied weights stay the teacher's (the default).
  align_e2e+attn_init is the default job.

Where two recipes end within 10% of each other on the corpus's own held-out set, both
are run again with a second seed. Writes benchmarks/results/recovery{,_quick}.{json,md,png}.

    python benchmarks/recovery.py            # full: 10 runs of 51k tokens, ~3 h on 2 CPU cores
    python benchmarks/recovery.py --quick    # 3 recipes, 6 steps of short sequences, ~10 min
    python benchmarks/recovery.py --recipes align_e2e align_e2e+attn_init   # a subset
    python benchmarks/recovery.py --recipes align_e2e --seed 1   # add a second seed to a kept run

A subset extends the table: the runs of the other recipes already in the results file are
kept when they ran on the same budget (each run names its folder and the date it finished),
so the matrix can be filled in over several sittings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_result_files  # noqa: E402
from _runs import Run, launch  # noqa: E402

PHASES = {
    "target": "[{name: target, guidance: target}]",
    "hybrid": "[{name: target, fraction: 0.4, guidance: target}, {name: task_only, guidance: none}]",
    "align_e2e": None,  # the default phases
}
# Base recipes start fresh mixers (the paper); +attn_init maps Q/K/V/O onto C/B/x/out_proj.
# Every variant names what trains, so no run depends on the default of student.trainable.
MIXERS, ALL = "student.trainable=mixers", "student.trainable=all"
VARIANTS = {
    "": ["student.conversion.attention_init=false", MIXERS],
    "+attn_init": ["student.conversion.attention_init=true", MIXERS],
    "+kl": ["student.conversion.attention_init=false", MIXERS, "loss.a_kl=1.0"],
    "+all": ["student.conversion.attention_init=false", ALL],
    "+attn_init+all": ["student.conversion.attention_init=true", ALL],
}
# The matrix (each base, with attention init, with KL) and the default trained whole.
FULL = [base + v for base in PHASES for v in ("", "+attn_init", "+kl")] + ["align_e2e+attn_init+all"]
DEFAULT_RECIPE = "align_e2e+attn_init"
TARGETS = {"heldout": 2.0, "wiki": 3.0}  # student / teacher perplexity, default recipe, full budget


def recipes() -> dict[str, list[str]]:
    out = {}
    for (base, phases), (suffix, extra) in itertools.product(PHASES.items(), VARIANTS.items()):
        out[base + suffix] = ([f"phases={phases}"] if phases else []) + extra
    return out


def budget(quick: bool) -> list[str]:
    if quick:
        return ["train.max_steps=6", "data.seq_len=128", "eval.every=3", "eval.max_sequences=8"]
    return ["train.max_steps=50", "eval.every=10"]


def previous_runs(path: Path, budget: list[str], keep: set[str]) -> dict[str, list[dict]]:
    """The runs of `keep` recipes in an earlier results file, if it ran on the same budget."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("budget") != budget:
        print(f"not keeping the runs in {path}: another budget ({earlier.get('budget')})", flush=True)
        return {}
    # A run from before runs carried their own date finished by the time the file was written.
    date = "by " + earlier["machine"]["date"][:10]
    kept = {label: [{"date": date, **r} for r in rs] for label, rs in earlier["runs"].items() if label in keep}
    if kept:
        print(f"keeping earlier runs from {path.name}: {sorted(kept)}", flush=True)
    return kept


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(TARGETS)
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    now = set(results["measured_now"])
    for ax, name in zip(axes[0], sets):
        teacher = None
        for label, runs in results["runs"].items():
            run = runs[0]
            if name not in run["curve"]:
                continue
            tokens, ppl = zip(*run["curve"][name])
            # Runs kept from an earlier sitting are dashed and dated.
            style = dict(ls="-" if label in now else "--", lw=2.5 if label == DEFAULT_RECIPE else 1.2)
            ax.plot(tokens, ppl, marker="o", ms=3, label=label if label in now else f"{label} ({run['date']})", **style)
            if label == DEFAULT_RECIPE or teacher is None:
                teacher = run["teacher"].get(name) or teacher
        if teacher:
            ax.axhline(teacher, color="black", ls="--", lw=1, label=f"teacher ({teacher:.1f})")
            ax.axhline(TARGETS[name] * teacher, color="grey", ls=":", lw=1, label=f"target {TARGETS[name]:g}x teacher")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out perplexity")
        ax.set_title({"heldout": "own held-out split (Shakespeare)", "wiki": "other domain (Wikipedia leads)"}.get(name, name))
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M -> Mamba2: perplexity vs tokens (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _seed(run: dict) -> int:
    return int(run["folder"].rsplit("_seed", 1)[1])  # Run.folder names it


def _mean_heldout(runs: list[dict]) -> float:
    return sum(r["final"]["heldout"] for r in runs) / len(runs)


def targets(runs: dict[str, list[dict]]) -> dict:
    """The default recipe against the others and against the teacher."""
    if DEFAULT_RECIPE not in runs:
        return {}
    # NOTE: each rival is compared on the seeds both recipes have, not a 2-seed mean against 1 seed.
    mine = runs[DEFAULT_RECIPE]
    margins = {}
    for label, theirs in runs.items():
        if label != DEFAULT_RECIPE:
            n = min(len(mine), len(theirs))
            margins[label] = (_mean_heldout(theirs[:n]) / _mean_heldout(mine[:n]), n)
    lower = sorted(label for label, (margin, _) in margins.items() if margin <= 1.0)
    closest = min(margins, key=lambda label: margins[label][0]) if margins else None
    out = {"default_is_best": {
        "what": "the default recipe has the lowest own held-out ppl, each rival compared on the seeds both have",
        "value": (f"closest rival {closest}: {margins[closest][0]:.3f}x the default's ppl over {margins[closest][1]} seed(s)" if closest else "no rival")
        + (f"; lower: {lower}" if lower else ""),
        "pass": not lower,
    }}
    default = mine[0]
    for set_name, limit in TARGETS.items():
        if set_name in default["final"] and default["teacher"].get(set_name):
            ratio = default["final"][set_name] / default["teacher"][set_name]
            out[f"default_{set_name}_within_{limit:g}x_teacher"] = {
                "what": f"default recipe's {set_name} ppl <= {limit:g}x the teacher's (full budget, seed 0)",
                "value": round(ratio, 3),
                "pass": ratio <= limit,
            }
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# Conversion quality per token ({results['machine']['date'][:10]}, {results['budget_tokens']:,} tokens per run)",
        "",
        "| recipe | seeds | own held-out ppl | x teacher | other-domain ppl | x teacher | train s | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in sorted(results["runs"].items(), key=lambda kv: kv[1][0]["final"]["heldout"]):
        own = [r["final"]["heldout"] for r in runs]
        other = [r["final"].get("wiki") for r in runs]
        t_own, t_other = runs[0]["teacher"]["heldout"], runs[0]["teacher"].get("wiki")
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs if x is not None)  # noqa: E731
        lines.append(
            f"| {label} | {len(runs)} | {fmt(own)} | {sum(own) / len(own) / t_own:.2f} | {fmt(other)} | "
            f"{(sum(other) / len(other) / t_other) if t_other and all(other) else float('nan'):.2f} | {runs[0]['train_seconds']:.0f} | {runs[0].get('date', results['machine']['date'][:10])} |"
        )
    lines += ["", "| target | value | pass |", "|---|---|---|"]
    lines += [f"| {k}: {t['what']} | {t['value']} | {t['pass']} |" for k, t in results["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 recipes, 6 short steps")
    parser.add_argument("--recipes", nargs="*", default=None, help=f"subset of {list(recipes())}")
    parser.add_argument("--no_second_seed", action="store_true", help="skip the second-seed reruns of close pairs")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="the seed of this sitting's runs; a seed other than 0 adds a run to each chosen recipe's earlier ones (its seed-0 run must be in the results file)",
    )
    args = parser.parse_args(argv)
    every = recipes()
    chosen = args.recipes or ([p + "+attn_init" for p in PHASES] if args.quick else FULL)
    unknown = [r for r in chosen if r not in every]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(every)}")
    name = "recovery_quick" if args.quick else "recovery"
    extra = budget(args.quick)

    runs = previous_runs(RESULTS / f"{name}.json", extra, keep=set(every) - set(chosen) if args.seed == 0 else set(every))
    if args.seed:
        unseeded = [label for label in chosen if not any(_seed(r) == 0 for r in runs.get(label, []))]
        if unseeded:
            parser.error(f"no seed-0 run of {unseeded} in {name}.json on this budget: run them without --seed first")

    def measure(label: str, seed: int) -> None:
        new = launch(Run(label, every[label] + extra, seed=seed), name)
        runs[label] = sorted([r for r in runs.get(label, []) if _seed(r) != seed] + [new], key=_seed)

    for label in chosen:
        measure(label, args.seed)
    if not args.no_second_seed and args.seed == 0:
        # Second seeds for this sitting's recipes that end close to any other; other recipes'
        # are added in their own sittings (--seed 1).
        finals = {label: r[0]["final"]["heldout"] for label, r in runs.items()}
        close = {a for a, b in itertools.permutations(finals, 2) if abs(finals[a] - finals[b]) <= 0.1 * min(finals[a], finals[b])}
        for label in sorted(label for label in close & set(chosen) if len(runs[label]) < 2):
            measure(label, 1)

    results = {
        "benchmark": name,
        "machine": machine(),
        "teacher": "smollm2-135m-instruct",
        "budget_tokens": runs[chosen[0]][0]["tokens"],
        "measured_now": chosen,
        "budget": extra,
        "runs": runs,
    }
    results["targets"] = targets(runs)
    write_result_files(name, results, markdown(results), plot)


if __name__ == "__main__":
    main()
