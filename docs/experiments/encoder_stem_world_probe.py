"""The shapes encoder with and without the stem's GroupNorm, in the world with its object sizes as they are and
as they were (docs/training-notes.md, "What the shapes encoder needs to see shape and count"). Trains
`shapes-encoder` for STEPS on a data directory, then runs the linear probe on unseen renders of the training
combinations, with shape accuracy broken down by object count (one / several) and size.

    STEM_NORM=1 SMALL=0.7 LARGE=0.9 NT=1 python docs/experiments/encoder_stem_world_probe.py OUT STEPS data.root=DIR

STEM_NORM=0 is the stem without normalisation; SMALL=0.55 LARGE=0.85 the world's earlier object sizes (the
attribute pool and the probe's scenes are rendered with them; the data directory's captions are not read).
"""
# ruff: noqa
import collections, json, os, sys, time

import torch

torch.set_num_threads(int(os.environ.get("NT", "1")))
import emu2.config as C
import emu2.data.shapes.world as W
from emu2.config import Emu2VisionConfig

for size in ("small", "large"):
    if os.environ.get(size.upper()):
        W._SIZE_FRACTION[size] = float(os.environ[size.upper()])
_preset = C.PRESETS["shapes"]


def patched():
    d = _preset()
    v = d["vision_config"].to_dict()
    v.pop("model_type", None)
    d["vision_config"] = Emu2VisionConfig(**{**v, "stem_norm": os.environ.get("STEM_NORM", "1") == "1"})
    return d


C.PRESETS["shapes"] = patched
from emu2.data.shapes.render import render_scene
from emu2.eval import probe as P
from emu2.pipeline import Emu2Pipeline
from emu2.train.config import load_config
from emu2.train.loop import train

out, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
started = time.time()
train(load_config("shapes-encoder", [f"output_dir={out}", f"steps={steps}", "log.progress=false",
                                     "log.tensorboard=false", *extra]))
seconds = time.time() - started
model = Emu2Pipeline.from_pretrained(out).model
world = W.World.from_seed(0)
fit, test = P.probe_scenes(world, 3000, "train", 0), P.probe_scenes(world, 600, "train", 1)
fit_x = P.pooled_features(model, [render_scene(s, 64) for s in fit])
test_x = P.pooled_features(model, [render_scene(s, 64) for s in test])
labels = lambda scenes: {a: [P.scene_labels(s)[a] for s in scenes] for a in P.PROBE_ATTRIBUTES}
result = P.fit_linear_probes(fit_x, labels(fit), test_x, labels(test))
# shape by count and size, from the same ridge read-out (its chosen regularisation)
xs, xt = P._standardise(fit_x, test_x)
values = sorted({s.groups[0].shape for s in fit})
targets = torch.nn.functional.one_hot(torch.tensor([values.index(s.groups[0].shape) for s in fit]), len(values))
predicted = P._predict(P._Ridge(xs).weights(targets.double(), result["shape"]["lambda"] * len(xs)), xt)
by = collections.defaultdict(list)
for p, s in zip(predicted, test):
    g = s.groups[0]
    by[f"{'several' if g.count > 1 else 'one'} {g.size}"].append(values[int(p)] == g.shape)
print(json.dumps({"stem_norm": os.environ.get("STEM_NORM", "1"), "sizes": dict(W._SIZE_FRACTION), "steps": steps,
                  "train_s": round(seconds), "probe": {k: round(100 * v["value"], 1) for k, v in result.items()},
                  "shape_by": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by.items())}}))
