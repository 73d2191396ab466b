"""What an OpenAI client relies on when the server cannot do what it asks: the right status, OpenAI's error body,
and the parameter named, before any model work is spent on the request."""

import httpx
import pytest

from emu2.serve.chat import PromptTokenizer

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "hello"}]


def refusal(call, error_type=openai.BadRequestError):
    with pytest.raises(error_type) as caught:
        call()
    return caught.value


# ---------------------------------------------------------------------------------------------------- models
def test_an_unknown_model_is_a_404_model_not_found(client):
    error = refusal(lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1),
                    openai.NotFoundError)
    assert (error.code, error.param, error.type) == ("model_not_found", "model", "invalid_request_error")
    assert "'gpt-4o'" in error.message and "'emu2-chat'" in error.message
    error = refusal(lambda: client.images.generate(model="dall-e-3", prompt="a cat"), openai.NotFoundError)
    assert error.code == "model_not_found" and "'emu2-gen'" in error.message


def test_each_model_listed_is_accepted_at_its_own_endpoint_only(client):
    chat_id, gen_id = [m.id for m in client.models.list()]
    assert client.chat.completions.create(model=chat_id, messages=HELLO, max_tokens=1).model == chat_id
    image = client.images.generate(model=gen_id, prompt="a cat", extra_body={"num_inference_steps": 1})
    assert image.data[0].b64_json
    error = refusal(lambda: client.chat.completions.create(model=gen_id, messages=HELLO, max_tokens=1),
                    openai.NotFoundError)
    assert error.code == "model_not_found" and "/v1/images/generations" in error.message


# ---------------------------------------------------------------------------------------------------- fields
@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"42": -100}),
    ("frequency_penalty", 0.5),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
])
def test_an_unsupported_openai_field_is_refused_naming_it(client, field, value):
    error = refusal(lambda: client.chat.completions.create(model="emu2-chat", messages=HELLO, max_tokens=1,
                                                           **{field: value}))
    assert (error.param, error.code, error.type) == (field, "unsupported_parameter", "invalid_request_error")
    assert f"'{field}' is not supported" in error.message


def test_values_that_ask_for_nothing_and_bookkeeping_fields_are_accepted(client):
    reply = client.chat.completions.create(model="emu2-chat", messages=HELLO, max_tokens=1, tools=[],
                                           tool_choice="none", response_format={"type": "text"}, logprobs=False,
                                           frequency_penalty=0, presence_penalty=0, modalities=["text"],
                                           user="someone", metadata={"run": "1"}, store=False)
    assert reply.choices[0].message.role == "assistant"


def test_a_misspelt_field_is_refused_as_unrecognized(client):
    error = refusal(lambda: client.chat.completions.create(model="emu2-chat", messages=HELLO,
                                                           extra_body={"max_token": 5}))
    assert (error.param, error.code) == ("max_token", "unknown_parameter")


def test_tool_calls_in_a_message_are_refused(client):
    messages = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, *HELLO]
    error = refusal(lambda: client.chat.completions.create(model="emu2-chat", messages=messages, max_tokens=1))
    assert error.param == "messages[1].tool_calls"


@pytest.mark.parametrize("field,value", [("style", "vivid"), ("quality", "hd"), ("background", "transparent")])
def test_an_unsupported_image_field_is_refused_naming_it(client, field, value):
    error = refusal(lambda: client.images.generate(prompt="a cat", **{field: value}))
    assert (error.param, error.code) == (field, "unsupported_parameter")


# ------------------------------------------------------------------------------------------ malformed bodies
def test_invalid_json_is_a_400_saying_where(server):
    body = '{\n  "model": "emu2-chat",\n  "messages": [}\n}'
    reply = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_json")
    assert error["message"].startswith("the request body is not valid JSON")
    assert "line 3 column 16" in error["message"] and f"character {body.index('}')}" in error["message"]


def test_an_audio_content_part_is_refused_naming_its_type(client):
    content = [{"type": "text", "text": "What is said?"},
               {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    error = refusal(lambda: client.chat.completions.create(
        model="emu2-chat", max_tokens=1, messages=[{"role": "user", "content": content}]))
    assert error.body["message"] == ("messages[0].content[1]: content part type 'input_audio' is not supported "
                                     "(supported: text, image_url, video_url, video)")
    assert (error.param, error.code) == ("messages[0].content[1].type", "unsupported_content_part")


# ------------------------------------------------------------------------------------------------ huge prompts
@pytest.fixture
def model_work(server, monkeypatch):
    """Records every tokenizer call and every job handed to the model worker."""
    seen = {"tokenized": 0, "submitted": 0}
    tokenize, worker = PromptTokenizer.__call__, server.app.state.server.worker
    submit = worker.submit

    def counting_tokenize(self, text):
        seen["tokenized"] += 1
        return tokenize(self, text)

    def counting_submit(fn):
        seen["submitted"] += 1
        return submit(fn)

    monkeypatch.setattr(PromptTokenizer, "__call__", counting_tokenize)
    monkeypatch.setattr(worker, "submit", counting_submit)
    return seen


def test_a_huge_prompt_is_refused_before_tokenizing_or_queueing(client, model_work):
    huge = "word " * 180_000  # 900 KB: under the test server's 1 MB body limit, far over 512 tokens
    error = refusal(lambda: client.chat.completions.create(
        model="emu2-chat", max_tokens=1, messages=[{"role": "user", "content": [{"type": "text", "text": huge}]}]))
    assert (error.param, error.code) == ("messages", "context_length_exceeded")
    error = refusal(lambda: client.images.generate(prompt=huge))
    assert (error.param, error.code) == ("prompt", "context_length_exceeded")
    assert model_work == {"tokenized": 0, "submitted": 0}


def test_a_prompt_within_the_length_bound_is_still_tokenized_and_answered(client, model_work):
    client.chat.completions.create(model="emu2-chat", messages=HELLO, max_tokens=1)
    assert model_work["tokenized"] >= 1 and model_work["submitted"] == 1


@pytest.mark.parametrize("text", ["</delimiter_of_multi_objects/>" * 50, "<patch_index_0001>" * 40,
                                  "internationalization " * 40, " " * 500, "日本語のテキスト" * 50, "a" * 1000])
def test_no_text_tokenizes_to_fewer_tokens_than_the_length_bound_assumes(chat_pipeline, text):
    tokenizer = PromptTokenizer(chat_pipeline.tokenizer, chat_pipeline.model.config)
    assert len(tokenizer(text)) * tokenizer.max_token_chars >= len(text)


# ------------------------------------------------------------------------------------------------------- docs
def test_docs_pages_say_where_the_schema_is_instead_of_loading_a_cdn(server):
    for page in ("/docs", "/redoc"):
        reply = httpx.get(server.url + page)
        assert reply.status_code == 404 and "/openapi.json" in reply.json()["error"]["message"]
        assert "cdn.jsdelivr" not in reply.text
    assert httpx.get(server.url + "/openapi.json").json()["paths"]
