"""What a base (stage-1 or stage-2) model writes after an image: greedy captions of 200 one-group scenes, and how
many name the scene's shape, colour and background, how many name a position and how many name the right one
(docs/training-notes.md, "Where the position goes"). SPLIT: heldout (default) or train.

    python docs/experiments/base_captions.py runs/quickstart/stage1 runs/quickstart/data [SPLIT]
"""
# ruff: noqa
import json, random, sys
from pathlib import Path
from emu2 import processing as P
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.supervision import POSITIONS
from emu2.data.shapes.world import World
from emu2.pipelines import Emu2Pipeline

pipe = Emu2Pipeline.from_pretrained(sys.argv[1]); data = Path(sys.argv[2]); split = sys.argv[3] if len(sys.argv) > 3 else "heldout"
m = json.loads((data / "dataset.json").read_text()); world = World.from_seed(m.get("seed", 0)); size = m.get("image_size", 64)
rng = random.Random(1234); items = []
for _ in range(200):
    s = world.group_scene(rng, split); g = s.groups[0]
    items.append((render_scene(s, size), {"shape": g.shape, "colour": g.colour, "position": s.position(g), "background": s.background}))
out = []
for i in range(0, 200, 50):
    chunk = items[i:i + 50]
    batch = pipe.encode([P.IMAGE_PLACEHOLDER] * len(chunk), [im for im, _ in chunk])
    ids = pipe.model.generate_text(**batch, max_new_tokens=32, do_sample=False)
    out += [t.split("</s>")[0].strip() for t in pipe.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def position_named(caption):  # a position the caption names; longest names first, so "top left" is not read as "top"
    words = " " + caption.lower().replace(",", " ").replace(".", " ") + " "
    return next((n for n in sorted(POSITIONS, key=len, reverse=True) if f" {n} " in words), None)


named = [position_named(a) for a in out]
counts = {k: sum(t[k] in a.lower() for a, (_, t) in zip(out, items)) for k in ("shape", "colour", "background")}
counts.update(position_named=sum(n is not None for n in named),
              position_right=sum(n == t["position"] for n, (_, t) in zip(named, items)))
print(json.dumps({"model": sys.argv[1], "split": split, "of": 200, **counts, "examples": out[:3]}))
