"""``emu2 data ...``: argument parsers for the data jobs (light to import: the work is imported when run)."""

from __future__ import annotations

import argparse
import json
import os

from emu2.data.shapes.cli import add_parser as add_shapes_parser

CONVERT_FORMATS = ("grit", "instructpix2pix", "llava", "mmc4", "pairs")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` with its subcommands ``shapes`` and ``convert`` on the top-level subparsers."""
    parser = subparsers.add_parser("data", help="make training data: the shapes world, converted public data")
    commands = parser.add_subparsers(dest="data_command", required=True)
    add_shapes_parser(commands)
    add_convert_parser(commands)
    return parser


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """``convert FORMAT INPUT --out DIR [--image-root DIR] [--kind K]`` (see `emu2.data.convert`)."""
    parser = subparsers.add_parser("convert", help="convert LAION/CapsFusion, MMC4, GRIT, LLaVA or InstructPix2Pix "
                                   "data to emu2 WebDataset shards")
    parser.add_argument("format", choices=CONVERT_FORMATS)
    parser.add_argument("input", help="table / jsonl / json file, or an InstructPix2Pix folder")
    parser.add_argument("--out", required=True, help="output directory for <kind>-000000.tar shards")
    parser.add_argument("--image-root", default=None, help="folder relative image paths start from "
                        "(default: the input's folder)")
    parser.add_argument("--kind", default=None, help="pairs: pair|text_to_image; grit: grounded|grounded_generation")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per tar shard")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> dict:
    from emu2.data.convert import CONVERTERS

    kwargs = {"shard_size": args.shard_size}
    if args.kind:
        if args.format not in ("pairs", "grit"):
            raise SystemExit("--kind applies to the pairs and grit formats only")
        kwargs["kind"] = args.kind
    if args.image_root is not None:
        kwargs["image_root"] = args.image_root
    elif args.format in ("mmc4", "grit"):
        kwargs["image_root"] = os.path.dirname(os.path.abspath(args.input))
    result = CONVERTERS[args.format](args.input, args.out, **kwargs)
    print(json.dumps({"written": result["written"], "skipped": result["skipped"], "shards": len(result["shards"])}))
    return result
