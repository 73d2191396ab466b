"""The OpenAI-compatible endpoints, driven by the official `openai` client against a real server."""

import base64
import io

import httpx
from PIL import Image

from .conftest import data_url, png_bytes, sse_events


def image_message(text="What is in the image?", colour="red"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(colour)}},
                                        {"type": "text", "text": text}]}


def test_chat_with_a_data_url_image_answers_in_openai_format(client):
    reply = client.chat.completions.create(model="emu2-chat", messages=[image_message()], max_tokens=6)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    # The prompt counts each image's visual slots (n_query = 4 for the tiny preset) plus the text.
    assert reply.usage.prompt_tokens > 4 and 0 < reply.usage.completion_tokens <= 6


def test_string_content_system_message_and_multi_turn(client):
    reply = client.chat.completions.create(model="emu2-chat", max_tokens=4, messages=[
        {"role": "system", "content": "You are terse."},
        image_message("Describe it."),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its colour?"},
    ])
    assert isinstance(reply.choices[0].message.content, str)


def test_streaming_sends_chunks_ending_with_done_and_matches_the_whole_answer(client, server):
    messages = [image_message("Say something.")]
    whole = client.chat.completions.create(model="emu2-chat", messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model="emu2-chat", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content  # greedy: the same answer either way
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                     json={"messages": messages, "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_sampling_with_n_and_seed_is_reproducible(client):
    kwargs = {"model": "emu2-chat", "messages": [image_message()], "max_tokens": 5, "temperature": 1.0, "top_p": 0.9,
              "n": 2, "seed": 7}
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2 and [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_beam_search_and_grounding_extensions(client):
    reply = client.chat.completions.create(model="emu2-chat", messages=[image_message("Where is it?")], max_tokens=4,
                                           n=2, extra_body={"num_beams": 3, "grounding": True})
    assert len(reply.choices) == 2


def test_stop_string_ends_the_answer_before_it(client):
    free = client.chat.completions.create(model="emu2-chat", messages=[image_message()], max_tokens=12)
    text = free.choices[0].message.content
    stop = text.strip()[3:5]  # two characters from inside the free answer
    assert len(stop) == 2, text
    cut = client.chat.completions.create(model="emu2-chat", messages=[image_message()], max_tokens=12, stop=[stop])
    assert stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content) and cut.choices[0].finish_reason == "stop"


def test_image_generation_returns_a_png_as_b64_json(client):
    result = client.images.generate(model="emu2-gen", prompt="a red circle", response_format="b64_json",
                                    extra_body={"num_inference_steps": 2, "seed": 0})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (16, 16)  # the tiny decoder's native size


def test_image_generation_with_size_n_input_images_and_grounded_objects(client):
    result = client.images.generate(prompt="[<IMG_PLH>] in the style of a painting", n=2, size="24x32",
                                    extra_body={"images": [data_url("blue")], "num_inference_steps": 1, "seed": 3,
                                                "objects": [{"phrase": "a dog", "box": [0, 200, 100, 400],
                                                             "image": data_url("white")}]})
    sizes = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in result.data]
    assert sizes == [(24, 32), (24, 32)]


def test_image_usage_counts_the_prompt_with_its_image_slots_and_the_embeddings_regressed(client, gen_pipeline):
    slots = gen_pipeline.encoder.model.config.n_query
    text_only = client.images.generate(prompt="a red circle", n=2, extra_body={"num_inference_steps": 1}).usage
    assert text_only.output_tokens == 2 * slots and text_only.input_tokens_details.image_tokens == 0
    assert text_only.total_tokens == text_only.input_tokens + text_only.output_tokens
    with_image = client.images.generate(prompt="[<IMG_PLH>] in the style of a painting",
                                        extra_body={"images": [data_url("blue")], "num_inference_steps": 1}).usage
    assert with_image.input_tokens_details.image_tokens == slots and with_image.output_tokens == slots
    assert with_image.input_tokens == with_image.input_tokens_details.text_tokens + slots
    streamed = [e for e in client.images.generate(prompt="a red circle", stream=True, n=2,
                                                  extra_body={"num_inference_steps": 1})
                if e.type == "image_generation.completed"]
    assert [e.usage.output_tokens for e in streamed] == [slots, slots]  # each event: the prompt and its one image
    assert streamed[0].usage.input_tokens == text_only.input_tokens


def test_same_seed_same_image(client):
    def png():
        return client.images.generate(prompt="a cat", extra_body={"num_inference_steps": 2, "seed": 11}).data[0]
    assert png().b64_json == png().b64_json


def test_url_response_format_is_a_data_url(client):
    result = client.images.generate(prompt="a cat", response_format="url", extra_body={"num_inference_steps": 1})
    assert result.data[0].url.startswith("data:image/png;base64,")


def test_a_streamed_image_reports_the_queue_each_denoising_step_then_the_image(server):
    body = {"prompt": "a red circle", "n": 2, "num_inference_steps": 3, "seed": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply.iter_lines())
    assert events[-1] == (None, "[DONE]")
    statuses = [data["emu2"] for name, data in events if name == "emu2.status"]
    assert statuses[0]["status"] == "queued" and statuses[1] == {"status": "running"}
    assert [(s["image"], s["step"], s["steps"]) for s in statuses[2:]] == [(i, k, 3) for i in (1, 2) for k in (1, 2, 3)]
    images = [data for name, data in events if name == "image_generation.completed"]
    assert [(d["type"], d["size"], d["output_format"]) for d in images] == [("image_generation.completed", "16x16",
                                                                               "png")] * 2
    whole = httpx.post(server.url + "/v1/images/generations", json={**body, "stream": False}, timeout=30).json()
    assert [d["b64_json"] for d in images] == [d["b64_json"] for d in whole["data"]]  # seeded: the same images


def test_the_openai_client_reads_a_streamed_image(client):
    events = list(client.images.generate(prompt="a cat", stream=True, extra_body={"num_inference_steps": 1}))
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 1
    assert Image.open(io.BytesIO(base64.b64decode(completed[0].b64_json))).format == "PNG"


def test_a_streamed_edit_ends_with_image_edit_completed(server):
    body = {"image": data_url("red"), "prompt": "wearing a red hat", "num_inference_steps": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/images/edits", json=body, timeout=30) as reply:
        names = [name for name, _ in sse_events(reply.iter_lines())]
    assert names[-2:] == ["image_edit.completed", None] and "emu2.status" in names


def test_image_edit_as_openai_multipart(client):
    result = client.images.edit(image=("red.png", png_bytes("red"), "image/png"), prompt="make it blue",
                                extra_body={"num_inference_steps": 1})
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == "PNG"


def test_image_edit_as_json_with_a_data_url(server):
    reply = httpx.post(server.url + "/v1/images/edits", timeout=30, json={
        "image": data_url("red"), "prompt": "wearing a red hat", "num_inference_steps": 1})
    assert reply.status_code == 200 and reply.json()["data"][0]["b64_json"]


def test_file_url_under_the_allowed_dir_is_read(client, allowed_dir):
    reply = client.chat.completions.create(model="emu2-chat", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": (allowed_dir / "green.png").as_uri()}},
        {"type": "text", "text": "colour?"}]}])
    assert reply.choices[0].message.content is not None


def test_models_health_and_openapi_schema(client, server):
    assert [m.id for m in client.models.list()] == ["emu2-chat", "emu2-gen"]
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["chat_model"] == "emu2-chat"
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/healthz"):
        assert path in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]


def test_the_web_page_is_served_only_with_ui(server, chat_pipeline):
    from .conftest import running

    assert httpx.get(server.url + "/").status_code == 404
    with running(chat_pipeline, ui=True) as ui_server:
        page = httpx.get(ui_server.url + "/")
        assert page.status_code == 200 and "static/app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(ui_server.url + "/static/app.js").status_code == 200
        # No image model on this server: the image endpoints say how to get one.
        reply = httpx.post(ui_server.url + "/v1/images/generations", json={"prompt": "x"})
        assert reply.status_code == 404 and "--gen-model" in reply.json()["error"]["message"]
