"""The shapes encoder with and without transformer blocks, probed (docs/training-notes.md, "What the shapes
encoder needs to see shape and count"). Trains `shapes-encoder` on a data directory with the `shapes` preset's
vision tower at LAYERS blocks, then runs the linear probe on unseen renders and on held-out combinations.

    LAYERS=0 NT=1 python docs/experiments/encoder_blocks_probe.py OUT_DIR STEPS data.root=DATA_DIR [overrides]

VIEW=colour scores the shape labels on colour images instead of the colourless view.
"""
# ruff: noqa
import json, os, sys, time

import torch

torch.set_num_threads(int(os.environ.get("NT", "1")))
import emu2.config as C
import emu2.data.shapes.supervision as SUP
from emu2.config import Emu2VisionConfig

LAYERS = int(os.environ.get("LAYERS", "0"))
_preset = C.PRESETS["shapes"]


def patched():
    d = _preset()
    v = d["vision_config"].to_dict()
    v.pop("model_type", None)
    d["vision_config"] = Emu2VisionConfig(**{**v, "layers": LAYERS})
    return d


C.PRESETS["shapes"] = patched
if os.environ.get("VIEW") == "colour":
    SUP.shape_view = lambda images, generator=None: images
from emu2.data.shapes.world import World
from emu2.eval.probe import linear_probe
from emu2.pipeline import Emu2Pipeline
from emu2.train.config import load_config
from emu2.train.loop import train

out, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
started = time.time()
train(load_config("shapes-encoder", [f"output_dir={out}", f"steps={steps}", "log.progress=false",
                                     "log.tensorboard=false", *extra]))
seconds = time.time() - started
model = Emu2Pipeline.from_pretrained(out).model
probe = {name: {k: v["value"] for k, v in linear_probe(model, World.from_seed(0), 64, test_split=split).items()}
         for name, split in (("unseen", "train"), ("heldout", "heldout"))}
print(json.dumps({"layers": LAYERS, "train_s": round(seconds), "steps": steps, "extra": extra, "probe": probe}))
