"""`ChatEngine`: how a conversation becomes a prompt, how decoding is set, where answers stop."""

import pytest

from emu2 import processing as P
from emu2.serve.chat import ChatEngine, DecodingSettings, StopScanner, reserved_token_in

from .conftest import png_image


@pytest.fixture(scope="module")
def engine(chat_pipeline):
    return ChatEngine(chat_pipeline)


def test_instruct_model_uses_the_official_chat_template(engine):
    prompt = engine.build_prompt([[png_image(), "What is it?"], "A square.", ["Colour?"]], system="Be brief.")
    assert prompt.text == ("Be brief. [USER]: [<IMG_PLH>]What is it? [ASSISTANT]: A square.</s>[USER]: Colour? "
                           "[ASSISTANT]:")
    assert len(prompt.images) == 1 and prompt.num_tokens > engine.config.n_query


def test_grounding_appends_the_grounding_token(engine):
    assert engine.build_prompt([["Where is the cat?"]], grounding=True).text.endswith(P.GROUNDING)


def test_base_model_sees_the_conversation_as_one_plain_prompt(gen_pipeline):
    base = ChatEngine(gen_pipeline.encoder)  # Emu2-Gen's encoder is a base (non-chat) tiny model
    prompt = base.build_prompt([[png_image(), "a red square. "], "ok", [png_image(), ""]])
    assert prompt.text == "[<IMG_PLH>]a red square. ok[<IMG_PLH>]" and len(prompt.images) == 2


def test_template_can_be_turned_off_for_few_shot_prompts(engine):
    assert engine.build_prompt([["plain"]], template=False).text == "plain"


def test_even_number_of_turns_is_a_prompt_error(engine):
    with pytest.raises(P.PromptError, match="odd number"):
        engine.build_prompt([["hi"], "hello"])


def test_text_holding_image_tokens_is_a_prompt_error(engine):
    assert reserved_token_in("a <image> b") == "<image>" and reserved_token_in("plain text") is None
    with pytest.raises(P.PromptError, match="reserved"):
        engine.build_prompt([["look <image>"]])


def test_deterministic_unless_a_temperature_or_nucleus_is_given():
    assert DecodingSettings().generate_kwargs()["do_sample"] is False
    assert DecodingSettings(temperature=0).generate_kwargs()["do_sample"] is False
    sampled = DecodingSettings(top_p=0.5).generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 1.0 and sampled["top_p"] == 0.5
    beams = DecodingSettings(num_beams=5, n=2, length_penalty=2.0).generate_kwargs()
    assert beams["num_beams"] == 5 and beams["num_return_sequences"] == 2 and beams["length_penalty"] == 2.0


def test_stream_holds_back_text_that_may_begin_a_stop_string():
    sent = []
    scanner = StopScanner(["STOP"], sent.append)
    for chunk in ["hello S", "T", "OP and more"]:
        scanner.feed(chunk)
    scanner.feed("", final=True)
    assert "".join(sent) == "hello " and scanner.stopped


def test_stream_releases_held_text_at_the_end():
    sent = []
    scanner = StopScanner(["STOP"], sent.append)
    scanner.feed("ends with ST")
    scanner.feed("", final=True)
    assert "".join(sent) == "ends with ST" and not scanner.stopped


def test_streamed_and_whole_greedy_answers_agree(engine):
    prompt = engine.build_prompt([[png_image(), "Describe."]])
    settings = DecodingSettings(max_new_tokens=6)
    pieces = []
    streamed = engine.stream(prompt, settings, pieces.append)
    [whole] = engine.answer(prompt, settings)
    assert "".join(pieces).strip() == streamed.text == whole.text
    assert streamed.finish_reason == whole.finish_reason and streamed.num_tokens == whole.num_tokens


def test_streaming_refuses_beam_search(engine):
    with pytest.raises(P.PromptError, match="num_beams"):
        engine.stream(engine.build_prompt([["hi"]]), DecodingSettings(num_beams=2), print)
