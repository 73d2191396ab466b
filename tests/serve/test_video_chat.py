"""Chat with a video over the OpenAI API, as the official demo takes one: a few frames sampled uniformly (the
middle frame of each of ``--video-frames`` equal segments), seen as one video ("[VIDEO]" then a frame block each).

A video is a ``video_url`` part (vLLM's form) holding an animated image, or a ``video`` part listing its frames'
image URLs (Qwen-VL's form).
"""

import base64
import io

import pytest
import torch
from PIL import Image

from emu2.processing import preprocess_images
from emu2.serve.limits import ServeLimits

from .conftest import data_url, running

openai = pytest.importorskip("openai")

COLOURS = [(25 * k, 100, 200 - 20 * k) for k in range(10)]  # frame k of a 10-frame video
SAMPLED = [2, 7]  # official rule for 10 frames into 2: segment 5, frames 5 // 2 and 5 // 2 + 5


@pytest.fixture(scope="module")
def video_server(chat_pipeline):
    limits = ServeLimits(max_videos=1, max_video_frames=10, video_frames=2, max_prompt_tokens=512, max_tokens=4,
                         default_max_tokens=2)
    with running(chat_pipeline, limits=limits) as server:
        yield server


@pytest.fixture(scope="module")
def client(video_server):
    return openai.OpenAI(base_url=video_server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture
def encoded(chat_pipeline, monkeypatch):
    """The pixels and query count of every encode_image call the model makes."""
    model, calls = chat_pipeline.model, []
    original = model.encode_image

    def recording(pixels, n_query=None):
        calls.append((pixels.clone(), n_query))
        return original(pixels, n_query)

    monkeypatch.setattr(model, "encode_image", recording)
    return calls


def gif_url(colours, size=(16, 16)) -> str:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client, part, **kwargs):
    return client.chat.completions.create(
        model="emu2-chat", messages=[{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}],
        **kwargs)


def assert_saw_official_frames(chat_pipeline, encoded):
    config = chat_pipeline.model.config
    (pixels, _), = [call for call in encoded if call[1] == config.v_query]
    wanted = preprocess_images([Image.new("RGB", (16, 16), COLOURS[k]) for k in SAMPLED],
                               config.vision_config.image_size)
    # GIF palettes may move a colour by a step; neighbouring frames differ by ~0.3 here.
    assert pixels.shape == wanted.shape and torch.allclose(pixels, wanted, atol=0.05)


@pytest.mark.parametrize("num_beams", [1, 2])  # the batched decoder and the serial (beam search) path
def test_a_gif_video_url_part_is_seen_as_the_official_demos_sampled_frames(client, chat_pipeline, encoded,
                                                                           num_beams):
    reply = ask(client, {"type": "video_url", "video_url": {"url": gif_url(COLOURS)}},
                extra_body={"num_beams": num_beams})
    assert isinstance(reply.choices[0].message.content, str)
    assert_saw_official_frames(chat_pipeline, encoded)


def test_a_video_part_listing_frame_urls_is_sampled_the_same_way(client, chat_pipeline, encoded):
    reply = ask(client, {"type": "video", "video": [data_url(colour, (16, 16)) for colour in COLOURS]})
    assert isinstance(reply.choices[0].message.content, str)
    assert_saw_official_frames(chat_pipeline, encoded)


def refusal(client, part):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, part)
    return caught.value


def test_an_undecodable_video_is_a_400_saying_what_to_send(client):
    mp4 = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 32).decode()
    error = refusal(client, {"type": "video_url", "video_url": {"url": mp4}})
    assert (error.code, error.param) == ("invalid_video", "messages[0].content[0].video_url.url")
    assert "animated GIF" in error.message and '"type": "video"' in error.message


def test_a_video_without_frames_is_a_400(client):
    error = refusal(client, {"type": "video", "video": []})
    assert (error.code, error.param) == ("empty_video", "messages[0].content[0].video")


@pytest.mark.parametrize("form", ["video_url", "video"])
def test_a_video_with_more_frames_than_the_server_takes_is_a_400_naming_the_limit(client, form):
    colours = COLOURS + [(0, 0, 0)]  # 11 frames; the server takes 10
    part = ({"type": "video_url", "video_url": {"url": gif_url(colours)}} if form == "video_url"
            else {"type": "video", "video": [data_url(c, (16, 16)) for c in colours]})
    error = refusal(client, part)
    assert error.code == "too_many_frames" and "11 frames" in error.message
    assert "--max-video-frames" in error.message


def test_more_videos_than_the_server_takes_is_a_400_naming_the_limit(client):
    video = {"type": "video", "video": [data_url("red", (16, 16))]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="emu2-chat", messages=[{"role": "user", "content": [video, video]}])
    assert caught.value.code == "too_many_videos" and "--max-videos" in caught.value.message


def test_a_frame_that_is_not_an_image_is_a_400_naming_the_frame(client):
    frames = [data_url("red", (16, 16))] * 2 + ["data:image/png;base64,bm90IGFuIGltYWdl"] + [
        data_url("red", (16, 16))] * 7
    error = refusal(client, {"type": "video", "video": frames})
    assert (error.code, error.param) == ("invalid_image", "messages[0].content[0].video[2]")


def test_a_video_reaches_the_model_in_a_chat_that_answers_with_images(chat_pipeline, gen_pipeline, encoded):
    """modalities ["text", "image"] (answers with images) take the same video parts."""
    limits = ServeLimits(video_frames=2, max_tokens=4, max_inference_steps=2, max_answer_images=1)
    with running(chat_pipeline, None, decoder=gen_pipeline.decoder, limits=limits) as server:
        drawing = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = ask(drawing, {"type": "video_url", "video_url": {"url": gif_url(COLOURS)}}, max_tokens=2,
                    modalities=["text", "image"], extra_body={"max_images": 0})
    assert reply.choices[0].message.content is not None
    assert_saw_official_frames(chat_pipeline, encoded)
