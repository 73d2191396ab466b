"""Box-mask images match the official cv2.rectangle(mask, (l, t), (r, b), white, 3) pixel for pixel.

The golden masks below were drawn by OpenCV 5.0 (opencv-python-headless) with exactly that call.
"""

import numpy as np
import pytest

from emu2.data.boxes import OFFICIAL_MASK_SIZE, draw_box_image

CV2_GOLDEN = [
    (
        12,
        [(2, 3, 8, 9)],
        [
            "............",
            "..#######...",
            ".#########..",
            "###########.",
            "###########.",
            "###########.",
            "#####.#####.",
            "###########.",
            "###########.",
            "###########.",
            ".#########..",
            "..#######...",
        ],
    ),
    (
        14,
        [(9, 1, -3, 6), (5, 5, 5, 5)],
        [
            "###########...",
            "############..",
            "############..",
            "############..",
            "############..",
            "############..",
            "############..",
            "###########...",
            "##########....",
            "..............",
            "..............",
            "..............",
            "..............",
            "..............",
        ],
    ),
    (
        10,
        [(0, 0, 9, 9)],
        [
            "##########",
            "##########",
            "##########",
            "###....###",
            "###....###",
            "###....###",
            "###....###",
            "##########",
            "##########",
            "##########",
        ],
    ),
]


@pytest.mark.parametrize("size, boxes, rows", CV2_GOLDEN)
def test_box_mask_matches_opencv(size, boxes, rows):
    image = np.asarray(draw_box_image(boxes, size))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    expected = np.array([[c == "#" for c in row] for row in rows])
    np.testing.assert_array_equal(image[..., 0] == 255, expected)
    assert set(np.unique(image)) <= {0, 255} and (image == image[..., :1]).all()  # white on black


def test_default_canvas_is_the_official_448_and_outline_is_hollow():
    image = np.asarray(draw_box_image([(22, 14, 224, 224)]))
    assert image.shape == (OFFICIAL_MASK_SIZE, OFFICIAL_MASK_SIZE, 3) == (448, 448, 3)
    assert image[14, 100, 0] == 255 and image[120, 22, 0] == 255  # on the top and left edges
    assert image[120, 120, 0] == 0 and image[300, 300, 0] == 0  # inside and outside


def test_malformed_box_is_rejected():
    with pytest.raises(ValueError, match="left, top, right, bottom"):
        draw_box_image([(1, 2, 3)], 8)
