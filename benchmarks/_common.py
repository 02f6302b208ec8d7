"""Shared pieces of the benchmark scripts: model geometries, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from cald_scale.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The all-Mamba2 student on Shakespeare: the default job until 2026-12-03, when the default
# became the 25% attention hybrid on the Brown corpus. The benchmarks of recipes, guidance,
# speed and memory measure the all-Mamba2 conversion, so they pin it rather than follow the
# default (their committed tables stay reproducible, and no run of theirs needs npm).
ALL_MAMBA2_ON_SHAKESPEARE = ["student.conversion.attention_every=0", "data.corpus=shakespeare"]

# SmolLM2-135M geometry (the embedded default teacher).
SMOLLM2_GEOMETRY = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    num_hidden_layers=30,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


# Real model geometries (random weights: memory and speed depend only on shapes).
GEOMETRIES: dict[str, dict] = {
    "SmolLM2-135M": dict(model_type="llama", **SMOLLM2_GEOMETRY),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=24,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=16,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True,
    ),
}


def free_port() -> int:
    """A TCP port free on this machine now, for a launch's --master_port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**overrides: str) -> dict:
    """The environment for a benchmark's child process: this one's, with the repository put first
    on PYTHONPATH and the caller's entries kept after it.

    NOTE: a child given PYTHONPATH=REPO alone loses what the parent found through PYTHONPATH; on
    the lent GPU that is every carried wheel (deepspeed, the tested transformers), and the first
    GPU run's distillation items failed on `import deepspeed` for it (2026-12-04).
    """
    inherited = os.environ.get("PYTHONPATH")
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), inherited])), **overrides)


