"""Read a rendered single-group shapes-world scene back from its pixels (PIL + numpy only).

`detect_scene(image, grid)` recovers the attributes of a `World.group_scene` scene: background, colour, count,
position, shape and size; the yardstick of generation attribute accuracy (`emu2.eval.shapes_generation`).

How: the background is the nearest `BACKGROUNDS` colour to the median border pixel (none when the border is
not one flat colour, e.g. noise); the object colour is the nearest `COLOURS` entry to the median of the
"core" foreground pixels (those furthest from the background, so anti-aliased edges do not pull it); each
pixel's coverage ``alpha`` in [0, 1] is its projection on the background -> object colour line. Objects
are the 4-connected components of ``alpha > 0.5`` minus specks; `world.layout` puts each object of a group
of 2-4 in its own quarter of the cell, so a component bigger than that is cut along the cell's midlines
unless it is the group's only object (touching large objects). The cell holding the foreground's centroid
gives the position. Each object's shape is the `render.draw_shape` template with the best soft IoU against
``alpha``, each template placed by matching its area and centroid to the object's coverage and then
refined to sub-pixel precision; the fitted box side over the slot side (the cell for one object, a
quarter cell otherwise) gives the size (`world._SIZE_FRACTION`: 0.7 small, 0.9 large).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .render import SUPERSAMPLE, draw_shape
from .world import _SIZE_FRACTION, BACKGROUNDS, CELL_NAMES, COLOURS, SHAPES

ATTRIBUTES = ("shape", "colour", "count", "position", "background", "size")
MAX_SIDE = 256  # larger images are reduced first (the shapes world renders at 64)
_FLAT_BORDER = 0.6  # share of border pixels near the median border colour for a flat background
_BORDER_TOLERANCE = 40.0  # RGB distance counted as "near"
_BACKGROUND_MATCH = 60.0  # furthest a median border colour may be from its BACKGROUNDS entry
_FOREGROUND = 30.0  # RGB distance from the background of a candidate object pixel
# cell fraction between one object (>= the small fraction) and a quarter-cell object (<= half the large one)
_SINGLE_OBJECT = (_SIZE_FRACTION["small"] + _SIZE_FRACTION["large"] / 2) / 2
_SIZE_SPLIT = sum(_SIZE_FRACTION.values()) / 2  # small below, large above


@dataclass(frozen=True)
class Detection:
    """Attributes read from an image; ``None`` where the detector cannot tell.

    ``confidence`` maps each attribute to a score in [0, 1] (or None); ``boxes`` are the fitted object
    boxes (x1, y1, x2, y2) as fractions of the image, like `Group.boxes`.
    """

    background: str | None = None
    colour: str | None = None
    count: int | None = None
    position: str | None = None
    shape: str | None = None
    size: str | None = None
    confidence: dict = field(default_factory=dict)
    boxes: tuple = ()

    def attributes(self) -> dict:
        """``{attribute: value}`` for the six attributes of `ATTRIBUTES`."""
        return {a: getattr(self, a) for a in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------- colours
def _nearest(colour: np.ndarray, palette: dict) -> tuple[str, float, float]:
    """(name, distance, distance to the runner-up) of the palette entry nearest an RGB colour."""
    dist = sorted((float(np.linalg.norm(colour - np.array(rgb, float))), name)
                  for name, rgb in palette.items())
    return dist[0][1], dist[0][0], dist[1][0]


def _background(pixels: np.ndarray) -> tuple[np.ndarray | None, str | None, float]:
    """The border's median colour, its BACKGROUNDS name and a confidence; (None, None, 0) if not flat."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    median = np.median(border, axis=0)
    flat = float((np.linalg.norm(border - median, axis=1) < _BORDER_TOLERANCE).mean())
    if flat < _FLAT_BORDER:
        return None, None, 0.0
    name, dist, _ = _nearest(median, BACKGROUNDS)
    if dist > _BACKGROUND_MATCH:
        return median, None, 0.0
    return median, name, round(flat * (1 - dist / _BACKGROUND_MATCH), 4)


def _object_colour(pixels: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray | None, str | None, float]:
    """Median of the core foreground pixels, its COLOURS name and a confidence (margin to the runner-up)."""
    dist = np.linalg.norm(pixels - bg, axis=-1)
    candidates = dist > _FOREGROUND
    if not candidates.any():
        return None, None, 0.0
    core = candidates & (dist >= 0.85 * np.percentile(dist[candidates], 95))
    median = np.median(pixels[core], axis=0)
    name, best, second = _nearest(median, COLOURS)
    return median, name, round(1 - best / max(second, 1e-6), 4)


