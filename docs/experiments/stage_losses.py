"""Per-step losses and learning rates of a few tiny steps of one training stage, for comparing two builds.

    PYTHONPATH=TREE python docs/experiments/stage_losses.py STAGE OUT DATA [ENCODER_DIR]

STAGE: encoder | decoder | video-decoder | lm (``shapes-stage2`` from a random ``shapes`` model). DATA: a shapes
dataset (``emu2 data shapes``). The decoders need ENCODER_DIR (e.g. ``Emu2Pipeline.from_preset("tiny")`` saved).
Run it with each tree on ``PYTHONPATH`` and compare the printed lines: the same numbers mean the same training.
"""

import json
import sys

import torch

from emu2.train import train
from emu2.train.config import load_config


def main(stage: str, out: str, data: str, encoder: str | None = None) -> None:
    torch.set_num_threads(1)
    common = [f"output_dir={out}", f"data.root={data}", "log.every=1", "log.progress=false", "log.tensorboard=false"]
    if stage == "encoder":
        overrides = ["steps=5", "encoder.attribute_pool=64", "data.streams.pairs.batch_size=8", "model.preset=shapes"]
        recipe = "shapes-encoder"
    elif stage == "lm":
        overrides = ["steps=3", "model.init_from=null", "model.preset=shapes", "mixed_precision=no"]
        recipe = "shapes-stage2"
    else:
        recipe = f"shapes-{stage}"
        stream, limit = ("images", "decoder.max_images=64") if stage == "decoder" else ("clips", "decoder.max_clips=8")
        overrides = ["steps=4", f"model.init_from={encoder}", f"data.streams.{stream}.batch_size=4", limit,
                     "decoder.channels=[8,16]", "decoder.attention=[false,true]", "gradient_accumulation_steps=2"]
    train(load_config(recipe, [*common, *overrides]))
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    print(json.dumps({"loss": [round(r["loss"], 6) for r in rows], "lr": [r["lr"] for r in rows]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
