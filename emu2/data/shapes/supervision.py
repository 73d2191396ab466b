"""Attribute labels of rendered scenes: the shapes world's stand-in for what EVA-CLIP learned before Emu2.

Emu2 inherits a vision encoder that already sees (EVA-02-CLIP, paper 2.1). A shapes-world encoder starts random,
and from captions alone it learns colour in minutes but shape and count barely at all on a CPU budget (the
objects are 9-27 px). The world knows every object's attributes and box, so the encoder stage can supervise them
directly (`emu2.train.contrastive`, ``encoder.attributes``):

- per patch (the ViT's grid before pooling): the shape and colour of the object covering the patch, or "none";
  dense labels give every image ``grid**2`` targets instead of one and reward detectors that work anywhere;
- per image, from the pooled embeddings the language model reads: the background, and for one-group scenes the
  count, size and position.

Shapes: `AttributePool.batch(indices)` -> images (B, 3, S, S) normalised as `processing.preprocess_image`;
"patch_shape", "patch_colour" (B, grid * grid) long; "count", "size", "position", "background" (B,) long, -100
where a scene has no single value (several groups).
"""

from __future__ import annotations

import random

import torch

from .render import render_scene
from .world import BACKGROUNDS, CELL_NAMES, COLOURS, MAX_COUNT, SHAPES, SIZES, Scene, World

IGNORE = -100
POSITIONS = tuple(sorted(set(CELL_NAMES[2].values()) | set(CELL_NAMES[3].values())))
# Classes of each label (patch labels have "none" as class 0).
LABEL_CLASSES = {"patch_shape": 1 + len(SHAPES), "patch_colour": 1 + len(COLOURS), "count": MAX_COUNT,
                 "size": len(SIZES), "position": len(POSITIONS), "background": len(BACKGROUNDS)}
GLOBAL_LABELS = ("count", "size", "position", "background")


def patch_labels(scene: Scene, grid: int) -> tuple[list[int], list[int]]:
    """Row-major ``grid x grid`` shape and colour classes (0 = no object). A patch is an object's when its centre
    lies in the object's box; the patch holding the box centre always is, so the smallest objects count too."""
    shapes, colours = [0] * (grid * grid), [0] * (grid * grid)
    for group in scene.groups:
        for x1, y1, x2, y2 in group.boxes:
            cells = {(min(grid - 1, int((y1 + y2) / 2 * grid)), min(grid - 1, int((x1 + x2) / 2 * grid)))}
            cells |= {(i, j) for i in range(grid) for j in range(grid)
                      if x1 <= (j + 0.5) / grid <= x2 and y1 <= (i + 0.5) / grid <= y2}
            for i, j in cells:
                shapes[i * grid + j] = 1 + SHAPES.index(group.shape)
                colours[i * grid + j] = 1 + list(COLOURS).index(group.colour)
    return shapes, colours


def global_labels(scene: Scene) -> dict[str, int]:
    labels = {"background": list(BACKGROUNDS).index(scene.background)}
    if len(scene.groups) == 1:
        g = scene.groups[0]
        labels.update(count=g.count - 1, size=SIZES.index(g.size), position=POSITIONS.index(scene.position(g)))
    return {name: labels.get(name, IGNORE) for name in GLOBAL_LABELS}


class AttributePool:
    """``size`` training-split scenes rendered once, as the shapes-world kinds mix them (70 % one group of 1-4
    objects, 30 % 2-3 groups), with their labels; batches are drawn from it by index.

    Rendering once keeps the stage's steps for learning: more distinct renders did not help at equal time (shape
    is limited by optimisation steps, not data).
    """

    def __init__(self, world: World, image_size: int, grid: int, size: int = 6000, seed: int = 0):
        from ...processing import preprocess_images

        rng = random.Random(f"{seed}:attribute-pool")
        scenes = [world.group_scene(rng, "train") if rng.random() < 0.7 else
                  world.multi_scene(rng, "train", objects=rng.randint(2, 3)) for _ in range(size)]
        self.images = preprocess_images([render_scene(s, image_size) for s in scenes], image_size)
        patches = [patch_labels(s, grid) for s in scenes]
        self.labels = {"patch_shape": torch.tensor([p[0] for p in patches]),
                       "patch_colour": torch.tensor([p[1] for p in patches])}
        per_scene = [global_labels(s) for s in scenes]
        self.labels.update({name: torch.tensor([g[name] for g in per_scene]) for name in GLOBAL_LABELS})

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": self.images[indices], **{k: v[indices] for k, v in self.labels.items()}}
