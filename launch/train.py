"""Entry point: `deepspeed launch/train.py --ds_config ds_configs/zero3.json [--recipe R.yaml] [key.path=value ...]`.

With no recipe the embedded default runs: SmolLM2-135M -> Mamba2 on Shakespeare.
"""

from __future__ import annotations

import argparse
import sys

from cald_scale.config import ConfigError, load_run_config
from cald_scale.train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config (ZeRO-3)")
    parser.add_argument("--recipe", default=None, help="YAML recipe; the embedded default when omitted")
    parser.add_argument("--print_config", action="store_true", help="print the resolved run config and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.recipe, args.overrides)
    except ConfigError as err:  # one line that names the key, not a traceback
        parser.exit(2, f"config error: {err}\n")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    train(cfg, args.ds_config)


if __name__ == "__main__":
    sys.exit(main())
