"""How image requests become the official Emu2-Gen input list."""

import threading

import pytest
from PIL import Image

from emu2 import processing as P
from emu2.data.boxes import draw_box_image
from emu2.serve.generation import GroundedObject, ImageGenerator, build_generation_inputs

from .conftest import png_image, unet_calls


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


def test_generation_reports_each_denoising_step_of_each_image_then_the_image(gen_pipeline):
    events = []
    images = ImageGenerator(gen_pipeline).generate(["a cat"], n=2, num_inference_steps=3, seed=0,
                                                   on_event=lambda kind, value: events.append((kind, value)))
    drawing = [(v["image"], v["step"], v["steps"]) for k, v in events if k == "status" and v["status"] == "drawing"]
    assert events[0] == ("status", {"status": "running"})
    assert drawing == [(i, s, 3) for i in (1, 2) for s in (1, 2, 3)]
    assert [v for k, v in events if k == "image"] == images and len(images) == 2
    # each image is announced after its last step and before the next image's first
    kinds = [k if k == "image" else v.get("step") for k, v in events[1:]]
    assert kinds == [1, 2, 3, "image", 1, 2, 3, "image"]


def test_a_cancelled_generation_stops_at_the_next_denoising_step(gen_pipeline):
    cancel = threading.Event()

    def on_event(kind, value):
        if kind == "status" and value.get("step") == 2:
            cancel.set()  # as the server does when the client leaves during step 2

    with unet_calls(gen_pipeline.decoder.unet) as calls:
        images = ImageGenerator(gen_pipeline).generate(["a cat"], n=2, num_inference_steps=10, cancel=cancel,
                                                       on_event=on_event)
    assert images == [] and len(calls) == 3  # step 3 ran, its callback saw the cancel; no second image
