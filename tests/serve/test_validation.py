"""Malformed or over-limit requests get OpenAI-style 4xx JSON errors, and the server keeps serving."""

import base64
import io

import httpx
import pytest
from PIL import Image

from .conftest import data_url


def post(server, path, body=None, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


def chat(server, content, **fields):
    return post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **fields})


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def assert_error(reply, status, param=None, code=None):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def big_png_url(side):
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")  # compresses to a few KB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(autouse=True)
def server_still_serves(server):
    """After every malformed request the same server answers a good one."""
    yield
    assert chat(server, "hello", max_tokens=1).status_code == 200


def test_bad_base64_in_a_data_url(server):
    reply = chat(server, [image_part("data:image/png;base64,not*base64!"), {"type": "text", "text": "hi"}])
    assert_error(reply, 400, "messages[0].content[0].image_url.url", "invalid_base64")


def test_bytes_that_are_not_an_image(server):
    url = "data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode()
    assert_error(chat(server, [image_part(url)]), 400, code="invalid_image")


def test_image_with_too_many_pixels_is_refused_before_decoding(server):
    error = assert_error(chat(server, [image_part(big_png_url(4000))]), 400, code="image_too_large")
    assert "--max-image-pixels" in error["message"]


def test_image_file_over_the_byte_limit(server):
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(300_000)).decode()
    assert_error(chat(server, [image_part(url)]), 400, code="image_too_large")


def test_body_over_the_request_limit_is_413(server):
    reply = chat(server, "x" * 1_200_000)
    assert_error(reply, 413, code="request_too_large")


def test_streamed_body_over_the_request_limit_is_413(server):
    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(30):
            yield b" " * 50_000
    reply = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30,
                       headers={"content-type": "application/json"})
    assert_error(reply, 413)


def test_malformed_part_is_reported_at_the_part_not_as_a_non_string(server):
    error = assert_error(chat(server, [{"type": "text"}]), 400, "messages[0].content[0].text", "invalid_request")
    assert "Field required" in error["message"]


def test_image_url_that_is_not_a_string(server):
    assert_error(chat(server, [{"type": "image_url", "image_url": {"url": 42}}]), 400)


def test_http_image_urls_are_not_fetched(server):
    assert_error(chat(server, [image_part("http://127.0.0.1:9/cat.png")]), 400, code="unsupported_image_url")


def test_too_many_images(server):
    reply = chat(server, [image_part(data_url()) for _ in range(4)])
    error = assert_error(reply, 400, "messages", "too_many_images")
    assert "--max-images" in error["message"]


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10_000}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 99}, "n"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"num_beams": 1000}, "num_beams"), ({"n": 2}, "n"), ({"stream": True, "num_beams": 2}, "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": "x" * 65}, "stop"), ({"max_tokens": "many"}, "max_tokens"),
    ({"num_beams": 2, "length_penalty": 1e308}, "length_penalty"), ({"temperature": 1, "seed": 2**70}, "seed"),
])
def test_out_of_range_decoding_settings(server, fields, param):
    assert_error(chat(server, "hi", **fields), 400, param)


@pytest.mark.parametrize("messages", [
    [], [{"role": "assistant", "content": "hi"}], [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                      "content": "b"}],
    [{"role": "tool", "content": "x"}], [{"role": "system", "content": [image_part(data_url())]},
                                         {"role": "user", "content": "x"}],
])
def test_conversations_the_template_cannot_hold(server, messages):
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400)


def test_text_holding_image_slot_tokens_is_refused(server):
    assert_error(chat(server, "look: <image><image>"), 400, code="reserved_token")
    assert_error(chat(server, "[<IMG_PLH>]"), 400, code="reserved_token")


def test_lone_surrogates_are_not_text(server):
    body = '{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}'
    reply = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    assert_error(reply, 400, "messages[0].content", "invalid_text")
    body = '{"messages": [{"role": "user", "content": "hi"}], "model": "\\udfff", "max_tokens": 1}'
    reply = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    # The refusal quotes the model name escaped: a lone surrogate cannot be encoded in the UTF-8 response.
    assert_error(reply, 404, "model", "model_not_found")


