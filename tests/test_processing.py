"""Prompt building: placeholders, interleaved inputs, the chat template, boxes <-> coordinate tokens."""

import pytest
from PIL import Image

from emu2 import processing as P


@pytest.fixture(scope="module")
def tokenizer():
    return P.load_tokenizer()


def red(size=20):
    return Image.new("RGB", (size, size), (255, 0, 0))


def test_packaged_tokenizer_has_official_special_token_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "[VIDEO]", "<grounding>")] == [
        32000, 32001, 32002, 32003, 32004, 32007, 32008]
    assert vocab["<patch_index_0256>"] == 32271 and len(tokenizer) == 32272


def test_instruct_tokenizer_adds_user_and_assistant_last():
    vocab = P.load_tokenizer(instruct=True).get_vocab()
    assert (vocab["[USER]"], vocab["[ASSISTANT]"]) == (32272, 32273)


def test_image_placeholder_expands_to_begin_slots_end():
    assert P.expand_placeholders("a[<IMG_PLH>]b", 3, 2) == "a[IMG]<image><image><image>[/IMG]b"
    assert P.expand_placeholders("[<VID_PLH>]", 3, 2) == "[IMG][gIMG][gIMG][/IMG]"


def test_interleaved_list_concatenates_strings_and_places_images():
    flat = P.flatten_interleaved([red(), "what is this?", red(), "and this?"])
    assert flat.text == "[<IMG_PLH>]what is this?[<IMG_PLH>]and this?"
    assert len(flat.images) == 2 and flat.frames == []


def test_video_as_frame_list_or_markers():
    frames = [red(), red()]
    as_list = P.flatten_interleaved([frames, "What happened?"])
    as_markers = P.flatten_interleaved(["[VIDEO]", *frames, "[/VIDEO]", "What happened?"])
    assert as_list.text == as_markers.text == "[VIDEO][<VID_PLH>][<VID_PLH>]What happened?"
    assert len(as_list.frames) == len(as_markers.frames) == 2


def test_bad_item_type_is_a_clear_error():
    with pytest.raises(P.PromptError, match="got int"):
        P.flatten_interleaved(["text", 3])


def test_placeholder_count_mismatch_is_a_clear_error():
    with pytest.raises(P.PromptError, match="2 image placeholder.*but 1 image"):
        P.check_placeholder_counts("[<IMG_PLH>][<IMG_PLH>]", 1)


def test_chat_template_multi_turn():
    text = P.chat_prompt(["hi", "hello", "bye"], system="SYS")
    assert text == "SYS [USER]: hi [ASSISTANT]: hello</s>[USER]: bye [ASSISTANT]:"


def test_chat_template_grounding_and_even_turns():
    assert P.chat_prompt(["where?"], system="S", grounding=True).endswith("[ASSISTANT]:<grounding>")
    with pytest.raises(P.PromptError, match="odd number"):
        P.chat_prompt(["a", "b"])


def test_box_round_trips_through_coordinate_tokens():
    text = P.grounded_phrase("a man", (44.8, 0, 224, 112), width=448, height=224)
    # each coordinate is quantised to round(value / extent * 224): 44.8/448 -> 22.4 -> 22
    assert text == "<phrase>a man</phrase><object><patch_index_0022><patch_index_0000><patch_index_0112>" \
                   "<patch_index_0112></object>"
    [(phrase, box)] = P.tokens_to_boxes(text, width=448, height=224)
    assert phrase == "a man"
    assert box == pytest.approx((44.0, 0, 224, 112))


def test_box_tokens_are_single_special_tokens(tokenizer):
    ids = tokenizer(P.box_to_tokens((0, 0, 10, 10), 10, 10), add_special_tokens=False)["input_ids"]
    assert ids == [32011, 32015, 32015, 32015 + 224, 32015 + 224, 32012]


def test_parse_box_without_phrase_and_invalid_box():
    assert P.parse_box("x <patch_index_0000><patch_index_0112><patch_index_0224><patch_index_0224>") == (
        0.0, 0.5, 1.0, 1.0)
    assert P.parse_box("no box here") is None
    with pytest.raises(P.PromptError):
        P.box_to_tokens((10, 0, 5, 5), 10, 10)


def test_preprocess_resizes_squashes_and_normalises():
    pixels = P.preprocess_image(Image.new("RGB", (30, 10), (255, 255, 255)), 14)
    assert pixels.shape == (3, 14, 14)
    assert pixels[0, 0, 0].item() == pytest.approx((1 - P.CLIP_MEAN[0]) / P.CLIP_STD[0], rel=1e-5)
    assert P.pixels_to_pil(pixels).getpixel((3, 3)) == (255, 255, 255)


def test_hf_chat_template_is_single_turn_without_system_or_spaces():
    """HF remote code `build_input_ids`: `system_msg + "[USER]: " + text + "[ASSISTANT]:"` (system "")."""
    assert P.chat_prompt(["hi"], system=None, template="hf") == "[USER]: hi[ASSISTANT]:"
    assert P.chat_prompt(["hi"], system="S.", template="hf") == "S.[USER]: hi[ASSISTANT]:"
    with pytest.raises(P.PromptError):
        P.chat_prompt(["a", "b", "c"], template="hf")
    with pytest.raises(P.PromptError):
        P.chat_prompt(["hi"], template="jinja")


def test_several_boxes_of_one_object_joined_by_the_official_delimiter_all_parse():
    """Official special token `</delimiter_of_multi_objects/>` (DOM_SYMBOL) separates the boxes of one object;
    our grounded data (`emu2.data.kinds`) writes several boxes that way."""
    first = P.box_to_tokens((0, 0, 112, 56), 224, 224)[len(P.OBJECT):-len(P.OBJECT_END)]
    second = P.box_to_tokens((112, 112, 224, 224), 224, 224)[len(P.OBJECT):-len(P.OBJECT_END)]
    text = f"<phrase>two dogs</phrase><object>{first}</delimiter_of_multi_objects/>{second}</object>"
    assert P.tokens_to_boxes(text, 224, 224) == [("two dogs", (0, 0, 112, 56)), ("two dogs", (112, 112, 224, 224))]


def test_coordinate_tokens_past_224_clamp_to_the_image_edge():
    """Official README: grounding coordinates run from 0 to 224, yet the vocabulary has <patch_index_0000> ..
    <patch_index_0256>; the 32 tokens past 224 would put a box outside the image."""
    text = "<phrase>a</phrase><object><patch_index_0112><patch_index_0000><patch_index_0256><patch_index_0230></object>"
    assert P.tokens_to_boxes(text, 448, 448) == [("a", (224.0, 0.0, 448.0, 448.0))]
    assert P.parse_box("<patch_index_0256>" * 4) == (1.0, 1.0, 1.0, 1.0)
