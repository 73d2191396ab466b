"""Emu2Pipeline: the official interleaved-input API over a tiny random model."""

import pytest
import torch
from PIL import Image

from emu2.pipeline import Emu2Pipeline
from emu2.processing import PromptError


@pytest.fixture(scope="module")
def pipe():
    return Emu2Pipeline.from_preset("tiny")


def image(colour):
    return Image.new("RGB", (32, 32), colour)


def test_encode_expands_placeholders_and_left_pads(pipe):
    batch = pipe.encode(["[<IMG_PLH>]hi", "hello there friend"], [image("red")])
    assert batch["input_ids"].shape[0] == 2 and batch["images"].shape == (1, 3, 56, 56)
    assert (batch["input_ids"][0] == 32003).sum() == pipe.model.config.n_query
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()  # left padding


def test_generate_from_interleaved_input(pipe):
    [text] = pipe.generate([image("red"), "Describe the image in details:"], max_new_tokens=4, do_sample=False)
    assert isinstance(text, str)


def test_batched_generation_equals_single(pipe):
    a, b = [image("red"), "a red"], ["longer text prompt with several words"]
    batch = pipe.generate([a, b], max_new_tokens=4, do_sample=False)
    assert batch == pipe.generate(a, max_new_tokens=4, do_sample=False) + pipe.generate(b, max_new_tokens=4,
                                                                                      do_sample=False)


def test_video_input_uses_frame_slots(pipe):
    batch = pipe.encode_interleaved([[image("red"), image("blue")], "What happened?"])
    assert batch["frames"].shape[0] == 2 and batch["images"] is None
    assert (batch["input_ids"] == 32004).sum() == 2 * pipe.model.config.v_query


def test_wrong_placeholder_count_is_rejected(pipe):
    with pytest.raises(PromptError):
        pipe.encode(["[<IMG_PLH>][<IMG_PLH>]"], [image("red")])


def test_chat_uses_template_and_streams(pipe):
    from threading import Thread

    from transformers import TextIteratorStreamer

    chat_pipe = Emu2Pipeline.from_preset("tiny-chat")
    answer = chat_pipe.chat([[image("red"), "What is it?"]], max_new_tokens=3, num_beams=1)
    assert isinstance(answer, str)
    streamer = TextIteratorStreamer(chat_pipe.tokenizer, skip_special_tokens=True)
    batch = chat_pipe.encode(["[USER]: hi [ASSISTANT]:"])
    thread = Thread(target=chat_pipe.model.generate_text, kwargs=dict(**batch, max_new_tokens=3, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) >= 1


def test_regress_image_embeddings_shape(pipe):
    out = pipe.regress_image_embeddings(["a red circle"])
    assert out.shape == (1, pipe.model.config.n_query, pipe.model.config.vision_config.width)
    assert torch.isfinite(out).all()
