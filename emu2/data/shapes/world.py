"""The shapes world: attributes, scenes, and which attribute combinations are held out from training.

A scene is a background colour and one or more groups; a group is ``count`` identical objects (shape, colour,
size) in one cell of a 2x2 or 3x3 grid. Boxes are fractions of the image. A `World` (made from a seed) holds
out some (shape, colour) combinations: training scenes never show them, held-out scenes show only them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "pentagon")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 215, 30), "green": (40, 165, 60),
    "blue": (40, 80, 225), "purple": (140, 60, 190), "pink": (245, 130, 190), "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128), "beige": (232, 218, 190)}
SIZES = ("small", "large")
MAX_COUNT = 4
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CELL_NAMES = {
    2: {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"},
    3: {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
        (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"},
}
# Object extent as a fraction of its slot. The smallest object (small, in a quarter of a 2x2 cell of a 64-px image)
# is 11 px; at the earlier 0.55 / 0.85 it was 9 px, where circle, hexagon and pentagon differ by a pixel or two,
# and the CPU-budget encoder read shape at 47 %, count at 88 % (now 67 and 95 %; 858 encoder steps,
# docs/training-notes.md). 0.95 for large made neighbouring objects touch: counts blurred.
_SIZE_FRACTION = {"small": 0.7, "large": 0.9}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Group:
    """``count`` objects of one shape, colour and size in one grid cell; one box per object."""

    shape: str
    colour: str
    size: str
    count: int
    cell: tuple[int, int]
    boxes: tuple[Box, ...]

    @property
    def box(self) -> Box:
        """The union of the group's boxes."""
        xs1, ys1, xs2, ys2 = zip(*self.boxes)
        return min(xs1), min(ys1), max(xs2), max(ys2)


@dataclass(frozen=True)
class Scene:
    background: str
    grid: int
    groups: tuple[Group, ...]

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(g.shape, g.colour) for g in self.groups}

    def position(self, group: Group) -> str:
        return CELL_NAMES[self.grid][group.cell]


def layout(cell: tuple[int, int], grid: int, count: int, size: str, rng: random.Random) -> tuple[Box, ...]:
    """Boxes for ``count`` objects in a cell: one slot per object (the whole cell for one object, else 2x2
    sub-slots), each object jittered inside its slot."""
    cell_size = 1.0 / grid
    x0, y0 = cell[1] * cell_size, cell[0] * cell_size
    if count == 1:
        slots = [(x0, y0, cell_size)]
    else:
        half = cell_size / 2
        corners = [(x0, y0), (x0 + half, y0), (x0, y0 + half), (x0 + half, y0 + half)]
        slots = [(x, y, half) for x, y in sorted(rng.sample(corners, count))]
    boxes = []
    for x, y, slot in slots:
        extent = slot * _SIZE_FRACTION[size]
        dx, dy = rng.uniform(0, slot - extent), rng.uniform(0, slot - extent)
        boxes.append((round(x + dx, 4), round(y + dy, 4), round(x + dx + extent, 4), round(y + dy + extent, 4)))
    return tuple(boxes)


@dataclass(frozen=True)
class World:
    """Attribute space plus the held-out (shape, colour) combinations, all fixed by ``seed``."""

    seed: int
    heldout_combos: frozenset

    @classmethod
    def from_seed(cls, seed: int) -> World:
        # One held-out colour per shape, all different: every shape and every colour still occurs in training.
        rng = random.Random(f"{seed}:heldout-combos")
        colours = rng.sample(list(COLOURS), len(SHAPES))
        return cls(seed, frozenset(zip(SHAPES, colours)))

    def allowed(self, shape: str, colour: str, split: str) -> bool:
        heldout = (shape, colour) in self.heldout_combos
        return heldout if split == "heldout" else not heldout

    def colours_for(self, shape: str, split: str, exclude: tuple[str, ...] = ()) -> list[str]:
        return [c for c in COLOURS if self.allowed(shape, c, split) and c not in exclude]

    def sample_object(self, rng: random.Random, split: str, background: str, shape: str | None = None,
                      colour: str | None = None) -> tuple[str, str]:
        """A (shape, colour) allowed in ``split`` and visible on ``background``."""
        shapes = [shape] if shape else [s for s in SHAPES if colour is None or self.allowed(s, colour, split)]
        rng.shuffle(shapes)
        for s in shapes:
            options = [c for c in self.colours_for(s, split, exclude=(background,)) if colour in (None, c)]
            if options:
                return s, rng.choice(options)
        raise ValueError(f"no {split} object with shape={shape} colour={colour} on a {background} background")

    def group_scene(self, rng: random.Random, split: str = "train", grid: int = 2, **fixed) -> Scene:
        """One group: the scene of the attribute tasks (shape, colour, count, position, size, background).

        ``fixed`` pins attributes: shape, colour, count, size, cell, background.
        """
        for _ in range(100):
            background = fixed.get("background") or rng.choice(list(BACKGROUNDS))
            try:
                shape, colour = self.sample_object(rng, split, background, fixed.get("shape"), fixed.get("colour"))
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"no {split} scene with {fixed}")
        count = fixed.get("count") or rng.randint(1, MAX_COUNT)
        size = fixed.get("size") or rng.choice(SIZES)
        cell = fixed.get("cell") or rng.choice(sorted(CELL_NAMES[grid]))
        group = Group(shape, colour, size, count, cell, layout(cell, grid, count, size, rng))
        return Scene(background, grid, (group,))

    def multi_scene(self, rng: random.Random, split: str = "train", objects: int = 2, max_count: int = 1) -> Scene:
        """Several groups of different shapes in different cells of a 3x3 grid (grounding, chat, generation)."""
        background = rng.choice(list(BACKGROUNDS))
        cells = rng.sample(sorted(CELL_NAMES[3]), objects)
        shapes = rng.sample([s for s in SHAPES if self.colours_for(s, split, exclude=(background,))], objects)
        groups = []
        for shape, cell in zip(shapes, cells):
            shape, colour = self.sample_object(rng, split, background, shape)
            count, size = rng.randint(1, max_count), rng.choice(SIZES)
            groups.append(Group(shape, colour, size, count, cell, layout(cell, 3, count, size, rng)))
        return Scene(background, 3, tuple(groups))


def moved(scene: Scene, group_index: int, cell: tuple[int, int], rng: random.Random) -> Scene:
    """The scene with one group re-laid out in another cell."""
    g = scene.groups[group_index]
    new = replace(g, cell=cell, boxes=layout(cell, scene.grid, g.count, g.size, rng))
    return replace(scene, groups=scene.groups[:group_index] + (new,) + scene.groups[group_index + 1:])


def changed(scene: Scene, group_index: int, rng: random.Random | None = None, **attributes) -> Scene:
    """The scene with one group's attributes changed (count or size changes re-lay the group out)."""
    g = replace(scene.groups[group_index], **attributes)
    if rng is not None and ("count" in attributes or "size" in attributes):
        g = replace(g, boxes=layout(g.cell, scene.grid, g.count, g.size, rng))
    return replace(scene, groups=scene.groups[:group_index] + (g,) + scene.groups[group_index + 1:])


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def describe(group: Group, numbers: str = "word", article: str = "a") -> str:
    """"three small red stars", "a large blue circle"."""
    if group.count == 1:
        return f"{article} {group.size} {group.colour} {group.shape}"
    count = NUMBER_WORDS[group.count] if numbers == "word" else str(group.count)
    return f"{count} {group.size} {group.colour} {plural(group.shape)}"
