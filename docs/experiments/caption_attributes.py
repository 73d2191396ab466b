"""How many of a chat model's captions of 200 scenes name the scene's shape, colour, position and background
(docs/training-notes.md, "Where the position goes"); SPLIT: heldout (default) or train (the training combinations).

    python docs/experiments/caption_attributes.py runs/quickstart/chat runs/quickstart/data [SPLIT]
"""
# ruff: noqa
import json, random, sys
from pathlib import Path
from emu2.pipelines import Emu2Pipeline
from emu2 import processing as P
from emu2.eval.shapes import _chat
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.world import World
pipe = Emu2Pipeline.from_pretrained(sys.argv[1]); data = Path(sys.argv[2])
m = json.loads((data / "dataset.json").read_text()); world = World.from_seed(m.get("seed", 0)); size = m.get("image_size", 64)
rng = random.Random(1234); items = []
for _ in range(200):
    s = world.group_scene(rng, sys.argv[3] if len(sys.argv) > 3 else "heldout"); g = s.groups[0]
    items.append((f"{P.IMAGE_PLACEHOLDER}Describe the image in detail.", [render_scene(s, size)], [], {"shape": g.shape, "colour": g.colour, "position": s.position(g), "background": s.background}))
out = []
for i in range(0, 200, 32):
    out += _chat(pipe, [(a, b, c) for a, b, c, _ in items[i:i+32]], P.CHAT_SYSTEM_MESSAGE, 32)
hits = {k: sum(t[3][k] in a.lower() for a, t in zip(out, items)) for k in ("shape", "colour", "position", "background")}
print(sys.argv[1], hits, "of 200")
