"""Conversion quality per token: held-out perplexity against training tokens, recipe by recipe
and layout by layout.

Every run converts the same teacher (SmolLM2-135M-Instruct) and trains on the same token
budget (the default job's 50 steps x 4 x 256 = 51,200 tokens); each is scored on two held-out
sets: the training corpus's own held-out documents and text from another domain that the run
never trains on (Wikipedia leads).

Recipes: the all-Mamba2 student on Shakespeare (the default job until 2026-12-03), phases,
init and losses varied:

- target:     one end-to-end CALD phase with the frozen teacher (the job before phases);
- hybrid:     target guided for 40% of the steps, then CE alone (teacher released);
- align_e2e:  teacher-forced alignment of the mixers for 70% of the steps, then end to end;
- each of them with attention-informed mixer init (+attn_init) and with logit KL (+kl);
- +all: every student weight trains in the end-to-end phases (the paper's setting); without
  it only the mixers ever train and the copied weights stay the teacher's (the default).
  align_e2e+attn_init is the default job's recipe.

Layouts: the default job's recipe on the Brown corpus (general English), with every layer
converted (layout_mamba2), a quarter keeping attention (layout_attn25, the default job) or
half (layout_attn50). The default's 2x / 3x targets are read from the default job's row.

Where two recipes end within 10% of each other on the corpus's own held-out set, both
are run again with a second seed. Writes benchmarks/results/recovery{,_quick}.{json,md,png}.

    python benchmarks/recovery.py            # full: 10 recipes and 3 layouts of 51k tokens, ~3.5 h on 2 CPU cores
    python benchmarks/recovery.py --layouts  # the layouts only (recipe runs kept), ~40 min
    python benchmarks/recovery.py --quick    # 3 recipes, 6 steps of short sequences, ~10 min
    python benchmarks/recovery.py --recipes align_e2e align_e2e+attn_init   # a subset
    python benchmarks/recovery.py --recipes align_e2e --seed 1   # add a second seed to a kept run

A subset extends the table: the runs already in the results file (other recipes and layouts,
and the chosen ones' other seeds) are kept when they ran on the same budget (each run names its folder and the date it finished),
so the matrix can be filled in over several sittings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALL_MAMBA2_ON_SHAKESPEARE, RESULTS, machine, write_result_files  # noqa: E402
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
# The default job's recipe on Brown; the attention layout varies. layout_attn25 is the default job.
LAYOUTS = {"layout_mamba2": 0, "layout_attn25": 4, "layout_attn50": 2}  # student.conversion.attention_every
DEFAULT_LAYOUT = "layout_attn25"
TARGETS = {"heldout": 2.0, "wiki": 3.0}  # student / teacher perplexity, the default job, full budget


def layouts() -> dict[str, list[str]]:
    return {label: ["data.corpus=brown", f"student.conversion.attention_every={every}"] for label, every in LAYOUTS.items()}


def kept_attention(label: str) -> float:
    """About the share of layers a layout keeps attention in (every k-th layer: 1/k)."""
    return 1 / LAYOUTS[label] if LAYOUTS[label] else 0.0


def recipes() -> dict[str, list[str]]:
    out = {}
    for (base, phases), (suffix, extra) in itertools.product(PHASES.items(), VARIANTS.items()):
        out[base + suffix] = ([f"phases={phases}"] if phases else []) + extra + ALL_MAMBA2_ON_SHAKESPEARE
    return out


def budget(quick: bool) -> list[str]:
    if quick:
        return ["train.max_steps=6", "data.seq_len=128", "eval.every=3", "eval.max_sequences=8"]
    return ["train.max_steps=50", "eval.every=10"]


def previous_runs(path: Path, budget: list[str], known: dict[str, set[str]]) -> dict[str, dict[str, list[dict]]]:
    """Per section ("runs": recipes, "layouts"), the runs of its ``known`` labels in an earlier
    results file, if it ran on the same budget."""
    kept = {section: {} for section in known}
    if not path.is_file():
        return kept
    earlier = json.loads(path.read_text())
    if earlier.get("budget") != budget:
        print(f"not keeping the runs in {path}: another budget ({earlier.get('budget')})", flush=True)
        return kept
    # A run from before runs carried their own date finished by the time the file was written.
    date = "by " + earlier["machine"]["date"][:10]
    for section, labels in known.items():
        kept[section] = {label: [{"date": date, **r} for r in rs] for label, rs in earlier.get(section, {}).items() if label in labels}
    names = sorted(label for runs in kept.values() for label in runs)
    if names:
        print(f"keeping earlier runs from {path.name}: {names}", flush=True)
    return kept


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(TARGETS)
    groups = [("runs", DEFAULT_RECIPE, "recipes: all-Mamba2 on Shakespeare"), ("layouts", DEFAULT_LAYOUT, "layouts: the default recipe on Brown")]
    groups = [g for g in groups if results.get(g[0])]
    fig, axes = plt.subplots(len(groups), len(sets), figsize=(6 * len(sets), 4.5 * len(groups)), squeeze=False)
    now = set(results["measured_now"])
    for row, (section, default, title) in zip(axes, groups):
        for ax, name in zip(row, sets):
            teacher = None
            for label, runs in results[section].items():
                run = runs[0]
                if name not in run["curve"]:
                    continue
                tokens, ppl = zip(*run["curve"][name])
                # Runs kept from an earlier sitting are dashed and dated.
                style = dict(ls="-" if label in now else "--", lw=2.5 if label == default else 1.2)
                ax.plot(tokens, ppl, marker="o", ms=3, label=label if label in now else f"{label} ({run['date']})", **style)
                if label == default or teacher is None:
                    teacher = run["teacher"].get(name) or teacher
            if teacher:
                ax.axhline(teacher, color="black", ls="--", lw=1, label=f"teacher ({teacher:.1f})")
                ax.axhline(TARGETS[name] * teacher, color="grey", ls=":", lw=1, label=f"target {TARGETS[name]:g}x teacher")
            ax.set_yscale("log")
            ax.set_xlabel("training tokens")
            ax.set_ylabel("held-out perplexity")
            ax.set_title(f"{title}: " + {"heldout": "own held-out split", "wiki": "other domain (Wikipedia leads)"}.get(name, name), fontsize=9)
            ax.grid(alpha=0.3, which="both")
        row[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M -> Mamba2 students: perplexity vs tokens (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _seed(run: dict) -> int:
    return int(run["folder"].rsplit("_seed", 1)[1])  # Run.folder names it


def _mean_heldout(runs: list[dict]) -> float:
    return sum(r["final"]["heldout"] for r in runs) / len(runs)


def default_job_layout() -> str | None:
    """The layout whose resolved config is the embedded default job's (budget and output aside)."""
    from cald_scale.config import load_run_config

    def resolved(overrides: list[str]) -> dict:
        config = load_run_config(None, overrides).to_dict()
        config.pop("output")
        return config

    default = resolved([])
    return next((label for label, overrides in layouts().items() if resolved(overrides) == default), None)


