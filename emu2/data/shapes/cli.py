"""``emu2 data shapes``: generate the procedural shapes world (also ``python -m emu2.data.shapes``)."""

from __future__ import annotations

import argparse
import json
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``shapes`` subcommand on an argparse subparsers object (``emu2 data shapes``)."""
    parser = subparsers.add_parser("shapes", help="generate the procedural shapes world as WebDataset shards",
                                   description=__doc__)
    _arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical shards")
    parser.add_argument("--num-train", type=int, default=1000, help="training samples per kind")
    parser.add_argument("--num-val", type=int, default=None, help="validation samples per kind (default num-train/10)")
    parser.add_argument("--num-heldout", type=int, default=None, help="samples per held-out split and kind")
    parser.add_argument("--num-episodes", type=int, default=20, help="few-shot eval episodes per held-out split")
    parser.add_argument("--num-lm", type=int, default=None,
                        help="documents in the lm split, the LM stage's text corpus (default num-train)")
    parser.add_argument("--num-lm-long", type=int, default=None,
                        help="documents in the lm_long split, the LM stage's long rows (default num-lm/3)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=250, help="samples per tar shard")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default 1; output is identical for any number)")


def run(args: argparse.Namespace) -> dict:
    from emu2.data.shapes.write import write_shapes

    start = time.perf_counter()
    manifest = write_shapes(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                            num_heldout=args.num_heldout, num_episodes=args.num_episodes,
                            image_size=args.image_size, shard_size=args.shard_size, processes=args.processes,
                            num_lm=args.num_lm, num_lm_long=args.num_lm_long)
    counts = {split: sum(e["count"] for e in kinds.values()) for split, kinds in manifest["splits"].items()}
    print(json.dumps({"out": args.out, "samples": counts, "episodes": manifest["eval"]["count"],
                      "seconds": round(time.perf_counter() - start, 1)}))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emu2.data.shapes", description=__doc__)
    _arguments(parser)
    run(parser.parse_args(argv))
