"""Generate text with a converted student (recurrent-state cache), side by side with its teacher.

  cald-scale generate runs/default --prompt "To be, or not to be"
  cald-scale generate runs/default/student --prompt "..." --max_new_tokens 200 --do_sample --top_p 0.9
  cald-scale generate runs/default --prompt "..." --teacher        # the teacher too, same prompt
  cald-scale generate runs/default/bamba --prompt "..."            # a Bamba export (stock transformers)

PATH is a run folder (its student/), an exported student, a Bamba export or any local HF
causal LM. Prints, per model, the prompt's prefill time, the decode throughput over the batch
and the memory its cache holds, then each completion.
A context beyond a model's trained positions is refused for models with attention; a
student of mixers alone takes any length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, StaticLayer

from .cli import check_output_file, device_arg, positive_float, positive_int, probability
from .conversion.modeling import CaldStudentConfig
from .conversion.teacher import DTYPES, TeacherConfig, build_teacher, dtype_name, dtype_of, open_teacher
from .conversion.weights import check_complete
from .engines.checkpoint import MANIFEST
from .evaluate import RUN_EXPORTS, refuse_classifier, resolve_target, run_of
from .fileio import atomic_write_text, read_json
from .generation.cache import state_bytes
from .generation.context import check_context
from .generation.graphs import generate_graphed, graph_unsupported

__all__ = ["add_arguments", "generate_text", "resolve_model_dir", "resolve_dtype", "run"]

KV_CACHES = ("dynamic", "static")


def resolve_model_dir(path: str | Path, command: str = "generate") -> Path:
    """A run folder -> its exported student; any other folder as it is. A training checkpoint
    and a sequence classifier are refused, naming what they are."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'} (expected a run folder or a model folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / MANIFEST).is_file() or any((child / MANIFEST).is_file() for child in folder.glob("step_*")):
            run_dir = folder.parent.parent if (folder / MANIFEST).is_file() else folder.parent
            raise FileNotFoundError(
                f"{folder} holds training checkpoints (DeepSpeed's partitioned state), not a model folder: give the run "
                f"folder ({run_dir}), whose student/ is exported when the run finishes"
            )
        raise FileNotFoundError(f"{folder} has no config.json (expected a run folder or a model folder)")
    config = read_json(config_path)
    refuse_classifier(folder, config, command)
    if "teacher" in config and "data" in config:  # a run config
        if not (folder / "student" / "config.json").is_file():
            raise FileNotFoundError(f"run folder {folder} has no student/ (it is exported when the run finishes)")
        return folder / "student"
    return folder


class _FirstTokenClock(LogitsProcessor):
    """Notes when the first token's scores exist: the prompt's forward (prefill) has run."""

    def __init__(self, device: torch.device):
        self.device, self.at = device, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()
        return scores


def _ended_lengths(new: torch.Tensor, eos_token_id) -> list[int]:
    """Per sequence, the new tokens up to and including its first end-of-sequence token (what
    follows is padding while the rest of the batch decodes)."""
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    ended = torch.isin(new, torch.tensor(eos, device=new.device)) if eos else torch.zeros_like(new, dtype=torch.bool)
    return [int(row.nonzero()[0]) + 1 if row.any() else new.shape[1] for row in ended]


