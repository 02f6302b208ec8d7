"""Shared pieces of the benchmark scripts: model geometries, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

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


def llama_teacher(num_layers: int, seed: int = 0):
    """A randomly initialised Llama of SmolLM2-135M geometry (speed and memory depend only on shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_GEOMETRY, "num_hidden_layers": num_layers})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def machine() -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, result: dict, out: str | None = None) -> Path:
    """Write ``result`` as JSON (default benchmarks/results/<name>.json) and print it."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path