def targets(runs: dict[str, list[dict]], layout_runs: dict[str, list[dict]]) -> dict:
    """The default recipe against the other recipes; the default job against the teacher."""
    out = {}
    if DEFAULT_RECIPE in runs:
        # NOTE: each rival is compared on the seeds both recipes have, not a 2-seed mean against 1 seed.
        mine = {_seed(r): r for r in runs[DEFAULT_RECIPE]}
        margins, unmatched = {}, []
        for label, theirs in runs.items():
            if label == DEFAULT_RECIPE:
                continue
            theirs = {_seed(r): r for r in theirs}
            shared = sorted(mine.keys() & theirs.keys())
            if not shared:  # no seed to compare on: the claim cannot be made for this rival
                unmatched.append(label)
                continue
            margins[label] = (_mean_heldout([theirs[s] for s in shared]) / _mean_heldout([mine[s] for s in shared]), len(shared))
        lower = sorted(label for label, (margin, _) in margins.items() if margin <= 1.0)
        closest = min(margins, key=lambda label: margins[label][0]) if margins else None
        out["default_is_best"] = {
            "what": "the default recipe has the lowest own held-out ppl of the recipes (all-Mamba2, Shakespeare), each rival compared on the seeds both have",
            "value": (f"closest rival {closest}: {margins[closest][0]:.3f}x {DEFAULT_RECIPE}'s ppl over {margins[closest][1]} seed(s)" if closest else "no rival")
            + (f"; lower: {lower}" if lower else "")
            + (f"; no seed in common with {DEFAULT_RECIPE}: {sorted(unmatched)}" if unmatched else ""),
            "pass": not lower and not unmatched,
        }
    if DEFAULT_LAYOUT not in layout_runs:
        return out
    default_job = default_job_layout()
    out["default_job_is_layout_attn25"] = {
        "what": f"{DEFAULT_LAYOUT}'s config is the embedded default job's",
        "value": default_job,
        "pass": default_job == DEFAULT_LAYOUT,
    }
    def within_targets(run: dict) -> bool:
        return all(run["final"][name] <= limit * run["teacher"][name] for name, limit in TARGETS.items())

    # Attention keeps a KV cache that grows with the context: the default keeps as little as meets the targets.
    passing = [label for label, rs in layout_runs.items() if within_targets(rs[0])]
    leanest = min(passing, key=kept_attention) if passing else None
    missing = sorted(set(LAYOUTS) - set(layout_runs))
    out["default_is_the_leanest_layout_within_targets"] = {
        "what": f"the default job keeps the least attention of the layouts within {TARGETS} x the teacher (seed 0; every layout run)",
        "value": f"within targets: {sorted(passing)}; leanest: {leanest}" + (f"; not run: {missing}" if missing else ""),
        "pass": leanest == DEFAULT_LAYOUT and not missing,
    }
    default = layout_runs[DEFAULT_LAYOUT][0]
    for set_name, limit in TARGETS.items():
        if set_name in default["final"] and default["teacher"].get(set_name):
            ratio = default["final"][set_name] / default["teacher"][set_name]
            out[f"default_{set_name}_within_{limit:g}x_teacher"] = {
                "what": f"the default job's ({DEFAULT_LAYOUT}) {set_name} ppl <= {limit:g}x the teacher's (full budget, seed 0)",
                "value": round(ratio, 3),
                "pass": ratio <= limit,
            }
    return out


