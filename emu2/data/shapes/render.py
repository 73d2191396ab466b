"""Draw shapes-world scenes with PIL (supersampled, then reduced: deterministic and anti-aliased)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from emu2.data.shapes.world import BACKGROUNDS, COLOURS, Box, Scene

SUPERSAMPLE = 4


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(rotation + 2 * math.pi * k / sides),
             cy + radius * math.sin(rotation + 2 * math.pi * k / sides)) for k in range(sides)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """One shape filling the pixel box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, min(w, h) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5, -math.pi / 2), fill=fill)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _regular_polygon(cx, cy, r * 0.45, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        t = w / 3
        draw.rectangle((x1 + t, y1, x2 - t, y2), fill=fill)
        draw.rectangle((x1, y1 + t, x2, y2 - t), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(background: str, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUNDS[background])
    return image, ImageDraw.Draw(image)


def _pixels(box: Box, size: int) -> tuple[float, float, float, float]:
    s = size * SUPERSAMPLE
    return box[0] * s, box[1] * s, box[2] * s - 1, box[3] * s - 1


def render_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image."""
    image, draw = _canvas(scene.background, size)
    for group in scene.groups:
        for box in group.boxes:
            draw_shape(draw, group.shape, _pixels(box, size), COLOURS[group.colour])
    return image.reduce(SUPERSAMPLE)


def render_object(shape: str, colour: str, background: str, size: int) -> Image.Image:
    """One object alone, centred and large, on its background (the "subject image" of grounded generation)."""
    image, draw = _canvas(background, size)
    draw_shape(draw, shape, _pixels((0.15, 0.15, 0.85, 0.85), size), COLOURS[colour])
    return image.reduce(SUPERSAMPLE)
