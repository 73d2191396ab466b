"""Box-mask images for grounded generation (official-format section 5, README "grounding generation").

The official example draws each object's box with ``cv2.rectangle(mask, (left, top), (right, bottom),
(255, 255, 255), 3)`` on a black 448x448 RGB image and feeds that image right after ``<object>``. OpenCV
strokes a thickness-3 rectangle 5 px wide, centred on the box edges, with round (radius-2 disc) corners;
`draw_box_image` reproduces that pixel for pixel without depending on OpenCV.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image

OFFICIAL_MASK_SIZE = 448  # the vision encoder's input size (EVA_IMAGE_SIZE)
_HALF_WIDTH = 2  # cv2 thickness 3 -> 2 px either side of the edge


def draw_box_image(boxes: Iterable[Sequence[float]], size: int = OFFICIAL_MASK_SIZE) -> PIL.Image.Image:
    """White box outlines on a black ``size`` x ``size`` RGB image.

    Args:
        boxes: (left, top, right, bottom) pixel coordinates on the square canvas, one tuple per box (the
            official example draws one box per mask image); coordinates are rounded to integers and may lie
            outside the canvas (the outline is clipped).
        size: canvas side; the official masks are 448 (the vision encoder's input size).
    """
    mask = np.zeros((size, size), dtype=bool)
    ys, xs = np.mgrid[0:size, 0:size]
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"each box must be (left, top, right, bottom), got {tuple(box)}")
        left, top, right, bottom = (round(float(v)) for v in box)
        left, right = min(left, right), max(left, right)
        top, bottom = min(top, bottom), max(top, bottom)
        w = _HALF_WIDTH
        in_cols, in_rows = (xs >= left) & (xs <= right), (ys >= top) & (ys <= bottom)
        for edge_y in (top, bottom):  # horizontal strokes
            mask |= in_cols & (np.abs(ys - edge_y) <= w)
        for edge_x in (left, right):  # vertical strokes
            mask |= in_rows & (np.abs(xs - edge_x) <= w)
        for cx, cy in ((left, top), (right, top), (left, bottom), (right, bottom)):  # round joins
            mask |= (xs - cx) ** 2 + (ys - cy) ** 2 <= w * w
    return PIL.Image.fromarray(np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255, mode="RGB")
