"""Batched decoding of concurrent chat answers: the same answers as one at a time, each request's own settings,
stops and cancellation honoured, and answers joining and leaving a running batch."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from emu2.serve.batching import BatchDecoder, BatchingWorker, BatchRequest, ChatCall
from emu2.serve.chat import ChatEngine, DecodingSettings
from emu2.serve.limits import ServeLimits
from emu2.serve.queue import ModelWorker

from .conftest import data_url, png_image, running


@pytest.fixture(scope="module")
def engine(chat_pipeline):
    return ChatEngine(chat_pipeline)


@pytest.fixture(scope="module")
def prompts(engine):
    """Prompts of different lengths, with zero, one and two images."""
    return [
        engine.build_prompt([[png_image("red"), "What is it?"]]),
        engine.build_prompt([["Hi"]]),
        engine.build_prompt([[png_image("blue"), "Compare the two pictures in every detail you can see " * 3,
                              png_image("green")]]),
        engine.build_prompt([["Tell me a story about a fox."], "Once upon a time.", ["Go on."]]),
    ]


def collect(engine, prompt, settings, on_text=None):
    """A `BatchRequest` and the dict its outcome lands in."""
    outcome = {}
    request = BatchRequest(ChatCall(engine, prompt, settings, on_text),
                           finish=lambda result, error: outcome.update(result=result, error=error))
    return request, outcome


def run_to_end(decoder, requests, join_every=2):
    """Join one request every ``join_every`` steps (answers join a batch that is already running)."""
    waiting, steps = list(requests), 0
    while waiting or decoder.active:
        if waiting and steps % join_every == 0:
            decoder.join([waiting.pop(0)])
        decoder.step()
        steps += 1


def test_batched_greedy_answers_equal_answers_decoded_alone(engine, prompts):
    settings = [DecodingSettings(max_new_tokens=n) for n in (12, 5, 20, 9)]
    alone = [engine.answer(p, s)[0] for p, s in zip(prompts, settings)]
    decoder = BatchDecoder(engine)
    pairs = [collect(engine, p, s) for p, s in zip(prompts, settings)]
    decoder.join([pairs[0][0], pairs[1][0]])  # a group prefilled together (left-padded)...
    run_to_end(decoder, [r for r, _ in pairs[2:]])  # ...and answers joining it while it runs
    assert [o["result"][0] for _, o in pairs] == alone
    assert decoder.batching_factor > 1


def test_the_shared_system_message_is_prefilled_once_and_the_answers_stay_those_decoded_alone(engine, prompts):
    settings = DecodingSettings(max_new_tokens=10)
    alone = [engine.answer(p, settings)[0] for p in prompts]
    decoder = BatchDecoder(engine)
    pairs = [collect(engine, p, settings) for p in prompts]
    decoder.join([pairs[0][0], pairs[1][0]])  # the prefix is prefilled here, once for both
    assert decoder.prefix_tokens_reused == 0 and len(decoder.prefix_cache) == 1
    (prefix,) = decoder.prefix_cache
    run_to_end(decoder, [r for r, _ in pairs[2:]])  # ...and reused by each later join
    assert decoder.prefix_tokens_reused == 2 * len(prefix)
    assert [o["result"][0].text for _, o in pairs] == [a.text for a in alone]
    # A system message of its own (here: none) is not the cached prefix: prefilled whole, with the same answer.
    own = engine.build_prompt([["Hi"]], system=None)
    request, outcome = collect(engine, own, settings)
    run_to_end(decoder, [request])
    assert decoder.prefix_tokens_reused == 2 * len(prefix)
    assert outcome["result"][0].text == engine.answer(own, settings)[0].text


def test_an_answer_that_reaches_max_tokens_leaves_the_batch_and_the_others_continue(engine, prompts):
    short, long = DecodingSettings(max_new_tokens=2), DecodingSettings(max_new_tokens=10)
    decoder = BatchDecoder(engine)
    (r_short, o_short), (r_long, o_long) = collect(engine, prompts[0], short), collect(engine, prompts[2], long)
    decoder.join([r_short, r_long])
    decoder.step()
    assert decoder.active == 1 and o_short["result"][0].num_tokens == 2 and "result" not in o_long
    while decoder.active:
        decoder.step()
    assert o_short["result"] == engine.answer(prompts[0], short)
    assert o_long["result"] == engine.answer(prompts[2], long)


def test_an_answer_that_meets_its_stop_string_leaves_the_batch_and_the_others_continue(engine, prompts):
    free = engine.answer(prompts[0], DecodingSettings(max_new_tokens=12))[0].text
    stop = free.split()[1] if len(free.split()) > 1 else free[4:7]  # a piece from the middle of the answer
    stopped, other = DecodingSettings(max_new_tokens=12, stop=[stop]), DecodingSettings(max_new_tokens=16)
    decoder = BatchDecoder(engine)
    (r_stop, o_stop), (r_other, o_other) = collect(engine, prompts[0], stopped), collect(engine, prompts[3], other)
    decoder.join([r_stop, r_other])
    while "result" not in o_stop:
        decoder.step()
    assert decoder.active == 1 and "result" not in o_other
    while decoder.active:
        decoder.step()
    [answer] = o_stop["result"]
    assert stop not in answer.text and answer.finish_reason == "stop"
    assert o_stop["result"] == engine.answer(prompts[0], stopped)
    assert o_other["result"] == engine.answer(prompts[3], other)


def test_a_cancelled_answer_leaves_the_batch_with_what_it_has(engine, prompts):
    settings = DecodingSettings(max_new_tokens=30)
    decoder = BatchDecoder(engine)
    (r_cancel, o_cancel), (r_other, o_other) = collect(engine, prompts[0], settings), collect(engine, prompts[1],
                                                                                               settings)
    decoder.join([r_cancel, r_other])
    decoder.step()
    r_cancel.cancel.set()
    decoder.step()
    assert decoder.active == 1 and o_cancel["result"][0].num_tokens < 30
    while decoder.active:
        decoder.step()
    assert o_other["result"] == engine.answer(prompts[1], settings)


def test_an_answer_past_its_deadline_leaves_the_batch(engine, prompts):
    decoder = BatchDecoder(engine)
    late, outcome = collect(engine, prompts[1], DecodingSettings(max_new_tokens=30))
    decoder.join([late])
    late.deadline = time.monotonic() - 1
    decoder.drop_interrupted()
    assert decoder.active == 0 and outcome["result"][0].num_tokens == 1


def test_a_seeded_sampled_answer_is_the_same_batched_and_alone(engine, prompts):
    sampled = DecodingSettings(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    decoder = BatchDecoder(engine)
    neighbours = [collect(engine, prompts[0], DecodingSettings(max_new_tokens=6, temperature=1.3, seed=1)),
                  collect(engine, prompts[2], DecodingSettings(max_new_tokens=8))]
    request, outcome = collect(engine, prompts[3], sampled)
    decoder.join([r for r, _ in neighbours])
    run_to_end(decoder, [request])
    by_itself = BatchDecoder(engine)
    alone, alone_outcome = collect(engine, prompts[3], sampled)
    run_to_end(by_itself, [alone])
    assert outcome["result"] == alone_outcome["result"]
    # Each answer draws from its own generator seeded like transformers generate after torch.manual_seed(seed).
    assert outcome["result"] == engine.answer(prompts[3], sampled)


def test_streamed_pieces_add_up_to_the_answer_decoded_alone(engine, prompts):
    settings = DecodingSettings(max_new_tokens=14)
    decoder = BatchDecoder(engine)
    pieces = []
    streamed, outcome = collect(engine, prompts[2], settings, on_text=pieces.append)
    other, _ = collect(engine, prompts[0], DecodingSettings(max_new_tokens=4))
    decoder.join([other])
    run_to_end(decoder, [streamed], join_every=1)
    answer = outcome["result"]
    assert "".join(pieces).strip() == answer.text
    assert answer == engine.stream(prompts[2], settings, lambda text: None)


def test_an_answer_whose_stream_fails_ends_alone_and_the_others_continue(engine, prompts):
    def broken(text):
        raise BrokenPipeError("client gone")

    settings = DecodingSettings(max_new_tokens=10)
    decoder = BatchDecoder(engine)
    (failing, o_failing), (other, o_other) = (collect(engine, prompts[2], settings, on_text=broken),
                                              collect(engine, prompts[0], settings))
    decoder.join([failing, other])
    while decoder.active:
        decoder.step()
    assert isinstance(o_failing["error"], BrokenPipeError)
    assert o_other["result"] == engine.answer(prompts[0], settings)


def test_a_group_larger_than_the_room_left_is_refused(engine, prompts):
    decoder = BatchDecoder(engine, max_batch_size=1)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.join([collect(engine, p, DecodingSettings(max_new_tokens=2))[0] for p in prompts[:2]])


# ------------------------------------------------------------------------------------------------ server
BODY = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}},
                                                  {"type": "text", "text": "What is in the image?"}]}]}


def post(server, **fields):
    reply = httpx.post(server.url + "/v1/chat/completions", json={**BODY, **fields}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def stream_text(server, **fields):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**BODY, **fields, "stream": True},
                      timeout=60) as reply:
        pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                  for line in reply.iter_lines() if line.startswith("data: {")]
    return "".join(pieces)


def test_max_batch_size_chooses_the_batching_or_the_serial_worker(chat_pipeline):
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=4)) as server:
        assert isinstance(server.app.state.server.worker, BatchingWorker)
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        assert type(server.app.state.server.worker) is ModelWorker


def test_concurrent_requests_are_decoded_together_with_the_answers_of_the_serial_server(chat_pipeline):
    requests = [{"max_tokens": n} for n in (3, 8, 5, 12)] + [{"max_tokens": 6, "num_beams": 2}]
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=1)) as server:
        serial = [post(server, **r) for r in requests] + [stream_text(server, max_tokens=7)]
    with running(chat_pipeline, limits=ServeLimits(max_batch_size=8, max_queue=8)) as server:
        worker = server.app.state.server.worker
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            futures = [pool.submit(post, server, **r) for r in requests]  # beam search among them runs alone
            futures.append(pool.submit(stream_text, server, max_tokens=7))
            batched = [f.result() for f in futures]
        health = httpx.get(server.url + "/healthz").json()["batching"]
    assert batched == serial
    assert worker.decoder.decode_steps > 0
    assert health == {"decode_steps": worker.decoder.decode_steps, "sequence_steps": worker.decoder.sequence_steps,
                      "prefix_tokens_reused": worker.decoder.prefix_tokens_reused}


def test_a_batched_request_past_its_deadline_gets_504_and_leaves_the_batch(chat_pipeline):
    with running(chat_pipeline, limits=ServeLimits(timeout=0.5, max_tokens=100_000)) as server:
        worker = server.app.state.server.worker
        reply = httpx.post(server.url + "/v1/chat/completions", json={**BODY, "max_tokens": 100_000}, timeout=30)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 5
        while worker.decoder.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.decoder.active == 0


def test_a_failing_batched_step_gives_500_and_the_next_request_succeeds(chat_pipeline):
    with running(chat_pipeline) as server:
        decoder = server.app.state.server.worker.decoder
        real = decoder.step
        decoder.step = lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
        reply = httpx.post(server.url + "/v1/chat/completions", json={**BODY, "max_tokens": 4}, timeout=30)
        assert reply.status_code == 500 and "RuntimeError" in reply.json()["error"]["message"]
        decoder.step = real
        assert post(server, max_tokens=4)


def test_a_client_leaving_a_batched_stream_ends_its_answer(chat_pipeline):
    with running(chat_pipeline, limits=ServeLimits(max_tokens=100_000)) as server:
        worker = server.app.state.server.worker
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json={**BODY, "max_tokens": 100_000, "stream": True}, timeout=30) as reply:
            for line in reply.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # leave after the first piece of the answer
        deadline = time.monotonic() + 10
        while worker.decoder.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.decoder.active == 0


def test_the_prompt_token_budget_limits_a_prefill_group_but_a_long_prompt_still_joins_alone(engine):
    decoder = BatchDecoder(engine, max_batch_size=4, max_batch_tokens=100)
    assert decoder.can_join(group_size=0, group_tokens=0, num_tokens=500)  # alone, over the budget
    assert decoder.can_join(group_size=1, group_tokens=60, num_tokens=40)
    assert not decoder.can_join(group_size=1, group_tokens=60, num_tokens=41)
    assert not decoder.can_join(group_size=4, group_tokens=4, num_tokens=1)  # no room left
