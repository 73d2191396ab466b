"""How well an object's caption position ("top left", "center", ...) reads linearly from the pooled embedding
that holds the object's centre: a ridge probe fitted on 80 % of the object-bearing embeddings of 1,500 training
renders, scored on the rest; from the raw embeddings and from `project_up` of them (docs/training-notes.md,
"Where the position goes").

    python docs/experiments/position_probe.py MODEL_DIR runs/quickstart/data
"""
# ruff: noqa
import json, random, sys
from pathlib import Path
import torch
from emu2.pipelines import Emu2Pipeline
from emu2.data.shapes.supervision import POSITIONS, AttributePool
from emu2.data.shapes.world import World

pipe = Emu2Pipeline.from_pretrained(sys.argv[1]); model = pipe.model.float().eval()
m = json.loads(Path(sys.argv[2], "dataset.json").read_text()); vc = model.config.vision_config; Q, side, size = 16, 4, 1500
world = World.from_seed(m.get("seed", 0))
rng = random.Random("5:attribute-pool")  # the pool's own draw (AttributePool, seed 5), repeated to get its scenes
scenes = [world.group_scene(rng, "train") if rng.random() < 0.7 else world.multi_scene(rng, "train", objects=rng.randint(2, 3))
          for _ in range(size)]
pool = AttributePool(world, vc.image_size, vc.grid_size, size=size, seed=5, pooled=side)
label = torch.full((size, Q), -1)
for i, s in enumerate(scenes):
    for g in s.groups:
        for x1, y1, x2, y2 in g.boxes:
            label[i, min(side - 1, int((y1 + y2) / 2 * side)) * side + min(side - 1, int((x1 + x2) / 2 * side))] = POSITIONS.index(s.position(g))
with torch.no_grad():
    raw = torch.cat([model.visual.encode_image(pool.images[i:i + 250], Q) for i in range(0, size, 250)])
    projected = model.project_up(raw)
held = label >= 0


def probe(x):
    x, y = x[held].double(), label[held]
    train = torch.arange(len(y)) < int(0.8 * len(y))
    X = torch.cat([x, torch.ones(len(y), 1, dtype=x.dtype)], 1)
    W = torch.linalg.solve(X[train].T @ X[train] + torch.eye(X.shape[1], dtype=X.dtype),
                           X[train].T @ torch.nn.functional.one_hot(y, len(POSITIONS)).double()[train])
    return round(float(((X[~train] @ W).argmax(1) == y[~train]).double().mean()), 3)


print(json.dumps({"model": sys.argv[1], "raw": probe(raw), "projected": probe(projected), "objects": int(held.sum())}))
