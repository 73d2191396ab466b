"""Chat answers with images (``modalities: ["text", "image"]``), seen through the official `openai` client on a
real loopback server: a tiny random chat model writes, a tiny random visual decoder draws."""

import base64
import io
import threading

import pytest
from PIL import Image

from .conftest import running

openai = pytest.importorskip("openai")

DRAW = [{"role": "user", "content": "Tell a story with pictures."}]
WITH_IMAGES = {"modalities": ["text", "image"]}


@pytest.fixture(scope="module")
def drawing_server(chat_pipeline, gen_pipeline):
    from emu2.serve.limits import ServeLimits

    limits = ServeLimits(max_tokens=32, max_inference_steps=4, max_answer_images=3)
    with running(chat_pipeline, None, decoder=gen_pipeline.decoder, limits=limits) as server:
        yield server


@pytest.fixture(scope="module")
def drawing_client(drawing_server):
    return openai.OpenAI(base_url=drawing_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(client, **kwargs):
    body = {"image_at": [0], "num_inference_steps": 2} | kwargs.pop("extra", {})
    return client.chat.completions.create(model="emu2-chat", messages=DRAW, max_tokens=4, extra_body=body,
                                          **WITH_IMAGES, **kwargs)


def picture(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def part_type(part) -> str:
    return part["type"] if isinstance(part, dict) else part.type


def test_the_openai_client_receives_an_answer_of_ordered_text_and_image_parts(drawing_client):
    reply = ask(drawing_client, extra={"image_at": [0, 2]})
    content = reply.choices[0].message.content
    assert [part_type(p) for p in content] == ["image_url", "text", "image_url", "text"]
    for part in content[0], content[2]:
        assert picture(part["image_url"]["url"]).size == (16, 16)  # the tiny decoder's native size
    assert all(p["text"] for p in content if part_type(p) == "text")
    # The answer's positions: 4 text tokens, each image [IMG] + n_query slots + [/IMG] (n_query 4 here).
    assert reply.usage.completion_tokens == 4 + 2 * (4 + 2)
    assert reply.choices[0].finish_reason == "length"


def test_a_streamed_answer_sends_text_deltas_and_one_chunk_per_finished_image(drawing_client):
    whole = ask(drawing_client, extra={"image_at": [0, 2], "seed": 0}).choices[0].message.content
    chunks = list(ask(drawing_client, stream=True, extra={"image_at": [0, 2], "seed": 0}))
    streamed = []
    for chunk in chunks:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if isinstance(content, list):
            assert len(content) == 1 and part_type(content[0]) == "image_url"
            streamed.append(content[0])
        elif content:
            if streamed and part_type(streamed[-1]) == "text":
                streamed[-1]["text"] += content
            else:
                streamed.append({"type": "text", "text": content})
    assert [part_type(p) for p in streamed] == [part_type(p) for p in whole]
    assert "".join(p["text"] for p in streamed if part_type(p) == "text").strip() == \
        "".join(p["text"] for p in whole if part_type(p) == "text").strip()
    # The same greedy answer and the same seeded noise: the very same pictures.
    assert [p["image_url"]["url"] for p in streamed if part_type(p) == "image_url"] == \
        [p["image_url"]["url"] for p in whole if part_type(p) == "image_url"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stream_reports_its_queue_position_start_and_each_denoising_step(drawing_client):
    statuses = [(chunk.model_extra or {}).get("emu2") for chunk in ask(drawing_client, stream=True)]
    statuses = [s for s in statuses if s]
    assert statuses[0]["status"] == "queued" and statuses[0]["ahead"] >= 0
    assert statuses[1] == {"status": "running"}
    assert statuses[2:] == [{"status": "drawing", "image": 1, "step": k, "steps": 2} for k in (1, 2)]


def test_a_plain_request_still_gets_text_content(drawing_client):
    reply = drawing_client.chat.completions.create(model="emu2-chat", messages=DRAW, max_tokens=3,
                                                   modalities=["text"])
    assert isinstance(reply.choices[0].message.content, str)


def test_without_a_visual_decoder_the_opt_in_is_a_clear_400(chat_pipeline):
    with running(chat_pipeline) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client)
    error = caught.value
    assert (error.code, error.param) == ("no_image_decoder", "modalities")
    assert "--gen-model" in error.message and "--decoder" in error.message


@pytest.mark.parametrize("modalities", [["image"], ["text", "image", "audio"], ["text", "text", "image"], []])
def test_modalities_other_than_text_or_text_and_image_are_refused(drawing_client, modalities):
    with pytest.raises(openai.BadRequestError) as caught:
        drawing_client.chat.completions.create(model="emu2-chat", messages=DRAW, max_tokens=1,
                                               modalities=modalities)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", "modalities")


def test_image_fields_without_the_opt_in_are_refused_naming_it(drawing_client):
    with pytest.raises(openai.BadRequestError) as caught:
        drawing_client.chat.completions.create(model="emu2-chat", messages=DRAW, max_tokens=1,
                                               extra_body={"image_at": [0]})
    assert caught.value.param == "image_at" and '"modalities": ["text", "image"]' in caught.value.message


@pytest.mark.parametrize("extra,param,flag", [
    ({"max_images": 4}, "max_images", "--max-answer-images"),
    ({"num_inference_steps": 5}, "num_inference_steps", "--max-inference-steps"),
    ({"max_images": 1, "image_at": [0, 1]}, "image_at", "max_images is 1"),
    ({"image_at": [5]}, "image_at", "max_tokens"),
])
def test_image_limits_are_refused_naming_the_limit(drawing_client, extra, param, flag):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(drawing_client, extra=extra)
    assert caught.value.param == param and flag in caught.value.message


def test_max_images_bounds_the_images_of_an_answer(drawing_client):
    content = ask(drawing_client, extra={"max_images": 1, "image_at": [1]}).choices[0].message.content
    assert sum(part_type(p) == "image_url" for p in content) == 1
    content = ask(drawing_client, extra={"max_images": 0, "image_at": []}).choices[0].message.content
    assert [part_type(p) for p in content] == ["text"]


def test_image_positions_count_against_the_models_context(chat_pipeline, gen_pipeline):
    from emu2.serve.limits import ServeLimits

    positions = chat_pipeline.model.config.text_config.max_position_embeddings
    limits = ServeLimits(max_tokens=32, max_answer_images=positions)  # a cap the context cannot hold
    with running(chat_pipeline, None, decoder=gen_pipeline.decoder, limits=limits) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, extra={"max_images": positions // 6})
    assert caught.value.code == "context_length_exceeded" and "image positions" in caught.value.message


def test_a_cancelled_answer_stops_drawing(chat_pipeline, gen_pipeline):
    from emu2.serve.chat import ChatEngine, DecodingSettings
    from emu2.serve.interleaved_chat import ImageAnswerSettings, InterleavedChat

    prompt = ChatEngine(chat_pipeline).build_prompt([["Draw."]])
    cancel, steps = threading.Event(), []
    cancel.set()
    [answer] = InterleavedChat(chat_pipeline, gen_pipeline.decoder).answer(
        prompt, DecodingSettings(max_new_tokens=4), ImageAnswerSettings(1, (0,), 2), cancel,
        lambda kind, value: steps.append(value) if kind == "status" and value["status"] == "drawing" else None)
    assert steps == [] and all(part_type(p) != "image_url" for p in answer.parts)
