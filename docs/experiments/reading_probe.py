"""Does the language model read each attribute from the image? For single-group training scenes, the base model
scores captions that differ in one attribute only ("A small red circle in the top left of the picture, on a white
background." with every colour in turn, and so on), and picks the one it gives the highest log-likelihood after
the image. The linear probe (`emu2.eval.probe`) says what the visual embeddings carry; this says what the language
model makes of them.

    python docs/experiments/reading_probe.py DATA_DIR SCENES MODEL_DIR [MODEL_DIR ...]

Prints, per model, the % of scenes whose true caption wins, with its 95 % Wilson interval, per attribute (chance:
colour 1/9, shape 1/8, position 1/4, background 1/4, count 1/4). DATA_DIR: a shapes dataset (its dataset.json
seeds the world); MODEL_DIR: e.g. runs/quickstart/stage1.
"""
# ruff: noqa
import collections, json, random, sys
from dataclasses import replace
from pathlib import Path

import torch

torch.set_num_threads(2)
from emu2 import processing as P
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.world import BACKGROUNDS, CELL_NAMES, COLOURS, SHAPES, World, describe
from emu2.eval.intervals import with_interval
from emu2.pipelines.emu2 import Emu2Pipeline

data, n, models = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
manifest = json.loads((data / "dataset.json").read_text())
world, size = World.from_seed(manifest.get("seed", 0)), manifest.get("image_size", 64)
rng = random.Random(7)
scenes = [world.group_scene(rng, "train") for _ in range(n)]


def caption(g, position, background):
    d = describe(g)
    return f"{d[0].upper()}{d[1:]} in the {position} of the picture, on a {background} background."


def variants(scene, attribute):
    """(caption, is_true) for every value of ``attribute``, the rest of the scene kept."""
    g, p, b = scene.groups[0], scene.position(scene.groups[0]), scene.background
    if attribute == "colour":
        return [(caption(replace(g, colour=c), p, b), c == g.colour) for c in COLOURS]
    if attribute == "shape":
        return [(caption(replace(g, shape=s), p, b), s == g.shape) for s in SHAPES]
    if attribute == "position":
        return [(caption(g, q, b), q == p) for q in sorted(CELL_NAMES[2].values())]
    if attribute == "background":
        return [(caption(g, p, c), c == b) for c in BACKGROUNDS]
    return [(caption(replace(g, count=k), p, b), k == g.count) for k in (1, 2, 3, 4)]


for path in models:
    pipe = Emu2Pipeline.from_pretrained(path)
    model = pipe.model.eval()
    hits = collections.defaultdict(list)
    for scene in scenes:
        image = render_scene(scene, size)
        for attribute in ("colour", "shape", "position", "background", "count"):
            options = variants(scene, attribute)
            batch = pipe.encode([P.IMAGE_PLACEHOLDER + text for text, _ in options], [image] * len(options))
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               images=batch["images"]).logits
            ids, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[..., None])[..., 0]
            best = int((logp * mask).sum(-1).argmax())
            hits[attribute].append(float(options[best][1]))
    cells = {a: with_interval(v) for a, v in hits.items()}
    print(path, {a: f"{100 * c['value']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"
                 for a, c in cells.items()}, f"({n} scenes)")
