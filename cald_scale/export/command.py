"""Export a trained student to a native architecture (Bamba), loadable with stock transformers.

  cald-scale export runs/default --bamba runs/default/bamba
  cald-scale export runs/default/student --bamba /models/smollm2-mamba2-bamba

PATH is a run folder (its student/) or an exported student folder. A Llama-family
student (llama, mistral, qwen2) with Mamba2 mixers, all layers or a hybrid, becomes a
``BambaForCausalLM`` folder (safetensors, tokenizer, the kept attention layers as
attn_layer_indices). Other layouts are refused with the reason; they load through
``import cald_scale`` + ``AutoModelForCausalLM.from_pretrained(student_folder)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..generate import resolve_model_dir
from .bamba import export_bamba

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="run folder or exported student folder")
    parser.add_argument("--bamba", type=Path, required=True, metavar="OUT", help="write the Bamba folder here")


def run(args: argparse.Namespace) -> int:
    target = export_bamba(resolve_model_dir(args.path, "export"), args.bamba)
    print(f"wrote {target} (BambaForCausalLM; loads with AutoModelForCausalLM.from_pretrained, no cald_scale)")
    return 0


if __name__ == "__main__":  # `python -m cald_scale.export.command ...`: the same as `cald-scale export ...`
    import sys

    from cald_scale.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