@torch.no_grad()
def generate_text(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    *,
    name: str = "the model",
    max_new_tokens: int = 64,
    cuda_graph: bool = False,
    kv_cache: str = "dynamic",
    **sampling,
) -> list[dict]:
    """Complete ``prompts`` (one left-padded batch); one dict per prompt: its text and new
    tokens, and the batch's timing (prefill, then decode) and cache memory.

    ``cuda_graph``: decode through ``generate_graphed`` (a converted student; on CUDA each step
    replays a CUDA graph; a hybrid's kept attention preallocates its KV cache whatever
    ``kv_cache`` says) instead of ``model.generate``; the same tokens either way.
    ``kv_cache``: "static" preallocates the KV cache of every attention layer (a teacher's, a
    hybrid's kept layers) for the whole generation and writes it in place
    (``cache_implementation="static"``); "dynamic" grows it, copying it at every token.
    """
    # NOTE: left padding (and a pad token) for this call only; the caller's tokenizer is left as it was.
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        pad_token_id = tokenizer.pad_token_id
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    check_context(model, batch["input_ids"].shape[1] + max_new_tokens, name)
    clock = _FirstTokenClock(model.device)
    eos_token_id = model.generation_config.eos_token_id
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    start = time.perf_counter()
    if cuda_graph:
        # NOTE: a hybrid's kept attention replays over a KV cache preallocated for the whole generation
        # (a student of mixers alone ignores the length).
        cache = model.new_cache(batch["input_ids"].shape[1] + max_new_tokens)
        new = generate_graphed(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens, cache=cache,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, logits_processor=[clock], **sampling,
        )
    else:
        # NOTE: the cache asked for wins over one a model's generation config names (passed only
        # then: a model without a cache, a Bamba export of mixers alone, warns at any setting); never
        # compiled (transformers would compile a teacher with a static cache on a GPU, not the
        # student, and the rates would compare compilation, not caches).
        named = kv_cache == "static" or model.generation_config.cache_implementation is not None
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, disable_compile=True,
            return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]),
            **({"cache_implementation": kv_cache} if named else {}), **sampling,
        )
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    end = time.perf_counter()
    memory = state_bytes(cache) if cache is not None else None
    sequences, steps = new.shape
    decode_s = end - clock.at
    # NOTE: the first new token comes from the prefill's logits; each later one is a decode step
    # for the whole batch (ended sequences included, as padding).
    timing = {
        "batch": sequences,
        "prompt_tokens": batch["input_ids"].shape[1],
        "prefill_s": clock.at - start,
        "decode_steps": steps - 1,
        "decode_s": decode_s,
        "decode_tokens_per_s": sequences * (steps - 1) / decode_s if steps > 1 and decode_s > 0 else None,
        "seconds": end - start,
        "cache_bytes": memory,
        # What the attention layers' KV cache actually was (None: no attention layer).
        "kv_cache": _kv_kind(cache),
        "cache_bytes_per_sequence": sum(memory.values()) / sequences if memory else None,
        "dtype": dtype_name(model.dtype),
    }
    return [
        {"model": name, "prompt": prompt, "completion": tokenizer.decode(tokens, skip_special_tokens=True), "new_tokens": length, **timing}
        for prompt, tokens, length in zip(prompts, new, _ended_lengths(new, eos_token_id))
    ]


