"""The shapes encoder's layout, probed (docs/training-notes.md, "What the shapes encoder needs to see shape and
count"). Trains `shapes-encoder` on a data directory with the `shapes` preset's vision tower changed by the
environment, then runs the linear probe on unseen renders and on held-out combinations, and breaks the unseen
renders' shape accuracy down by object count (one / several) and size.

    LAYERS=0 STEM_NORM=1 SMALL=0.7 LARGE=0.9 NT=1 python docs/experiments/encoder_blocks_probe.py OUT STEPS \
        data.root=DATA_DIR [overrides]

LAYERS: transformer blocks (preset: 0). STEM_NORM=0: the stem without its GroupNorm (preset: 1). POS=normal|sincos:
the position embedding's initialisation (preset: sincos; before 1bec928, normal). SMALL / LARGE:
the world's object sizes as fractions of their slot (now 0.7 / 0.9; before 3295b1f 0.55 / 0.85; the attribute
pool and the probe's scenes are rendered with them). VIEW=colour scores the shape labels on colour images instead
of the colourless view. Unset variables keep the preset and the world as they are.
"""
# ruff: noqa
import collections, json, os, sys, time

import torch

torch.set_num_threads(int(os.environ.get("NT", "1")))
import emu2.config as C
import emu2.data.shapes.supervision as SUP
import emu2.data.shapes.world as W
from emu2.config import Emu2VisionConfig

for size in ("small", "large"):
    if os.environ.get(size.upper()):
        W._SIZE_FRACTION[size] = float(os.environ[size.upper()])
changes = {k: cast(os.environ[e]) for k, e, cast in (("layers", "LAYERS", int),
                                                     ("stem_norm", "STEM_NORM", lambda v: v == "1"),
                                                     ("pos_embed_init", "POS", str)) if e in os.environ}
_preset = C.PRESETS["shapes"]


def patched():
    d = _preset()
    v = d["vision_config"].to_dict()
    v.pop("model_type", None)
    d["vision_config"] = Emu2VisionConfig(**{**v, **changes})
    return d


C.PRESETS["shapes"] = patched
if os.environ.get("VIEW") == "colour":
    SUP.shape_view = lambda images, generator=None: images
from emu2.data.shapes.render import render_scene
from emu2.eval import probe as P
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.train.config import load_config
from emu2.train import train

out, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
started = time.time()
train(load_config("shapes-encoder", [f"output_dir={out}", f"steps={steps}", "log.progress=false",
                                     "log.tensorboard=false", *extra]))
seconds = time.time() - started
model = Emu2Pipeline.from_pretrained(out).model
world = W.World.from_seed(0)
probe = {name: {k: round(100 * v["value"], 1) for k, v in P.linear_probe(model, world, 64, test_split=split).items()}
         for name, split in (("unseen", "train"), ("heldout", "heldout"))}
# shape by count and size on the unseen renders, from the same ridge read-out as `linear_probe`'s
fit, test = P.probe_scenes(world, 3000, "train", 0), P.probe_scenes(world, 600, "train", 1)
fit_x = P.pooled_features(model, [render_scene(s, 64) for s in fit])
test_x = P.pooled_features(model, [render_scene(s, 64) for s in test])
shapes = lambda scenes: {"shape": [s.groups[0].shape for s in scenes]}
lam = P.fit_linear_probes(fit_x, shapes(fit), test_x, shapes(test))["shape"]["lambda"]
xs, xt = P._standardise(fit_x, test_x)
values = sorted({s.groups[0].shape for s in fit})
targets = torch.nn.functional.one_hot(torch.tensor([values.index(s.groups[0].shape) for s in fit]), len(values))
predicted = P._predict(P._Ridge(xs).weights(targets.double(), lam * len(xs)), xt)
by = collections.defaultdict(list)
for p, s in zip(predicted, test):
    g = s.groups[0]
    by[f"{'several' if g.count > 1 else 'one'} {g.size}"].append(values[int(p)] == g.shape)
print(json.dumps({"changes": changes, "sizes": dict(W._SIZE_FRACTION), "view": os.environ.get("VIEW", "colourless"),
                  "steps": steps, "train_s": round(seconds), "probe": probe,
                  "shape_by": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by.items())}}))
