"""Console entry points. `linear-moe-pretrain [CONFIG.yaml] [key.path=value ...]` (default config: the embedded
demo, configs/demo_cpu.yaml); `--print-config` prints the resolved config and exits. Bad input exits with code 2 and
one message naming the field, before anything is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib import resources

import yaml

DEMO_CONFIG = "demo_cpu.yaml"
# Megatron-Core warns at import when Transformer Engine or apex is absent; that is a supported setup (local specs).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linear-moe-pretrain",
        description="Pretrain a hybrid linear-mixer / MoM / attention model on Megatron-Core. "
                    "Launch with torchrun for several processes.")
    p.add_argument("config", nargs="?", help=f"YAML config (default: the embedded {DEMO_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.steps=20")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def _load(args):
    """The validated config of this run (the embedded demo when no file is given)."""
    from linear_moe.config import load_config

    config, overrides = args.config, list(args.overrides)
    # `linear-moe-pretrain train.steps=5`: the first positional is an override, not a file.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    if config is None:
        with resources.as_file(resources.files("linear_moe.configs") / DEMO_CONFIG) as path:
            cfg = load_config(path, overrides)
    else:
        cfg = load_config(config, overrides)
    # The world size is known before any process group exists (torchrun sets it), so combinations that depend on
    # it fail here, before a run directory is created.
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.checkpoint.load:
        from linear_moe.training.checkpoint import find_latest

        find_latest(cfg.checkpoint.load)
    return cfg


def pretrain_main(argv: list[str] | None = None) -> int:
    from linear_moe.config import ConfigError, to_dict

    args = _parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"linear-moe-pretrain: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from linear_moe.training import pretrain

    try:
        result = pretrain(cfg)
    except FloatingPointError as e:  # a diverged run: one line, not a traceback
        print(f"linear-moe-pretrain: error: {e}", file=sys.stderr)
        return 1
    if rank == 0 and result.evals:
        last = result.evals[max(result.evals)]
        print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    return 0


def preprocess_main(argv: list[str] | None = None) -> int:
    """`linear-moe-preprocess`: tokenize text into Megatron indexed datasets (the data module's entry point)."""
    from linear_moe.data.preprocess import main

    return main(argv)


def generate_main(argv: list[str] | None = None) -> int:
    """`linear-moe-generate`: decode from a checkpoint (the generation module's entry point)."""
    from linear_moe.generation import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(pretrain_main())