def _kv_kind(cache) -> str | None:
    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, CacheLayerMixin)]
    if not layers:
        return None
    return "static" if all(isinstance(layer, StaticLayer) for layer in layers) else "dynamic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="run folder, exported student, Bamba export or HF causal-LM folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=positive_float, default=None, help="with --do_sample")
    parser.add_argument("--top_p", type=probability, default=None, help="with --do_sample")
    parser.add_argument("--top_k", type=positive_int, default=None, help="with --do_sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--teacher", nargs="?", const="", default=None, metavar="NAME_OR_PATH",
                        help="also generate with the teacher (default: the run's teacher, or the one the student names)")
    parser.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
        help="compute dtype of student and teacher. auto (default): on a GPU, the precision the model trained in (a run's, "
        "as `cald-scale evaluate` scores it; another folder's saved dtype); float32 on CPU",
    )
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--cuda-graph", "--cuda_graph", dest="cuda_graph", choices=["auto", "on", "off"], default="auto",
        help="decode the student by replaying each step as a CUDA graph (mixers alone at batch 1 on an H200: 11.9x the "
        "eager step; a hybrid's kept attention then preallocates its KV cache and needs sdpa or eager attention). "
        "auto: on CUDA for a student of mixers alone (a hybrid's graphed step has yet to run on a GPU: `on` asks for it)",
    )
    parser.add_argument(
        "--kv-cache", "--kv_cache", dest="kv_cache", choices=KV_CACHES, default="dynamic",
        help="attention layers' KV cache (the teacher's, a hybrid's kept layers'): grown token by token, copying itself "
        "each step (dynamic, transformers' default), or preallocated for the whole generation and written in place "
        "(static: a fair decode rate for long generations)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def resolve_dtype(name: str, path: str | Path, device: torch.device | str) -> str:
    """``--dtype``: as given, or for ``auto`` the precision the model at ``path`` trained in when
    it runs on a GPU: a run's (its folder or its student/; the ``teacher.dtype`` its config.json
    records, what `cald-scale evaluate` scores in), else the dtype its config.json was saved in;
    float32 where the GPU has no bf16. float32 on CPU, where it is the reference and bf16 decodes
    no faster."""
    if name != "auto":
        return name
    if torch.device(device).type != "cuda":
        return "float32"
    folder = Path(path).expanduser().resolve()
    run = run_of(folder)
    if run is not None:
        chosen = dtype_name(dtype_of(read_json(run / "config.json")["teacher"].get("dtype", "auto")))
    else:
        saved = read_json(folder / "config.json")
        saved = saved.get("dtype") or saved.get("torch_dtype")
        chosen = saved if saved in DTYPES else "float32"
    if chosen == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float32"
    return chosen


def _graphed_decode(model, mode: str) -> bool:
    """Whether the student decodes through ``generate_graphed``: ``on`` insists (another model, a
    step that cannot be replayed or a CPU device is an error), ``auto`` takes it on CUDA for a
    student of mixers alone. NOTE: a hybrid's graphed step (its kept attention over a preallocated
    KV cache) is checked on CPU and has yet to run on a GPU: only ``on`` asks for it there."""
    if getattr(model, "new_cache", None) is None:
        if mode == "on":
            raise ValueError(
                f"--cuda-graph on: only a cald_scale student decodes as a CUDA graph; this is a {model.config.model_type} model "
                "(a Bamba export or another HF model decodes through generate)"
            )
        return False
    why_not = graph_unsupported(model)
    if mode == "on":
        if why_not:
            raise ValueError(f"--cuda-graph on: {why_not}")
        if model.device.type != "cuda":
            raise ValueError(f"--cuda-graph on: CUDA graphs need --device cuda, not {model.device}")
        return True
    hybrid = getattr(model.config, "kept_attention", False)
    return mode == "auto" and why_not is None and not hybrid and model.device.type == "cuda"


def _sampling(args: argparse.Namespace) -> dict:
    """generate's sampling options; a sampling setting without --do_sample is an error, not ignored."""
    given = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    if given and not args.do_sample:
        flags = ", ".join("--" + k for k in given)
        raise ValueError(f"{flags} {'applies' if len(given) == 1 else 'apply'} to sampling: add --do_sample (the default is greedy)")
    return {"do_sample": args.do_sample, **given}


def _teacher_source(args: argparse.Namespace, folder: Path):
    """The teacher to run beside the student and its own tokenizer, opened now (a wrong name
    fails before any generation): the run's own teacher settings for a run folder, else the
    name the student records, --teacher NAME overriding either."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") in RUN_EXPORTS.values():  # a student, or its Bamba export: they name their teacher
        remedy = "give it as --teacher NAME_OR_PATH"
        teacher = resolve_target(args.path, teacher=args.teacher or None, remedy=remedy, check_weights=False).teacher  # run() checked them
    elif args.teacher:
        teacher = TeacherConfig(name_or_path=args.teacher)
    else:
        raise ValueError(f"{folder} does not name its teacher: pass --teacher NAME_OR_PATH")
    return open_teacher(dataclasses.replace(teacher, dtype=args.dtype))


def _check_causal(folder: Path, config) -> None:
    """Refuse a folder whose saved model is no causal LM (a bare encoder such as BertModel):
    transformers would load it with a new, random language-model head and generate noise."""
    saved = getattr(config, "architectures", None) or []
    if saved and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in saved):
        raise ValueError(
            f"{folder} holds a {saved[0]} ({config.model_type}), not a causal LM: `cald-scale generate` needs a model "
            "saved with its language-model head (a *ForCausalLM)"
        )


def _label(config) -> str:
    """What the model in PATH is, as the output names it: a converted student, its Bamba export,
    or another HF causal LM."""
    return {CaldStudentConfig.model_type: "student", "bamba": "Bamba export"}.get(config.model_type, "model")


def _summary(name: str, source, row: dict) -> str:
    """One line: prefill, decode throughput over the batch, the cache's memory."""
    decode = f"{row['decode_tokens_per_s']:.1f} tokens/s ({row['batch']} x {row['decode_steps']} steps)" if row["decode_tokens_per_s"] else "no decode steps"
    cache = row["cache_bytes"]
    held = f", cache {sum(cache.values()) / 2**20:.2f} MiB ({row['cache_bytes_per_sequence'] / 2**20:.2f} per sequence)" if cache else ""
    return f"=== {name} ({source}, {row['dtype']}): prefill {row['prefill_s']:.2f} s ({row['batch']} x {row['prompt_tokens']} tokens), decode {decode}{held}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _own_tokenizer(folder):
    """The tokenizer saved with a model folder; one without (a folder copied without it) is named,
    not left to transformers' message about sentencepiece or tiktoken."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the teacher's tokenizer files into it "
            "(a run's student/ and `cald-scale export` write them)"
        )
    return AutoTokenizer.from_pretrained(folder)


def run(args: argparse.Namespace) -> int:
    import cald_scale  # noqa: F401  (registers the student classes with the Auto classes)

    empty = [i + 1 for i, prompt in enumerate(args.prompt) if not prompt.strip()]
    if empty:
        raise ValueError(f"--prompt {', '.join(map(str, empty))} is empty: a completion needs some text to start from")
    check_output_file(args.json)
    sampling = _sampling(args)
    folder = resolve_model_dir(args.path)
    check_complete(folder)  # a weight file cut short: named in one line, before any model loads
    args.dtype = resolve_dtype(args.dtype, args.path, args.device)
    dtype = DTYPES[args.dtype]
    # (name, config, tokenizer, load, where): each model with its own tokenizer
    config = AutoConfig.from_pretrained(folder)
    _check_causal(folder, config)
    models = [(_label(config), config, _own_tokenizer(folder), lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), folder)]
    if args.teacher is not None:
        source, teacher_tokenizer = _teacher_source(args, folder)
        models.append(("teacher", source.config, teacher_tokenizer, lambda: build_teacher(source), source.name))
    # Every context is checked before any model loads (the teacher's too: a refusal after the
    # student's completion would lose it).
    for name, config, tokenizer, _, _ in models:
        longest = max(len(ids) for ids in tokenizer(args.prompt)["input_ids"])
        check_context(config, longest + args.max_new_tokens, f"the {name}",
                      remedy=f"the longest prompt is {longest} tokens and --max_new_tokens adds {args.max_new_tokens}")
    results = []
    for name, _, tokenizer, load, where in models:
        model = load().to(args.device).eval()
        graph = name != "teacher" and _graphed_decode(model, args.cuda_graph)
        torch.manual_seed(args.seed)
        rows = generate_text(
            model, tokenizer, args.prompt, name=f"the {name}", max_new_tokens=args.max_new_tokens, cuda_graph=graph,
            kv_cache=args.kv_cache, **sampling,
        )
        print(_summary(name, where, rows[0]))
        for row in rows:
            print(f"--- {row['new_tokens']} new tokens\n{row['prompt']}{row['completion']}\n")
        results.extend(rows)
        del model
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