def _rows(runs: dict[str, list[dict]], date: str) -> list[str]:
    lines = [
        "| run | seeds | own held-out ppl | x teacher | other-domain ppl | x teacher | train s | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in sorted(runs.items(), key=lambda kv: kv[1][0]["final"]["heldout"]):
        own = [r["final"]["heldout"] for r in rs]
        other = [r["final"].get("wiki") for r in rs]
        t_own, t_other = rs[0]["teacher"]["heldout"], rs[0]["teacher"].get("wiki")
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs if x is not None)  # noqa: E731
        lines.append(
            f"| {label} | {len(rs)} | {fmt(own)} | {sum(own) / len(own) / t_own:.2f} | {fmt(other)} | "
            f"{(sum(other) / len(other) / t_other) if t_other and all(other) else float('nan'):.2f} | {rs[0]['train_seconds']:.0f} | "
            # each seed's day when they differ: a seed kept from an earlier sitting may predate a change
            f"{' / '.join(dict.fromkeys(r.get('date', date) for r in rs))} |"
        )
    return lines


def markdown(results: dict) -> str:
    date = results["machine"]["date"][:10]
    lines = [f"# Conversion quality per token ({date}, {results['budget_tokens']:,} tokens per run)", ""]
    if results["runs"]:
        lines += ["## Recipes: the all-Mamba2 student on Shakespeare", "", *_rows(results["runs"], date), ""]
    if results.get("layouts"):
        lines += [f"## Layouts: the default recipe on Brown ({DEFAULT_LAYOUT} is the default job)", "", *_rows(results["layouts"], date), ""]
    lines += ["| target | value | pass |", "|---|---|---|"]
    lines += [f"| {k}: {t['what']} | {t['value']} | {t['pass']} |" for k, t in results["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 recipes, 6 short steps (no layouts: they read Brown, from npm)")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"subset of {list(recipes())}")
    parser.add_argument("--layouts", nargs="*", default=None, help=f"subset of {list(LAYOUTS)} (no names: all); alone, no recipe runs")
    parser.add_argument("--no_second_seed", action="store_true", help="skip the second-seed reruns of close pairs")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="the seed of this sitting's runs; a seed other than 0 adds a run to each chosen recipe's earlier ones (its seed-0 run must be in the results file)",
    )
    args = parser.parse_args(argv)
    groups = {"runs": recipes(), "layouts": layouts()}
    if args.quick and args.layouts is not None:
        parser.error("--quick has no layouts (they train on Brown, from npm; the quick run is CI-sized)")
    if args.quick:
        chosen = {"runs": args.recipes or [p + "+attn_init" for p in PHASES], "layouts": []}
    elif args.recipes is None and args.layouts is None:
        chosen = {"runs": FULL, "layouts": list(LAYOUTS)}
    else:
        chosen = {"runs": args.recipes or [], "layouts": (args.layouts or list(LAYOUTS)) if args.layouts is not None else []}
    for section, labels in chosen.items():
        unknown = [r for r in labels if r not in groups[section]]
        if unknown:
            parser.error(f"unknown {'recipes' if section == 'runs' else 'layouts'} {unknown}; choose from {list(groups[section])}")
    name = "recovery_quick" if args.quick else "recovery"
    extra = budget(args.quick)

    # Every earlier run is kept (a chosen label's run of this sitting's seed is replaced by the new
    # one): a rerun of seed 0 must not drop the seed-1 runs that earlier sittings added.
    found = previous_runs(RESULTS / f"{name}.json", extra, {section: set(every) for section, every in groups.items()})
    if args.seed:
        unseeded = [label for section, labels in chosen.items() for label in labels if not any(_seed(r) == 0 for r in found[section].get(label, []))]
        if unseeded:
            parser.error(f"no seed-0 run of {unseeded} in {name}.json on this budget: run them without --seed first")

    def measure(section: str, label: str, seed: int) -> None:
        runs = found[section]
        new = launch(Run(label, groups[section][label] + extra, seed=seed), name)
        runs[label] = sorted([r for r in runs.get(label, []) if _seed(r) != seed] + [new], key=_seed)

    for section, labels in chosen.items():
        for label in labels:
            measure(section, label, args.seed)
    if not args.no_second_seed and args.seed == 0:
        # Second seeds for this sitting's runs that end close to any other of their group (same
        # corpus, so the same held-out set); other runs' are added in their own sittings (--seed 1).
        for section, runs in found.items():
            finals = {label: r[0]["final"]["heldout"] for label, r in runs.items()}
            close = {a for a, b in itertools.permutations(finals, 2) if abs(finals[a] - finals[b]) <= 0.1 * min(finals[a], finals[b])}
            for label in sorted(label for label in close & set(chosen[section]) if len(runs[label]) < 2):
                measure(section, label, 1)

    measured = [label for labels in chosen.values() for label in labels]
    any_run = next(rs[0] for runs in found.values() for rs in runs.values())
    results = {
        "benchmark": name,
        "machine": machine(),
        "teacher": "smollm2-135m-instruct",
        "budget_tokens": any_run["tokens"],
        "measured_now": measured,
        "budget": extra,
        "runs": found["runs"],
        "layouts": found["layouts"],
    }
    results["targets"] = targets(found["runs"], found["layouts"])
    write_result_files(name, results, markdown(results), plot)


if __name__ == "__main__":
    main()
