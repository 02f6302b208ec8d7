"""Generate text with a converted student (recurrent-state cache), side by side with its teacher.

  cald-scale generate runs/default --prompt "To be, or not to be"
  cald-scale generate runs/default/student --prompt "..." --max_new_tokens 200 --do_sample --top_p 0.9
  cald-scale generate runs/default --prompt "..." --teacher        # the teacher too, same prompt
  cald-scale generate runs/default/bamba --prompt "..."            # a Bamba export (stock transformers)

PATH is a run folder (its student/), an exported student, a Bamba export or any local HF
causal LM. Prints each completion with its decode speed and the memory the cache holds.
A context beyond a model's trained positions is refused for models with attention; a
student of mixers alone takes any length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .conversion.teacher import DTYPES, TeacherConfig, load_teacher
from .generation.cache import state_bytes
from .generation.context import check_context
from .generation.graphs import generate_graphed

__all__ = ["add_arguments", "generate_text", "resolve_model_dir", "run"]


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder -> its exported student; any other folder as it is."""
    folder = Path(path).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a run folder or a model folder)")
    config = json.loads(config_path.read_text())
    if "teacher" in config and "data" in config:  # a run config
        if not (folder / "student" / "config.json").is_file():
            raise FileNotFoundError(f"run folder {folder} has no student/ (it is exported when the run finishes)")
        return folder / "student"
    return folder


@torch.no_grad()
def generate_text(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    *,
    name: str = "the model",
    max_new_tokens: int = 64,
    cuda_graph: bool = False,
    **sampling,
) -> list[dict]:
    """Complete ``prompts`` (one left-padded batch); one dict per prompt: text, tokens, timing.

    ``cuda_graph``: decode through ``generate_graphed`` (a mixers-only student; on CUDA each
    step replays a CUDA graph) instead of ``model.generate``; the same tokens either way.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    check_context(model, batch["input_ids"].shape[1] + max_new_tokens, name)
    start = time.perf_counter()
    if cuda_graph:
        cache = model.new_cache()
        new = generate_graphed(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens, cache=cache,
            eos_token_id=model.generation_config.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling,
        )
    else:
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, **sampling,
        )
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    seconds = time.perf_counter() - start
    memory = state_bytes(cache) if cache is not None else None
    return [
        {
            "model": name,
            "prompt": prompt,
            "completion": tokenizer.decode(tokens, skip_special_tokens=True),
            "new_tokens": int(new.shape[1]),
            "seconds": seconds,
            "tokens_per_s": new.numel() / seconds,
            "cache_bytes": memory,
        }
        for prompt, tokens in zip(prompts, new)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="run folder, exported student, Bamba export or HF causal-LM folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", nargs="?", const="", default=None, metavar="NAME_OR_PATH",
                        help="also generate with the teacher (default: the one the student names)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cuda-graph", choices=["auto", "on", "off"], default="auto",
        help="decode the student by replaying each step as a CUDA graph (a student of mixers alone; "
        "at batch 1 on an H200, 11.9x the eager step). auto: on CUDA for such a student",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def _graphed_decode(model, mode: str) -> bool:
    """Whether the student decodes through ``generate_graphed``: ``on`` insists (a hybrid, another
    model or a CPU device is an error), ``auto`` takes it on CUDA for a student of mixers alone."""
    new_cache = getattr(model, "new_cache", None)
    mixers_only = new_cache is not None and not new_cache().has_attention
    if mode == "on":
        if not mixers_only:
            raise ValueError("--cuda-graph on: only a converted student of mixers alone decodes as a CUDA graph (a kept attention layer's KV cache grows every step)")
        if model.device.type != "cuda":
            raise ValueError(f"--cuda-graph on: CUDA graphs need --device cuda, not {model.device}")
        return True
    return mode == "auto" and mixers_only and model.device.type == "cuda"


def run(args: argparse.Namespace) -> int:
    import cald_scale  # noqa: F401  (registers the student classes with the Auto classes)

    folder = resolve_model_dir(args.path)
    dtype = DTYPES[args.dtype]
    sampling = {"do_sample": args.do_sample}
    sampling |= {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    models = [("student", lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), folder)]
    if args.teacher is not None:
        named = args.teacher or json.loads((folder / "config.json").read_text()).get("teacher_name_or_path")
        if not named:
            raise ValueError(f"{folder} does not name its teacher: pass --teacher NAME_OR_PATH")
        models.append(("teacher", lambda: load_teacher(TeacherConfig(name_or_path=named, dtype=args.dtype))[0], named))
    results = []
    for name, load, source in models:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load().to(args.device).eval()
        graph = name == "student" and _graphed_decode(model, args.cuda_graph)
        torch.manual_seed(args.seed)
        rows = generate_text(model, tokenizer, args.prompt, name=f"the {name}", max_new_tokens=args.max_new_tokens, cuda_graph=graph, **sampling)
        for row in rows:
            cache = row["cache_bytes"]
            held = f", cache {sum(cache.values()) / 2**20:.2f} MiB" if cache else ""
            print(f"--- {name} ({source}): {row['tokens_per_s']:.1f} new tokens/s{held}\n{row['prompt']}{row['completion']}\n")
        results.extend(rows)
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
