"""Emu2Pipeline: the official interleaved-input API over a tiny random model."""

import pytest
import torch
from PIL import Image

from emu2.pipelines.emu2 import Emu2Pipeline
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


# --------------------------------------------------------------- official defaults and argument names
@pytest.fixture
def calls(monkeypatch):
    """The pipelines' `generate_text` keyword arguments, recorded (the model still runs)."""

    def spy(model):
        seen = []
        original = model.generate_text

        def recording(**kwargs):
            seen.append({k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "images",
                                                                     "frames")})
            return original(**kwargs)

        monkeypatch.setattr(model, "generate_text", recording)
        return seen

    return spy


@pytest.fixture(scope="module")
def chat_pipe():
    return Emu2Pipeline.from_preset("tiny-chat")


def test_generate_defaults_are_the_official_five_beams_length_penalty_minus_one_ten_tokens(pipe, calls):
    """Official `EmuModel.generate(num_beams=5, max_new_tokens=10, length_penalty=-1, do_sample=False)`."""
    seen = calls(pipe.model)
    pipe.generate([image("red"), "Describe the image in details:"])
    assert seen[-1]["num_beams"] == 5 and seen[-1]["length_penalty"] == -1 and seen[-1]["max_new_tokens"] == 10
    assert not seen[-1].get("do_sample", False)


def test_chat_defaults_are_the_official_chat_forward_defaults(chat_pipe, calls):
    """Official `EmuChatGeneration.forward` passes the same defaults as `generate`: 5 beams, length_penalty
    -1, max_new_tokens 10 (the README's chat example overrides them explicitly)."""
    seen = calls(chat_pipe.model)
    chat_pipe.chat([[image("red"), "What is it?"]])
    assert {k: seen[-1][k] for k in ("num_beams", "length_penalty", "max_new_tokens")} == {
        "num_beams": 5, "length_penalty": -1, "max_new_tokens": 10}


def test_official_min_len_counts_the_dummy_bos_of_transformers_4_31(chat_pipe, calls):
    """Official `min_len` -> `generate(min_length=min_len)` under transformers 4.31, whose output started
    with a dummy BOS when only embeddings were given: min_len k = at least k - 1 new tokens, so the default
    1 constrains nothing."""
    seen = calls(chat_pipe.model)
    chat_pipe.chat([["hi"]], min_len=4, num_beams=1, max_new_tokens=6)
    chat_pipe.chat([["hi"]], min_len=1, num_beams=1, max_new_tokens=6)
    assert seen[0]["min_new_tokens"] == 3 and "min_new_tokens" not in seen[1]


def test_is_grounding_switches_to_the_official_short_answer_system_message(chat_pipe, calls, monkeypatch):
    """Official `_prepare_chat_inputs`: `GROUND_SYSTEM_MESSAGE if is_grounding else SYSTEM_MESSAGE`, and
    "<grounding>" after the final " [ASSISTANT]:"; `is_grounding` and `grounding` are the same switch."""
    from emu2 import processing as P

    prompts = []
    original = chat_pipe.encode
    monkeypatch.setattr(chat_pipe, "encode", lambda p, *a: prompts.append(p[0]) or original(p, *a))
    for kwargs in ({"is_grounding": True}, {"grounding": True}, {}):
        chat_pipe.chat([[image("red"), "Where is it?"]], num_beams=1, max_new_tokens=2, **kwargs)
    grounded, also_grounded, plain = prompts
    assert grounded == also_grounded
    assert grounded.startswith(P.SHORT_ANSWER_SYSTEM_MESSAGE + " [USER]: ")
    assert grounded.endswith(" [ASSISTANT]:<grounding>")
    assert plain.startswith(P.CHAT_SYSTEM_MESSAGE + " [USER]: ") and plain.endswith(" [ASSISTANT]:")


def test_official_skip_special_tokens_argument_is_accepted(chat_pipe):
    """Official README grounding call: `pipe([inputs], is_grounding=True, skip_special_tokens=False, ...)`."""
    kept = chat_pipe.chat([["Where?"]], is_grounding=True, skip_special_tokens=False, num_beams=1, max_new_tokens=3)
    dropped = chat_pipe.chat([["Where?"]], is_grounding=True, skip_special_tokens=True, num_beams=1,
                             max_new_tokens=3)
    assert isinstance(kept, str) and isinstance(dropped, str)
    assert "<patch_index" not in dropped


def test_hf_template_reproduces_the_hub_remote_code_prompt(chat_pipe, monkeypatch):
    """HF remote code `build_input_ids` (Emu2-Chat): system_msg (default "") + "[USER]: " + text +
    "[ASSISTANT]:", no spaces around the role tokens."""
    prompts = []
    original = chat_pipe.encode
    monkeypatch.setattr(chat_pipe, "encode", lambda p, *a: prompts.append(p[0]) or original(p, *a))
    chat_pipe.chat([[image("red"), "Describe the image."]], template="hf", num_beams=1, max_new_tokens=2)
    assert prompts == ["[USER]: [<IMG_PLH>]Describe the image.[ASSISTANT]:"]


def test_the_pipelines_package_names_each_pipeline_and_loads_diffusers_only_for_the_decoders():
    import subprocess
    import sys

    script = ("import sys; from emu2.pipelines import Emu2Pipeline; print('diffusers' in sys.modules); "
              "import emu2.pipelines as p; "
              "print(sorted(getattr(p, n).__name__ for n in p.__all__)); print('diffusers' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0] == "False"  # the LM pipeline alone does not need the decoders' library
    assert "Emu2GenPipeline" in lines[1] and "Emu2VideoDecoderPipeline" in lines[1] and lines[-1] == "True"
    import emu2.pipelines

    with pytest.raises(AttributeError, match="no attribute 'Emu2Decoder'"):
        emu2.pipelines.Emu2Decoder
