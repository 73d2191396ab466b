"""Attribute labels of rendered scenes: the shapes world's stand-in for what EVA-CLIP learned before Emu2.

Emu2 inherits a vision encoder that already sees (EVA-02-CLIP, paper 2.1). A shapes-world encoder starts random,
and from captions alone it learns colour in minutes but shape and count barely at all on a CPU budget (the
objects are 9-27 px). The world knows every object's attributes and box, so the encoder stage can supervise them
directly (`emu2.train.stages.encoder`, ``encoder.attributes``):

- per patch (the ViT's grid before pooling): the shape and colour of the object covering the patch, or "none";
  dense labels give every image ``grid**2`` targets instead of one and reward detectors that work anywhere;
- per pooled embedding (the n x n grid the language model reads): the same labels on that coarser grid, so that
  each embedding the LM sees carries, linearly, what lies in its part of the image (an object of 9 px fills one
  of four patches under an embedding, and the mean pooling would otherwise dilute it);
- per image, for one-group scenes: the shape and colour, read as the best patch's score (a max over patches, so a
  detector that works anywhere is rewarded, whatever the object's place), and from the pooled embeddings the
  language model reads the count, size and position; the background for every scene.

Shape is read from a colourless view. The held-out (shape, colour) combinations make colour a cue for shape in
training (red is never a star there), and an encoder that learns shape and colour together takes that cue: its
shape read-out then fails on exactly the held-out combinations. So the shape labels are scored on `shape_view`
images: grey levels with a random contrast, sign and offset per image, from which neither the colour nor its
brightness can be told; every other label is scored on the colour images.

Shapes: `AttributePool.batch(indices)` -> images (B, 3, S, S) normalised as `processing.preprocess_image`;
"patch_shape", "patch_colour" (B, grid * grid) long; "cell_shape", "cell_colour", "cell_position" (B, side * side)
long for the pooled grid (no encoder head reads "cell_position"; the word fit does); "shape", "colour", "count",
"size", "position", "background" (B,) long, -100 where a scene has no single value (several groups).
"""

from __future__ import annotations

import random

import torch

from .render import render_scene
from .world import BACKGROUNDS, CELL_NAMES, COLOURS, MAX_COUNT, SHAPES, SIZES, Scene, World

IGNORE = -100
POSITIONS = tuple(sorted(set(CELL_NAMES[2].values()) | set(CELL_NAMES[3].values())))
# Classes of each label (patch labels have "none" as class 0).
LABEL_CLASSES = {"patch_shape": 1 + len(SHAPES), "patch_colour": 1 + len(COLOURS), "cell_shape": 1 + len(SHAPES),
                 "cell_colour": 1 + len(COLOURS), "shape": len(SHAPES),
                 "colour": len(COLOURS), "count": MAX_COUNT, "size": len(SIZES), "position": len(POSITIONS),
                 "background": len(BACKGROUNDS)}