def write_random_teacher(geometry: str, folder: Path, *, shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    """A HF folder (config, small tokenizer, sharded bf16 safetensors) with random weights of a real geometry.

    Written tensor by tensor from a meta-device model, so even a billion-parameter
    checkpoint needs one shard of memory, not one model. Reused when already complete and of
    today's geometry (one written before GEOMETRIES changed is written again).
    """
    import json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    params = dict(GEOMETRIES[geometry])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    if (folder / "model.safetensors.index.json").is_file():
        saved = json.loads((folder / "config.json").read_text())
        wanted = json.loads(config.to_json_string())  # as save_pretrained writes it
        byte_level = "ByteLevel" in (folder / "tokenizer.json").read_text() if (folder / "tokenizer.json").is_file() else False
        if byte_level and all(saved.get(key) == wanted.get(key) for key in (saved.keys() | wanted.keys()) - {"transformers_version"}):
            return folder
        shutil.rmtree(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
        shard.clear()

    seen = set()
    for name, tensor in meta.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # the tied head
            continue
        seen.add(id(tensor))
        value = torch.ones(tensor.shape) if tensor.dim() == 1 else torch.randn(tensor.shape, generator=gen) * 0.02
        shard[name] = value.to(torch.bfloat16)
        if sum(v.numel() * 2 for v in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    byte_level_tokenizer().save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def byte_level_tokenizer():
    """A 257-token tokenizer (the 256 bytes and <eos>), byte-level BPE with no merges: every
    family's tokenizer class loads it from its tokenizer.json (Qwen2's included, which builds an
    empty tokenizer from a word-level one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={**{ch: i for i, ch in enumerate(alphabet)}, "<eos>": len(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def llama_teacher(num_layers: int, seed: int = 0):
    """A randomly initialised Llama of SmolLM2-135M geometry (speed and memory depend only on shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_GEOMETRY, "num_hidden_layers": num_layers})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def _cpu_model() -> str | None:
    """The CPU's model name (Linux): ratios between machines of one architecture still differ by it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)


def machine() -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def overall_pass(targets: dict[str, dict]) -> bool | None:
    """A result's verdict: every target that applies to this run passes (a target marked
    ``applies: false`` is reported, not scored); None when none applies (nothing was scored)."""
    scored = [t["pass"] for t in targets.values() if t.get("applies", True)]
    return all(scored) if scored else None


PARSE_ONLY = os.environ.get("CALD_BENCH_PARSE_ONLY") == "1"
"""gpu_check.sh's rehearsal of its own command lines (GPU_CHECK_PARSE_ONLY=1): each benchmark
checks the flags it is given, as on the GPU (--device cuda included), and runs nothing."""


def status_bytes(field: str) -> int:
    """A byte count of this process from /proc/self/status ("VmRSS", "VmHWM": the resident memory
    and its high-water mark); 0 where there is none (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak read next covers only what
    follows; False where it cannot be (not Linux, not permitted). NOTE: it also lowers what
    getrusage reports as the process's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def output_file(text: str) -> Path:
    """An argparse type: a result file to write, refused when it names a folder (found at the
    end of a run, it cost the whole measurement: atomic_write_text's rename onto a folder)."""
    import argparse

    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name the JSON file to write")
    return Path(text)


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated sizes ("512,2048"), each >= 1."""
    import argparse

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated whole numbers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes sizes >= 1, got {text!r}")
    return values


def sync(device) -> None:
    """Wait for ``device``'s queued work (a CUDA device's kernels run asynchronously); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def no_cuda_for(device) -> bool:
    """``--device cuda`` asked for where there is none (never, when only parsing)."""
    import torch

    return str(device).startswith("cuda") and not torch.cuda.is_available() and not PARSE_ONLY


def stop_if_parse_only(args) -> None:
    if PARSE_ONLY:
        print("parsed:", json.dumps(vars(args), default=str))
        raise SystemExit(0)


def write_result(name: str, result: dict, out: str | None = None) -> Path:
    """Write ``result`` as JSON (default benchmarks/results/<name>.json) and print it."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: atomic: a benchmark cut by its time cap while writing keeps its previous result whole.
    atomic_write_text(path, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path


def save_partial(result: dict, path: str | Path | None, *, done: str) -> None:
    """``result`` so far, marked partial (``done``: what it holds), written where the final one
    goes: a step cut by its time cap (a lent GPU's few minutes) keeps what it measured. Not printed.
    ``path``: the run's explicit ``--out``; None (a default result file, maybe a committed one,
    which a run cut short must not replace) saves nothing."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps({**result, "partial": done}, indent=2))


def write_result_files(name: str, result: dict, markdown: str, plot=None) -> None:
    """benchmarks/results/<name>.json and .md, and .png when ``plot(result, path)`` is given."""
    write_result(name, result)
    (RESULTS / f"{name}.md").write_text(markdown)
    if plot is not None:
        plot(result, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.{{json,md{',png' if plot else ''}}}")


def narrow_geometry(geometry: str) -> str:
    """The name of ``geometry`` at width 64 (two attention heads of 32, one key/value head, a
    128-wide MLP), its depth and vocabulary kept, registered in GEOMETRIES. Its arithmetic is
    negligible, so a step's time is host work (op dispatch, ZeRO-3's per-module hooks): on CPU,
    a proxy for a GPU step at these sizes, which is bound by the same work."""
    name = f"{geometry}-narrow"
    GEOMETRIES.setdefault(name, {**GEOMETRIES[geometry], "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    GEOMETRIES[name].pop("head_dim", None)  # hidden / heads
    return name


def truncated_geometry(geometry: str, num_layers: int) -> str:
    """The name of ``geometry`` cut to its first ``num_layers`` blocks, registered in GEOMETRIES
    (quick runs: same widths and vocabulary, fewer blocks; ``write_random_teacher`` takes the name)."""
    if num_layers >= GEOMETRIES[geometry]["num_hidden_layers"]:
        return geometry
    name = f"{geometry}-{num_layers}L"
    GEOMETRIES.setdefault(name, {**GEOMETRIES[geometry], "num_hidden_layers": num_layers})
    return name
