# Data config: which corpus to read, how it is tokenised, split, capped and packed.
from __future__ import annotations

from dataclasses import dataclass, field

from cald_scale.config_loader import INFINITE_OK
from cald_scale.data.corpora import absolute_corpus
from cald_scale.fileio import work_cache_dir

__all__ = ["DataConfig"]


@dataclass(kw_only=True)
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length token sequences.

    The corpus is tokenised once into two megatron indexed datasets (train / eval) under
    `cache_dir`; `seq_len` only matters when the token stream is packed, so changing it
    reuses the cache.
    """

    corpus: str = "brown"
    """What to read (default: the Brown corpus, general English in 15 genres; a model trained
    on Shakespeare alone scored 32x its teacher's perplexity on Wikipedia, the same run on
    Brown 5.3x: benchmarks/results/domain_gap.json, default_recipe_on_brown.json). One of: a built-in corpus name ("shakespeare", "wiki", "brown"); a path, glob
    or comma-separated list of local .txt / .json / .jsonl / .parquet files (loaded with
    `datasets`; a .txt file is cut into documents, see txt_document_chars); a megatron
    indexed-dataset prefix whose .bin and .idx exist (used as is, no tokenisation); or a
    Hugging Face hub dataset id ("org/name", or "hf:<id>[:<config>]"; needs network
    access)."""

    txt_document_chars: int | None = 16384
    """A local .txt file is split into documents of consecutive paragraphs (blank-line
    separated) of about this many characters, never splitting a paragraph (a paragraph
    longer than this is its own document), so one big file still has documents to hold
    out. null: one document per file. The built-in corpora keep their own documents."""

    text_field: str = "text"
    """Column holding the document text in .json / .jsonl / .parquet / hub datasets
    (.txt files and the built-in corpora have a single text column)."""

    seq_len: int = 256
    """Tokens per packed training / eval sequence (the model shifts labels itself)."""

    eval_fraction: float = 0.05
    """Fraction of DOCUMENTS held out for evaluation (chosen by a seeded shuffle; for an
    existing indexed dataset, its last documents). 0 holds out nothing: the job's held-out
    scores then need data.eval_corpus (without it the job stops, naming both)."""

    eval_corpus: str | None = None
    """Held-out text scored instead of the corpus's own held-out documents; any value
    data.corpus accepts. When set, the whole of data.corpus trains (no documents held
    out, eval_fraction unused) and the eval split is a seeded document shuffle of
    eval_corpus, capped by max_eval_tokens. Each corpus is cached under its own key."""

    max_train_tokens: int | None = None
    """Cap on the train split's tokens (None: no cap). For quick runs: tokenisation stops
    once both caps are reached."""

    max_eval_tokens: int | None = None
    """Cap on the eval split's tokens (None: no cap)."""

    cache_dir: str | None = None
    """Folder holding the tokenised corpora, one sub-folder per cache key. None:
    ``$CALD_SCALE_CACHE/data`` when that is set, else ``.cache/cald_scale/data`` under the
    working folder (the run records the folder it resolved to)."""

    seed: int = 0
    """Seed of the document shuffle that picks the eval documents and the write order."""

    append_eos: bool = True
    """Append the tokenizer's eos token after every document, so packed sequences that
    span a document boundary see the separator."""

    wait_timeout_s: float = field(default=4 * 3600.0, metadata=INFINITE_OK)
    """How long ranks other than 0 wait for rank 0 to tokenise the corpus (they poll the file
    system, outside any collective; .inf: as long as it takes). For a large corpus run
    `cald-scale prepare-data` first."""

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise ValueError(f"data.corpus must be a non-empty string, got {self.corpus!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty string, got {self.text_field!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(
                f"data.seq_len must be an int >= 2 (the model predicts token t+1 from t), "
                f"got {self.seq_len!r}"
            )
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)):
            raise ValueError(f"data.eval_fraction must be a float, got {self.eval_fraction!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.eval_corpus is not None and (
            not isinstance(self.eval_corpus, str) or not self.eval_corpus.strip()
        ):
            raise ValueError(
                f"data.eval_corpus must be None or a non-empty string, got {self.eval_corpus!r}"
            )
        self.corpus = absolute_corpus(self.corpus)
        if self.eval_corpus is not None:
            self.eval_corpus = absolute_corpus(self.eval_corpus)
        for name in ("txt_document_chars", "max_train_tokens", "max_eval_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be None or an int >= 1, got {value!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"data.cache_dir must be null or a non-empty path, got {self.cache_dir!r}")
        self.cache_dir = work_cache_dir(self.cache_dir, "data")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed must be an int >= 0, got {self.seed!r}")
        if isinstance(self.wait_timeout_s, bool) or not isinstance(self.wait_timeout_s, (int, float)) or self.wait_timeout_s <= 0:
            raise ValueError(f"data.wait_timeout_s must be a number of seconds > 0, got {self.wait_timeout_s!r}")
        if not isinstance(self.append_eos, bool):
            raise ValueError(f"data.append_eos must be a bool, got {self.append_eos!r}")
