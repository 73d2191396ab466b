"""How image requests become the official Emu2-Gen input list."""

import pytest
from PIL import Image

from emu2 import processing as P
from emu2.data.boxes import draw_box_image
from emu2.serve.generation import GroundedObject, build_generation_inputs

from .conftest import png_image


def test_text_only_prompt_is_the_prompt():
    assert build_generation_inputs("an astronaut in a jungle") == ["an astronaut in a jungle"]


def test_images_without_placeholders_come_first_as_in_official_editing():
    source = png_image()
    assert build_generation_inputs("wearing a red hat", [source]) == [source, "wearing a red hat"]


def test_placeholders_put_each_image_in_its_place():
    a, b = png_image("red"), png_image("blue")
    assert build_generation_inputs("x [<IMG_PLH>] y [<IMG_PLH>]", [a, b]) == ["x ", a, " y ", b]
    with pytest.raises(P.PromptError, match="placeholder"):
        build_generation_inputs("[<IMG_PLH>]", [a, b])


def test_one_image_and_no_text_is_autoencoding():
    source = png_image()
    assert build_generation_inputs("", [source]) == [source]


def test_grounded_objects_follow_the_official_layout():
    dog = png_image("white")
    items = build_generation_inputs("An oil painting of", objects=[
        GroundedObject("a dog", (0, 200, 100, 400), dog), GroundedObject("a cat", (100, 150, 300, 350))])
    assert items[:3] == ["<grounding>", "An oil painting of", "<phrase>a dog</phrase><object>"]
    assert isinstance(items[3], Image.Image) and items[4:6] == ["</object>", dog]
    assert items[6] == "<phrase>a cat</phrase><object>" and items[8:] == ["</object>"]
    assert items[3].tobytes() == draw_box_image([(0, 200, 100, 400)], 448).tobytes()


@pytest.mark.parametrize("box", [(10, 10, 5, 20), (0, 0, 449, 10), (-1, 0, 5, 5)])
def test_boxes_must_lie_on_the_canvas(box):
    with pytest.raises(P.PromptError, match="448"):
        build_generation_inputs("x", objects=[GroundedObject("a", box)])