def test_vanishing_temperature_decodes_greedily_instead_of_overflowing(server):
    greedy = chat(server, "hi", max_tokens=4).json()["choices"][0]["message"]["content"]
    tiny = chat(server, "hi", max_tokens=4, temperature=1e-300)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == greedy


def test_prompt_over_the_token_limit(server):
    error = assert_error(chat(server, "word " * 600), 400, "messages", "context_length_exceeded")
    assert "--max-prompt-tokens" in error["message"]


def test_not_json_and_wrong_json(server):
    reply = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                       headers={"content-type": "application/json"})
    assert_error(reply, 400, code="invalid_json")
    assert_error(post(server, "/v1/chat/completions", [1, 2, 3]), 400)
    reply = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": "\xff"}', timeout=30,
                       headers={"content-type": "application/json"})
    assert_error(reply, 400)  # not UTF-8


def test_unknown_route_and_wrong_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------------------ file URLs
def test_path_traversal_in_a_file_url_is_refused(server, allowed_dir):
    url = allowed_dir.as_uri() + "/../secret.png"
    assert_error(chat(server, [image_part(url)]), 403, code="path_not_allowed")
    encoded = allowed_dir.as_uri() + "/%2e%2e/secret.png"
    assert_error(chat(server, [image_part(encoded)]), 403, code="path_not_allowed")


def test_file_url_outside_the_allowed_dir_is_refused(server, allowed_dir):
    assert_error(chat(server, [image_part((allowed_dir.parent / "secret.png").as_uri())]), 403)
    assert_error(chat(server, [image_part("file:///etc/passwd")]), 403, code="path_not_allowed")


def test_symlink_leading_out_of_the_allowed_dir_is_refused(server, allowed_dir):
    assert (allowed_dir / "link.png").is_symlink()
    assert_error(chat(server, [image_part((allowed_dir / "link.png").as_uri())]), 403, code="path_not_allowed")


def test_file_url_with_a_host_is_refused(server, allowed_dir):
    assert_error(chat(server, [image_part("file://example.com" + str(allowed_dir / "green.png"))]), 400)


def test_file_urls_are_refused_when_no_dir_is_allowed(chat_pipeline, allowed_dir):
    from .conftest import running

    with running(chat_pipeline) as plain:
        reply = chat(plain, [image_part((allowed_dir / "green.png").as_uri())])
        error = assert_error(reply, 403, code="file_urls_disabled")
        assert "--allowed-dir" in error["message"]


# --------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("fields,param", [
    ({"size": "big"}, "size"), ({"size": "15x16"}, "size"), ({"size": "4096x4096"}, "size"),
    ({"n": 9}, "n"), ({"num_inference_steps": 1000}, "num_inference_steps"),
    ({"response_format": "gif"}, "response_format"), ({"images": ["data:image/png;base64,%%%"]}, "images[0]"),
    ({"objects": [{"phrase": "a dog", "box": [10, 10, 5, 5]}]}, "prompt"),
    ({"objects": [{"phrase": "a dog", "box": [1, 2, 3]}]}, "objects[0].box"),
    ({"prompt": "two [<IMG_PLH>] [<IMG_PLH>]", "images": [data_url()]}, "prompt"),
    ({"prompt": "<image>"}, "prompt"),
])
def test_bad_image_generation_requests(server, fields, param):
    assert_error(post(server, "/v1/images/generations", {"prompt": "a cat", **fields}), 400, param)


def test_image_edit_needs_an_image_and_no_mask(server):
    assert_error(post(server, "/v1/images/edits", {"prompt": "x"}), 400, "image")
    assert_error(post(server, "/v1/images/edits", {"prompt": "x", "image": data_url(), "mask": data_url()}), 400,
                 "mask")
    reply = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, timeout=30,
                       files={"image": ("a.png", b"not an image", "image/png")})
    assert_error(reply, 400, code="invalid_image")
    assert_error(httpx.post(server.url + "/v1/images/edits", content=b"x", headers={"content-type": "text/plain"}),
                 400, code="unsupported_content_type")
