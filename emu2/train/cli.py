"""``emu2 train RECIPE [key=value ...] [--resume]``: run one training stage from a recipe.

Single process: ``emu2 train shapes-stage1``. Several processes or GPUs: ``accelerate launch --config_file
CONFIG.yaml -m emu2.train RECIPE ...`` (DDP or FSDP, as the accelerate config says).
"""

from __future__ import annotations

import argparse
import json
import logging


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object (``emu2 train``)."""
    parser = subparsers.add_parser("train", help="train one stage from a recipe (YAML path or packaged name)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML file, or a packaged recipe name (see --list)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. steps=100 optim.lr.lm=1e-5 data.streams.pairs.batch_size=8")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest valid checkpoint in output_dir/checkpoints")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and exit after this step (time-sliced jobs); continue with --resume")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes and exit")


def run(args: argparse.Namespace) -> int:
    from .config import load_config, recipe_names, resolve_recipe

    if args.list:
        import yaml

        for name in recipe_names():
            description = (yaml.safe_load(resolve_recipe(name).read_text()) or {}).get("description", "")
            print(f"{name:<22} {description.splitlines()[0] if description else ''}")
        return 0
    if not args.recipe:
        raise SystemExit("emu2 train: give a recipe (a YAML file or a name from `emu2 train --list`)")
    config = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from .data import TooManySkippedSamples
    from .runner import TrainingDiverged
    from .stages import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = train(config, resume=args.resume, stop_after=args.stop_after)
    except (TooManySkippedSamples, TrainingDiverged) as exn:  # the run stopped for a reason the user can act on
        raise SystemExit(f"emu2 train: {exn}") from None
    finally:
        _end_process_group()
    print(json.dumps(summary))
    return 0


def _end_process_group() -> None:
    """Destroy the process group of a distributed launch before the process exits, as PyTorch's documentation
    asks: left to the interpreter's teardown, gloo's background threads can abort a finished rank ("terminate
    called without an active exception") and fail the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu2.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args(argv))