def _coverage(pixels: np.ndarray, bg: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """(H, W) fraction of each pixel covered by the object: projection on the background -> object line."""
    line = obj - bg
    alpha = ((pixels - bg) @ line) / max(float(line @ line), 1e-6)
    near = np.linalg.norm(pixels - (bg + alpha[..., None] * line), axis=-1) < 0.5 * np.linalg.norm(line)
    return np.clip(alpha, 0, 1) * near  # off-line pixels (other colours) count as background


# ------------------------------------------------------------------------------------------- components
def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, members = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            members.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(members))
    return out


def _extent(points: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels of a component's bounding box."""
    return tuple(int(v) for v in points.max(0) - points.min(0) + 1)


def _split_objects(comps: list[np.ndarray], cell: tuple[int, int],
                   cell_px: tuple[float, float]) -> list[np.ndarray]:
    """Components -> objects. One object of a group of 2-4 fits in a quarter of the cell (`world.layout`),
    so a component bigger than that is either the group's single object or touching quarter-cell objects:
    it is cut along the cell's midlines when there are other components, when it is not square (a touching
    pair side by side) or when it fills just two diagonal quarters (a pair touching at corners).
    ``cell_px`` is the cell's (height, width) in pixels."""
    mid_r, mid_c = (cell[0] + 0.5) * cell_px[0], (cell[1] + 0.5) * cell_px[1]
    objects = []
    for points in comps:
        h, w = _extent(points)
        quarter = (points[:, 0] + 0.5 >= mid_r) * 2 + (points[:, 1] + 0.5 >= mid_c)
        parts = [points[quarter == q] for q in range(4)]
        sizes = sorted(len(p) for p in parts)
        diagonal = sizes[1] < 0.1 * sizes[2] and sizes[2] > 0.5 * sizes[3] and (
            {q for q in range(4) if len(parts[q]) >= sizes[2]} in ({0, 3}, {1, 2}))
        big = max(h / cell_px[0], w / cell_px[1]) > _SINGLE_OBJECT
        if not big or (len(comps) == 1 and max(h, w) <= 1.45 * min(h, w) and not diagonal):
            objects.append(points)
            continue
        objects += [p for p in parts if len(p) >= 0.25 * sizes[3]]
    return objects


# ---------------------------------------------------------------------------------------------- shapes
@cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a shape drawn in a unit box (fractions of the box side)."""
    side = 800
    image = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(image), shape, (0, 0, side - 1, side - 1), 255)
    mask = np.asarray(image) > 127
    rows, cols = np.nonzero(mask)
    return float(mask.mean()), (cols.mean() + 0.5) / side, (rows.mean() + 0.5) / side


def _template(shape: str, box: tuple[float, float, float, float], origin: tuple[int, int],
              size: tuple[int, int]) -> np.ndarray:
    """(h, w) coverage of ``shape`` drawn in ``box`` (pixels, x1 y1 x2 y2) as `render_scene` draws it, over
    the patch of ``size`` (h, w) whose top-left pixel is ``origin`` (row, col)."""
    s = SUPERSAMPLE
    image = Image.new("L", (size[1] * s, size[0] * s), 0)
    x1, y1, x2, y2 = ((v - o) * s for v, o in zip(box, (origin[1], origin[0], origin[1], origin[0])))
    draw_shape(ImageDraw.Draw(image), shape, (x1, y1, x2 - 1, y2 - 1), 255)
    return np.asarray(image.reduce(s), dtype=np.float64) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _fit_box(shape: str, box: list[float], seen: np.ndarray, origin: tuple[int, int], step: float = 0.5,
             min_step: float = 0.125) -> tuple[float, list[float]]:
    """Coordinate ascent of the soft IoU over a square box [x, y, side] (pixels) -> (IoU, box)."""

    def score(b):
        return _soft_iou(_template(shape, (b[0], b[1], b[0] + b[2], b[1] + b[2]), origin, seen.shape), seen)

    best = score(box)
    while step >= min_step:
        improved = False
        for k in range(3):
            for sign in (1, -1):
                trial = list(box)
                trial[k] += sign * step
                value = score(trial)
                if value > best:
                    best, box, improved = value, trial, True
                    break
        if not improved:
            step /= 2
    return best, box


def _fit_shape(points: np.ndarray, alpha: np.ndarray, others: np.ndarray, refine: int = 3,
               step: float = 0.25) -> tuple[str, float, tuple[float, float, float]]:
    """(shape, soft IoU, box (x, y, side) in pixels) of the best template for one object.

    Every shape is placed where its area and centroid match the object's coverage mass and centroid; the
    ``refine`` best placements are then adjusted by moves of ``step`` pixels and less.
    """
    (r1, c1), (r2, c2) = points.min(0), points.max(0) + 1
    pad = 2
    top, left = max(r1 - pad, 0), max(c1 - pad, 0)
    bottom, right = min(r2 + pad, alpha.shape[0]), min(c2 + pad, alpha.shape[1])
    seen = alpha[top:bottom, left:right] * ~others[top:bottom, left:right]
    mass = float(seen.sum())
    rows, cols = np.indices(seen.shape)
    gy, gx = top + (rows * seen).sum() / mass + 0.5, left + (cols * seen).sum() / mass + 0.5
    starts = []
    for shape in SHAPES:
        area, fx, fy = _shape_geometry(shape)
        side = (mass / area) ** 0.5
        box = [gx - fx * side, gy - fy * side, side]
        drawn = _template(shape, (box[0], box[1], box[0] + side, box[1] + side), (top, left), seen.shape)
        starts.append((_soft_iou(drawn, seen), shape, box))
    fits = []
    for _, shape, box in sorted(starts, reverse=True)[:refine]:
        iou, box = _fit_box(shape, box, seen, (top, left), step=step)
        fits.append((iou, shape, tuple(box)))
    iou, shape, box = max(fits)
    return shape, iou, box


# -------------------------------------------------------------------------------------------- the scene
def detect_scene(image: Image.Image, grid: int = 2) -> Detection:
    """The attributes of a single-group scene (`World.group_scene`) read from its rendered pixels.

    image: any-size RGB(-convertible) PIL image (square, as rendered; larger than `MAX_SIDE` is reduced).
    grid: the scene's grid (2 or 3), which fixes the cell names and the slot sizes.
    Returns a `Detection`; attributes it cannot tell are None (all of them for a noisy border; count 0 and
    the rest None for an image of background only).
    """
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BOX)
    pixels = np.asarray(image, dtype=np.float64)
    bg, background, bg_conf = _background(pixels)
    confidence = dict.fromkeys(ATTRIBUTES)
    confidence["background"] = bg_conf if background else None
    if bg is None:
        return Detection(confidence=confidence)
    obj, colour, colour_conf = _object_colour(pixels, bg)
    if obj is None:
        return Detection(background=background, count=0, confidence=confidence)
    confidence["colour"] = colour_conf
    alpha = _coverage(pixels, bg, obj)
    height, width = alpha.shape
    cell_px = (height / grid, width / grid)
    speck = max(2.0, 0.08 * (min(cell_px) / 2 * _SIZE_FRACTION["small"]) ** 2)  # of the smallest object's box
    comps = [c for c in _components(alpha > 0.5) if len(c) >= speck]
    if comps:
        largest = max(len(c) for c in comps)
        comps = [c for c in comps if len(c) >= 0.2 * largest]
    if not comps:
        return Detection(background=background, colour=colour, count=0, confidence=confidence)

    centre = np.concatenate(comps).mean(0) + 0.5  # (row, col) of the foreground centroid
    cell = tuple(int(min(max(v // n, 0), grid - 1)) for v, n in zip(centre, cell_px))
    position = CELL_NAMES[grid][cell]
    inside = [min(v - k * n, (k + 1) * n - v) / (n / 2) for v, k, n in zip(centre, cell, cell_px)]
    confidence["position"] = round(float(max(0.0, min(inside))), 4)  # 1 at the cell's centre, 0 at its edge

    objects = _split_objects(comps, cell, cell_px)
    labels = np.zeros(alpha.shape, dtype=np.int32)
    for i, p in enumerate(objects, 1):
        labels[p[:, 0], p[:, 1]] = i
    fits = [_fit_shape(p, alpha, (labels != 0) & (labels != i)) for i, p in enumerate(objects, 1)]
    votes = Counter()
    for fit_shape, iou, _ in fits:
        votes[fit_shape] += iou
    shape, weight = votes.most_common(1)[0]
    confidence["shape"] = round(weight / len(fits), 4)  # IoU-weighted share of the objects

    count = len(objects)
    slot_px = min(cell_px) if count == 1 else min(cell_px) / 2
    ratio = float(np.median([box[2] for _, _, box in fits])) / slot_px
    size = "small" if ratio < _SIZE_SPLIT else "large"
    half_gap = (_SIZE_FRACTION["large"] - _SIZE_FRACTION["small"]) / 2  # confidence 1 at either fraction, 0 midway
    confidence["size"] = round(max(0.0, 1 - abs(abs(ratio - _SIZE_SPLIT) - half_gap) / half_gap), 4)
    areas = [len(p) for p in objects]
    confidence["count"] = round(min(1.0, 2 * min(areas) / max(areas)), 4)  # objects of a group are alike

    boxes = []
    for _, _, (x, y, side) in fits:
        boxes.append(tuple(round(float(v), 4) for v in (x / width, y / height, (x + side) / width,
                                                        (y + side) / height)))
    return Detection(background=background, colour=colour, count=count, position=position, shape=shape,
                     size=size, confidence=confidence, boxes=tuple(boxes))