OBJECT_LABELS = ("shape", "colour")  # read from the best patch
PATCH_LABELS = ("patch_shape", "patch_colour")  # per patch of the trunk's grid
CELL_LABELS = ("cell_shape", "cell_colour")  # per pooled embedding
SHAPE_LABELS = ("shape", "patch_shape", "cell_shape")  # scored on the colourless view
GLOBAL_LABELS = ("count", "size", "position", "background")  # read from the pooled embeddings
# The words naming each class of the labels (patch and cell labels: class k > 0 is word k - 1).
LABEL_WORDS = {"cell_shape": SHAPES, "cell_colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}


def _covered(box: tuple[float, float, float, float], grid: int) -> set[tuple[int, int]]:
    """The (row, col) patches of a ``grid x grid`` image that belong to an object's box: those whose centre lies in
    the box, and always the one holding the box centre, so the smallest objects count too."""
    x1, y1, x2, y2 = box
    cells = {(min(grid - 1, int((y1 + y2) / 2 * grid)), min(grid - 1, int((x1 + x2) / 2 * grid)))}
    return cells | {(i, j) for i in range(grid) for j in range(grid)
                    if x1 <= (j + 0.5) / grid <= x2 and y1 <= (i + 0.5) / grid <= y2}


def patch_labels(scene: Scene, grid: int) -> tuple[list[int], list[int]]:
    """Row-major ``grid x grid`` shape and colour classes (0 = no object), on the patches `_covered` by each object."""
    shapes, colours = [0] * (grid * grid), [0] * (grid * grid)
    for group in scene.groups:
        for box in group.boxes:
            for i, j in _covered(box, grid):
                shapes[i * grid + j] = 1 + SHAPES.index(group.shape)
                colours[i * grid + j] = 1 + list(COLOURS).index(group.colour)
    return shapes, colours


def cell_positions(scene: Scene, grid: int) -> list[int]:
    """Row-major ``grid x grid``: 1 + the `POSITIONS` index of the scene position (the caption's "top left",
    "center", ...) of the group whose object covers the patch, 0 where no object is. The scene's own grid of
    positions (2x2 or 3x3) need not align with ``grid``, so this is a label per object, not per patch place."""
    positions = [0] * (grid * grid)
    for group in scene.groups:
        for box in group.boxes:
            for i, j in _covered(box, grid):
                positions[i * grid + j] = 1 + POSITIONS.index(scene.position(group))
    return positions


def global_labels(scene: Scene) -> dict[str, int]:
    labels = {"background": list(BACKGROUNDS).index(scene.background)}
    if len(scene.groups) == 1:
        g = scene.groups[0]
        labels.update(count=g.count - 1, size=SIZES.index(g.size), position=POSITIONS.index(scene.position(g)),
                      shape=SHAPES.index(g.shape), colour=list(COLOURS).index(g.colour))
    return {name: labels.get(name, IGNORE) for name in (*OBJECT_LABELS, *GLOBAL_LABELS)}


def shape_view(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Colourless copies of normalised images ``(B, 3, S, S)``: luminance, then ``a * y + b`` with a random
    ``|a|`` in [0.5, 1.5], a random sign and ``b`` in [-0.3, 0.3] per image, clipped to [0, 1] and normalised
    again as `processing.preprocess_image` does."""
    from ...processing import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    rgb = images * std + mean
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    B = len(images)
    scale = torch.empty(B, 1, 1, 1).uniform_(0.5, 1.5, generator=generator)
    sign = torch.randint(0, 2, (B, 1, 1, 1), generator=generator) * 2 - 1
    offset = torch.empty(B, 1, 1, 1).uniform_(-0.3, 0.3, generator=generator)
    grey = sign * scale * (grey - 0.5) + 0.5 + offset
    return (grey.clamp(0, 1).expand(-1, 3, -1, -1) - mean) / std


class AttributePool:
    """``size`` training-split scenes rendered once, as the shapes-world kinds mix them (70 % one group of 1-4
    objects, 30 % 2-3 groups), with their labels; batches are drawn from it by index.

    Rendering once keeps the stage's steps for learning: more distinct renders did not help at equal time (shape
    is limited by optimisation steps, not data).
    """

    def __init__(self, world: World, image_size: int, grid: int, size: int = 6000, seed: int = 0,
                 pooled: int | None = None):
        from ...processing import preprocess_images

        rng = random.Random(f"{seed}:attribute-pool")
        scenes = [world.group_scene(rng, "train") if rng.random() < 0.7 else
                  world.multi_scene(rng, "train", objects=rng.randint(2, 3)) for _ in range(size)]
        self.images = preprocess_images([render_scene(s, image_size) for s in scenes], image_size)
        self.labels = {}
        # ``pooled``: the side of the pooled grid (sqrt(n_query)); without it the cell labels are the patch labels
        for names, side in ((PATCH_LABELS, grid), (CELL_LABELS, pooled or grid)):
            cells = [patch_labels(s, side) for s in scenes]
            self.labels.update({names[0]: torch.tensor([c[0] for c in cells]),
                                names[1]: torch.tensor([c[1] for c in cells])})
        self.labels["cell_position"] = torch.tensor([cell_positions(s, pooled or grid) for s in scenes])
        per_scene = [global_labels(s) for s in scenes]
        self.labels.update({name: torch.tensor([g[name] for g in per_scene]) for name in per_scene[0]})

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": self.images[indices], **{k: v[indices] for k, v in self.labels.items()}}
