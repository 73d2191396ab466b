"""The server under pressure: a full queue (429), a slow model (504), a failing model (500), and an event loop
that keeps answering while the model computes.

Tests that stand in for `ChatEngine.answer`/`stream` serve one request at a time (``max_batch_size=1``): batched
decoding does not go through those methods (tests/serve/test_batching.py covers the same behaviours there)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from emu2.serve.chat import Answer
from emu2.serve.limits import ServeLimits

from .conftest import running, unet_calls

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def blocking_answer(server, release: threading.Event, entered: threading.Event):
    """Make the chat model wait for ``release`` (as a long generation would)."""
    real = server.app.state.server.chat.answer

    def answer(prompt, settings, cancel=None):
        entered.set()
        release.wait(30)
        return real(prompt, settings, cancel)

    server.app.state.server.chat.answer = answer


def post(server, body=BODY, timeout=30):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def test_full_queue_gives_429_at_once_and_queued_requests_still_finish(chat_pipeline):
    release, entered = threading.Event(), threading.Event()
    with running(chat_pipeline, limits=ServeLimits(max_queue=2, timeout=60, max_batch_size=1)) as server:
        blocking_answer(server, release, entered)
        with ThreadPoolExecutor(3) as pool:
            running_one = pool.submit(post, server)
            assert entered.wait(10)  # the model is busy with the first request
            queued = [pool.submit(post, server) for _ in range(2)]
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/healthz").json()["queued"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            started = time.monotonic()
            refused = post(server)
            assert refused.status_code == 429 and time.monotonic() - started < 2
            assert refused.json()["error"]["type"] == "rate_limit_error"
            stream_refused = post(server, {**BODY, "stream": True})
            assert stream_refused.status_code == 429
            release.set()
            assert [f.result().status_code for f in [running_one, *queued]] == [200, 200, 200]


def test_event_loop_answers_while_the_model_computes(chat_pipeline):
    release, entered = threading.Event(), threading.Event()
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        blocking_answer(server, release, entered)
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post, server)
            assert entered.wait(10)
            started = time.monotonic()
            health = httpx.get(server.url + "/healthz", timeout=5).json()
            assert health["model_busy"] and time.monotonic() - started < 1
            release.set()
            assert busy.result().status_code == 200


def test_request_past_its_deadline_gets_504_and_generation_is_cancelled(chat_pipeline):
    seen = {}
    with running(chat_pipeline, limits=ServeLimits(timeout=0.5, max_batch_size=1)) as server:
        engine = server.app.state.server.chat

        def slow_answer(prompt, settings, cancel=None):
            seen["cancel"] = cancel
            assert cancel.wait(10)  # the server sets it at the deadline
            return []

        engine.answer = slow_answer
        reply = post(server)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert seen["cancel"].is_set()


def test_model_exception_gives_500_and_the_next_request_succeeds(chat_pipeline):
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        engine = server.app.state.server.chat
        real = engine.answer
        engine.answer = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert"))
        reply = post(server)
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        engine.answer = real
        assert post(server).status_code == 200


def test_model_exception_while_streaming_ends_the_stream_with_an_error_event(chat_pipeline):
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        engine = server.app.state.server.chat
        real = engine.stream

        def failing(prompt, settings, on_text, cancel=None):
            on_text("partial ")
            raise RuntimeError("out of memory")

        engine.stream = failing
        reply = post(server, {**BODY, "stream": True})
        assert reply.status_code == 200  # headers were sent before the model failed
        assert '"server_error"' in reply.text and reply.text.rstrip().endswith("data: [DONE]")
        engine.stream = real
        assert post(server, {**BODY, "stream": True}).text.rstrip().endswith("data: [DONE]")


def test_image_model_exception_gives_500_and_the_server_keeps_serving(gen_pipeline):
    with running(gen=gen_pipeline, limits=ServeLimits(max_inference_steps=2)) as server:
        generator = server.app.state.server.gen
        real = generator.generate
        generator.generate = lambda *a, **k: 1 / 0
        body = {"prompt": "a cat", "num_inference_steps": 1}
        reply = httpx.post(server.url + "/v1/images/generations", json=body, timeout=30)
        assert reply.status_code == 500 and "ZeroDivisionError" in reply.json()["error"]["message"]
        generator.generate = real
        assert httpx.post(server.url + "/v1/images/generations", json=body, timeout=30).status_code == 200


def test_a_client_leaving_a_stream_cancels_its_generation(chat_pipeline):
    seen = {}
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        engine = server.app.state.server.chat

        def endless(prompt, settings, on_text, cancel=None):
            seen["cancel"] = cancel
            for _ in range(500):
                if cancel.is_set():
                    return Answer("token", "stop", 1)
                on_text("token ")
                time.sleep(0.01)
            raise AssertionError("the stream was never cancelled")

        engine.stream = endless
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**BODY, "stream": True},
                          timeout=30) as reply:
            for line in reply.iter_lines():
                if "token" in line:
                    break  # leave after the first piece of the answer
        deadline = time.monotonic() + 5
        while not seen["cancel"].is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen["cancel"].is_set()


@pytest.mark.parametrize("with_chat", [False, True], ids=["serial-worker", "batching-worker"])
def test_a_client_leaving_an_image_stream_stops_denoising_and_the_next_request_is_served(
        chat_pipeline, gen_pipeline, with_chat):
    steps = 200  # at 10 ms a step (below) the image would take 2 s or more
    chat = chat_pipeline if with_chat else None  # a chat model makes the worker the batching one
    with running(chat, gen_pipeline, limits=ServeLimits(max_inference_steps=steps)) as server, \
            unet_calls(gen_pipeline.decoder.unet, delay=0.01) as calls:
        body = {"prompt": "a cat", "num_inference_steps": steps, "stream": True}
        with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=30) as reply:
            for line in reply.iter_lines():
                if '"step": 2,' in line:
                    break  # leave during the second step
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/healthz").json()["model_busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not httpx.get(server.url + "/healthz").json()["model_busy"]
        assert 2 <= len(calls) < steps // 4  # it stopped within a few steps of the client leaving
        stopped_at = len(calls)
        reply = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a dog", "num_inference_steps": 1},
                           timeout=30)
        assert reply.status_code == 200 and len(calls) == stopped_at + 1


@pytest.mark.parametrize("with_chat", [False, True], ids=["serial-worker", "batching-worker"])
def test_a_client_leaving_a_plain_image_request_stops_denoising_and_the_next_request_is_served(
        chat_pipeline, gen_pipeline, with_chat):
    steps = 200  # at 10 ms a step (below) the image would take 2 s or more
    chat = chat_pipeline if with_chat else None
    with running(chat, gen_pipeline, limits=ServeLimits(max_inference_steps=steps)) as server, \
            unet_calls(gen_pipeline.decoder.unet, delay=0.01) as calls:
        body = {"prompt": "a cat", "num_inference_steps": steps}  # not streamed: one JSON answer at the end
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/images/generations", json=body, timeout=0.3)  # the client gives up
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/healthz").json()["model_busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not httpx.get(server.url + "/healthz").json()["model_busy"]
        assert 2 <= len(calls) < steps // 2  # stopped soon after the client left, not at the deadline
        stopped_at = len(calls)
        reply = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a dog", "num_inference_steps": 1},
                           timeout=30)
        assert reply.status_code == 200 and len(calls) == stopped_at + 1


@pytest.mark.parametrize("clients", [6])
def test_concurrent_clients_are_all_answered(chat_pipeline, clients):
    with running(chat_pipeline, limits=ServeLimits(max_queue=clients)) as server:
        with ThreadPoolExecutor(clients) as pool:
            replies = list(pool.map(lambda _: post(server), range(clients)))
        assert [r.status_code for r in replies] == [200] * clients
