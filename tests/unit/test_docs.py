"""The README and docs/ pages: every relative link and anchor resolves, and the tables that
benchmarks write into the README still have their markers (a writer finding none writes nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path):
        heading = re.match(r"#{1,6} (.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [target for line in _prose(path) for target in LINK.findall(line) if not re.match(r"[a-z]+:", target)]


def test_the_anchor_rule_is_githubs():
    page = REPO / "README.md"
    assert "quick-start-the-two-commands" in anchors(page) and "documentation" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_readme_keeps_the_markers_inference_speed_writes_between():
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_speed", REPO / "benchmarks" / "inference_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.README.read_text()
    begin, end = module.MARKERS
    assert module.README == REPO / "README.md" and text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)


def _shell_commands(path: Path) -> list[list[str]]:
    """The commands of the page's bash blocks, split as the shell splits them (comments dropped,
    continued lines joined)."""
    import shlex

    commands, block, fenced = [], None, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            block = [] if fenced and line.strip() in ("```bash", "```sh") else None
            continue
        if block is None:
            continue
        if block and block[-1].endswith("\\"):
            block[-1] = block[-1][:-1] + " " + line
        else:
            block.append(line)
        if not line.endswith("\\"):
            tokens = shlex.split(block[-1], comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def _train_command(tokens: list[str]) -> tuple[dict, list[str]] | None:
    """(environment, the arguments given to launch/train.py or a SLURM batch script) of a
    training command line; None for any other command."""
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    for i, token in enumerate(tokens):
        if token in ("launch/train.py", "cald_scale.launch") or token.startswith("launch/slurm/"):
            return env, tokens[i + 1 :]
    return None


DOC_COMMANDS = [(page, tokens) for page in PAGES for tokens in _shell_commands(page)]


def test_the_docs_show_training_and_cald_scale_commands():
    kinds = {("train" if _train_command(list(t)) else t[0]) for _, t in DOC_COMMANDS}
    assert {"train", "cald-scale", "python"} <= kinds, kinds


@pytest.mark.parametrize("page,tokens", DOC_COMMANDS, ids=[f"{p.relative_to(REPO).as_posix()}:{' '.join(t)[:60]}" for p, t in DOC_COMMANDS])
def test_every_documented_command_parses_with_real_files_and_config_keys(page, tokens, monkeypatch):
    """Each command a page shows: its scripts, recipes and ds_configs exist, its key=value
    overrides are run-config keys with valid values (as `launch/train.py --print_config` checks
    them, ds_config included), and a cald-scale subcommand takes its flags."""
    from cald_scale.config import load_run_config
    from cald_scale.train import check_ds_config

    monkeypatch.chdir(REPO)
    train = _train_command(list(tokens))
    if train is not None:
        from cald_scale.engines.ds_config import ds_config_file
        from cald_scale.launch import build_parser

        env, args = train
        if env.get("RECIPE"):
            args = ["--recipe", env["RECIPE"], *args]
        if env.get("DS_CONFIG"):
            args = ["--ds_config", env["DS_CONFIG"], *args]
        args = build_parser().parse_intermixed_args(args)  # launch/train.py's own parser: a wrong option exits
        assert all("=" in arg and not arg.startswith("-") for arg in args.overrides), args.overrides
        assert args.recipe is None or (REPO / args.recipe).is_file(), args.recipe
        assert ds_config_file(args.ds_config).is_file()
        check_ds_config(load_run_config(args.recipe, args.overrides), args.ds_config)
    elif tokens[0] == "cald-scale":
        from cald_scale.cli import parse_args

        if "--device" in tokens and "cuda" in tokens[tokens.index("--device") + 1]:
            pytest.skip("a CUDA device to parse --device cuda")
        parse_args(tokens[1:])
    elif tokens[0] in ("python", "python3", "bash") and tokens[1].endswith((".py", ".sh")):
        assert (REPO / tokens[1]).is_file(), tokens[1]
