"""The sequence layout of every sample kind: exact tokens, text targets and regression targets (paper A.1, 2.3)."""

import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.sequence import IGNORE_INDEX, SequenceError, clean_text, collate, draw_box_image

from .conftest import make_image


def ids_of(tok, *tokens):
    return tok.convert_tokens_to_ids(list(tokens))


def text_ids(tok, text):
    """Ids of ``text`` as it is tokenized after a special token (no BOS)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def image_block(tok, config):
    boi, eoi, image = ids_of(tok, P.BOI, P.EOI, P.IMAGE_TOKEN)
    return [boi, *[image] * config.n_query, eoi]


def frame_block(tok, config):
    boi, eoi, frame = ids_of(tok, P.BOI, P.EOI, P.FRAME_TOKEN)
    return [boi, *[frame] * config.v_query, eoi]


def build(record, tok, config, seed=0):
    return K.build_sample(record, tok, config, random.Random(seed))


def supervised(sample):
    return sample.input_ids[sample.labels != IGNORE_INDEX].tolist()


# ----------------------------------------------------------------------------------------- image-text pairs
def test_pair_stage1_image_first_caption_loss_only(tokenizer, config):
    stage1 = replace(config, stage=1)
    for seed in range(20):
        sample = build(K.ImageTextPair(make_image(), "a red square"), tokenizer, stage1, seed)
        caption = text_ids(tokenizer, "a red square")
        assert sample.input_ids.tolist() == [1, *image_block(tokenizer, config), *caption, 2]
        assert supervised(sample) == [*caption, 2]
        assert sample.image_is_target == [False]
        assert sample.images[0].shape == (3, config.image_size, config.image_size)
        assert sample.kind == "pair"


def test_pair_ids_equal_tokenizing_the_inference_prompt(tokenizer, config):
    sample = build(K.ImageTextPair(make_image(), "a red square"), tokenizer, replace(config, stage=1))
    prompt = P.expand_placeholders(P.IMAGE_PLACEHOLDER + "a red square", config.n_query, config.v_query)
    assert sample.input_ids.tolist() == tokenizer(prompt)["input_ids"] + [2]


def test_pair_stage2_image_before_or_after_text_both_occur(tokenizer, config):
    caption = text_ids(tokenizer, "a red square")
    layouts = set()
    for seed in range(40):
        sample = build(K.ImageTextPair(make_image(), "a red square"), tokenizer, config, seed)
        ids = sample.input_ids.tolist()
        if ids[1:1 + len(caption)] == caption:
            assert ids == [1, *caption, *image_block(tokenizer, config), 2]
            layouts.add("after")
        else:
            assert ids == [1, *image_block(tokenizer, config), *caption, 2]
            layouts.add("before")
        assert supervised(sample) == [*caption, 2]
        assert sample.image_is_target == [True]
    assert layouts == {"before", "after"}


def test_video_pair_is_video_token_and_8_sampled_frames_in_order(tokenizer, config):
    frames = [make_image(size=8).point(lambda _, k=k: k * 20) for k in range(12)]  # brightness grows in time
    video = ids_of(tokenizer, P.VIDEO_TOKEN)[0]
    stage1 = replace(config, stage=1)
    sample = build(K.VideoTextPair(frames, "it gets brighter"), tokenizer, stage1)
    caption = text_ids(tokenizer, "it gets brighter")
    assert sample.input_ids.tolist() == [1, video, *frame_block(tokenizer, config) * 8, *caption, 2]
    assert len(sample.frames) == 8 and sample.frame_is_target == [False] * 8 and sample.images == []
    means = [f.mean().item() for f in sample.frames]
    assert means == sorted(means)
    assert supervised(sample) == [*caption, 2]
    stage2 = build(K.VideoTextPair(frames, "it gets brighter"), tokenizer, config)
    assert stage2.frame_is_target == [True] * 8


# ---------------------------------------------------------------------------------------- interleaved data
def _document(n_images):
    texts = [f"Sentence number {k}." for k in range(n_images)]
    return K.InterleavedDocument(texts, [make_image(k) for k in range(n_images)], list(range(n_images)))


def test_interleaved_document_samples_at_most_8_images_within_1024_tokens(tokenizer, config):
    cfg = replace(config, n_query=64)
    for seed in range(5):
        sample = build(_document(20), tokenizer, cfg, seed)
        assert 1 <= len(sample.images) <= cfg.document_images
        assert len(sample) <= cfg.document_max_length
        assert sample.input_ids[-1] == 2
        assert all(sample.image_is_target)
        image = ids_of(tokenizer, P.IMAGE_TOKEN)[0]
        assert (sample.input_ids == image).sum() == 64 * len(sample.images)


def test_interleaved_image_before_or_after_its_sentence_both_occur(tokenizer, config):
    first = text_ids(tokenizer, "Sentence number 0.")
    starts = set()
    for seed in range(20):
        ids = build(_document(3), tokenizer, config, seed).input_ids.tolist()
        starts.add("text" if ids[1:1 + len(first)] == first else "image")
    assert starts == {"text", "image"}


def test_interleaved_pinned_before_keeps_every_image_ahead_of_its_text(tokenizer, config):
    doc = replace(_document(3), image_position="before")
    ids = build(doc, tokenizer, config).input_ids.tolist()
    expected = [1]
    for k in range(3):
        expected += image_block(tokenizer, config) + text_ids(tokenizer, f"Sentence number {k}.")
    assert ids == expected + [2]


def test_video_document_clips_are_videos_next_to_their_sentences(tokenizer, config):
    doc = K.VideoDocument(["First clip.", "Second clip."], [[make_image()] * 3, [make_image()] * 2], [0, 1],
                          image_position="after")
    sample = build(doc, tokenizer, config)
    video = ids_of(tokenizer, P.VIDEO_TOKEN)[0]
    expected = [1, *text_ids(tokenizer, "First clip."), video, *frame_block(tokenizer, config) * 3,
                *text_ids(tokenizer, "Second clip."), video, *frame_block(tokenizer, config) * 2, 2]
    assert sample.input_ids.tolist() == expected
    assert sample.frame_is_target == [True] * 5


# ----------------------------------------------------------------------------------------------- grounding
def test_grounded_pair_layout(tokenizer, config):
    record = K.GroundedPair(make_image(), "a red square on grass", [K.GroundedObject(0, 12, [(0.1, 0.2, 0.5, 0.6)])])
    sample = build(record, tokenizer, replace(config, phrase_first_prob=1.0))
    grounding = ids_of(tokenizer, P.GROUNDING)[0]
    text = P.grounded_phrase("a red square", (0.1, 0.2, 0.5, 0.6), 1, 1) + " on grass"
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sample.input_ids.tolist() == [1, *image_block(tokenizer, config), grounding, *body, 2]
    assert supervised(sample) == [*body, 2]  # <grounding> is the instruction, not a target


def test_grounded_phrase_before_its_box_with_probability_07(tokenizer, config):
    record = K.GroundedPair(make_image(), "a dog", [K.GroundedObject(0, 5, [(0, 0, 1, 1)])])
    phrase, obj = ids_of(tokenizer, P.PHRASE, P.OBJECT)
    first = [build(record, tokenizer, config, seed).input_ids.tolist() for seed in range(400)]
    fraction = sum(ids.index(phrase) < ids.index(obj) for ids in first) / len(first)
    assert 0.63 < fraction < 0.77


def test_grounded_phrase_with_several_boxes_uses_the_delimiter(tokenizer, config):
    record = K.GroundedPair(make_image(), "two dogs", [K.GroundedObject(0, 8, [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)])])
    text = tokenizer.decode(build(record, tokenizer, replace(config, phrase_first_prob=1.0)).input_ids)
    assert ("<phrase>twodogs</phrase><object><patch_index_0000><patch_index_0000><patch_index_0112>"
            "<patch_index_0112></delimiter_of_multi_objects/><patch_index_0112><patch_index_0112>"
            "<patch_index_0224><patch_index_0224></object>") in text.replace(" ", "")


def test_language_only_text_is_all_supervised(tokenizer, config):
    sample = build(K.Text("Pile text goes here."), tokenizer, config)
    body = text_ids(tokenizer, "Pile text goes here.")
    assert sample.input_ids.tolist() == [1, *body, 2]
    assert sample.labels.tolist() == [IGNORE_INDEX, *body, 2]


def test_language_only_context_is_read_but_not_scored(tokenizer, config):
    sample = build(K.Text("kax bloo tum.", context="kax bloo tum."), tokenizer, config)
    whole = text_ids(tokenizer, "kax bloo tum. kax bloo tum.")
    repeat = len(whole) - len(text_ids(tokenizer, "kax bloo tum."))
    assert sample.input_ids.tolist() == [1, *whole, 2]  # one text: tokenised as if written in one piece
    scored = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert scored == [*whole[-repeat:], 2]  # only the repeat (and the end of text) is supervised


def test_language_only_unscored_spans_are_read_but_not_scored(tokenizer, config):
    text = "red: dax. blue: wug. red: dax."
    sample = build(K.Text(text, unscored=((0, 4), (5, 9), (10, 20))), tokenizer, config)
    assert sample.input_ids.tolist() == [1, *text_ids(tokenizer, text), 2]  # tokenised as if written in one piece
    scored = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(scored[:-1]).split() == ["red:", "dax."] and scored[-1] == 2  # the last example
    with pytest.raises(SequenceError, match="unscored span"):
        build(K.Text(text, unscored=((0, 40),)), tokenizer, config)


def test_document_sentences_marked_unscored_are_read_but_not_scored(tokenizer, config):
    doc = K.InterleavedDocument(["a dax.", "a wug.", "a dax."], [make_image(k) for k in range(3)], [0, 1, 2],
                                "before", unscored=(0, 1))
    sample = build(doc, tokenizer, config)
    scored = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(scored[:-1]).strip() == "a dax." and scored[-1] == 2
    assert sample.image_is_target == [True] * 3  # the images are regressed as in any stage-2 document
    with pytest.raises(SequenceError, match="unscored text index"):
        build(replace(doc, unscored=(3,)), tokenizer, config)


# ---------------------------------------------------------------------------------------------------- chat
def test_chat_supervises_only_answers_and_their_eos(chat_tokenizer, config):
    messages = [f"{P.IMAGE_PLACEHOLDER}what is it?", "a red square", "how many?", "3"]
    sample = build(K.Conversation(messages, [make_image()]), chat_tokenizer, config)
    # ids are exactly the official chat template's (what inference tokenizes)
    prompt = P.chat_prompt(messages[:-1]) + " " + messages[-1]
    expanded = P.expand_placeholders(prompt, config.n_query, config.v_query)
    assert sample.input_ids.tolist() == chat_tokenizer(expanded)["input_ids"] + [2]
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    assistant = ids_of(chat_tokenizer, P.ASSISTANT)[0]
    expected = [IGNORE_INDEX] * len(ids)
    for a in [i for i, t in enumerate(ids) if t == assistant]:
        end = ids.index(2, a)
        for i in range(a + 2, end + 1):  # after "[ASSISTANT]" ":" up to and including the answer's </s>
            expected[i] = ids[i]
    assert labels == expected
    assert chat_tokenizer.decode(supervised(sample)).replace(" ", "") == "aredsquare</s>3</s>"
    assert sample.image_is_target == [False]
    assert chat_tokenizer.decode(ids[: len(text_ids(chat_tokenizer, P.CHAT_SYSTEM_MESSAGE)) + 1]).startswith(
        "<s> You are a helpful assistant")


def test_chat_answers_keep_their_box_tokens(chat_tokenizer, config):
    box = P.box_to_tokens((0.1, 0.2, 0.3, 0.4), 1, 1)
    sample = build(K.Conversation([f"{P.IMAGE_PLACEHOLDER}Where is the dog?", box], [make_image()]),
                   chat_tokenizer, config)
    assert supervised(sample) == [*chat_tokenizer(box, add_special_tokens=False)["input_ids"], 2]


def test_chat_system_message_is_the_records(chat_tokenizer, config):
    record = K.Conversation(["What colour?", "red"], system=P.SHORT_ANSWER_SYSTEM_MESSAGE)
    text = chat_tokenizer.decode(build(record, chat_tokenizer, config).input_ids)
    assert "provide concise and efficient answers" in text


def test_chat_needs_the_instruct_tokenizer(config):
    base = SimpleNamespace(unk_token_id=0, convert_tokens_to_ids=lambda token: 0)  # no [USER] in the vocabulary
    with pytest.raises(SequenceError, match="instruct=True"):
        build(K.Conversation(["hi", "hello"]), base, config)


def test_chat_video_uses_8_12_or_16_uniform_frames(chat_tokenizer, config):
    record = K.Conversation([f"{P.VIDEO_TOKEN}What happens?", "It moves."], frames=[make_image(k) for k in range(20)])
    counts = {len(build(record, chat_tokenizer, config, seed).frames) for seed in range(30)}
    assert counts == {8, 12, 16}
    sample = build(record, chat_tokenizer, config)
    video = ids_of(chat_tokenizer, P.VIDEO_TOKEN)[0]
    ids = sample.input_ids.tolist()
    assert ids[ids.index(video) + 1:][: len(frame_block(chat_tokenizer, config))] == frame_block(chat_tokenizer, config)
    assert not any(sample.frame_is_target)


def test_chat_placeholder_count_must_match_images(chat_tokenizer, config):
    with pytest.raises(SequenceError, match="placeholder"):
        build(K.Conversation([f"{P.IMAGE_PLACEHOLDER}what?", "a cat"], []), chat_tokenizer, config)


# ----------------------------------------------------------------------------------------------- generation
def test_text_to_image_regresses_only_the_image_without_text_loss(tokenizer, config):
    sample = build(K.TextToImage("a red square", make_image()), tokenizer, config)
    assert sample.input_ids.tolist() == [1, *text_ids(tokenizer, "a red square"), *image_block(tokenizer, config), 2]
    assert supervised(sample) == []
    assert sample.image_is_target == [True]


def test_edit_is_source_instruction_edited_with_only_the_last_regressed(tokenizer, config):
    sample = build(K.ImageEdit(make_image(1), "make it blue", make_image(2)), tokenizer, config)
    block = image_block(tokenizer, config)
    assert sample.input_ids.tolist() == [1, *block, *text_ids(tokenizer, "make it blue"), *block, 2]
    assert sample.image_is_target == [False, True]
    assert supervised(sample) == []


def _grounded_generation():
    objects = [K.GroundedObject(0, 5, [(0.1, 0.1, 0.4, 0.4)]), K.GroundedObject(10, 15, [(0.5, 0.5, 0.9, 0.9)])]
    return K.GroundedGeneration(make_image(0), "a dog and a cat", objects, [make_image(1), make_image(2)])


def test_grounded_generation_layout_matches_the_official_prompt(tokenizer, config):
    cfg = replace(config, drop_entity_prob=0.0, drop_box_prob=0.0)
    sample = build(_grounded_generation(), tokenizer, cfg)
    g, p, pe, o, oe = ids_of(tokenizer, P.GROUNDING, P.PHRASE, P.PHRASE_END, P.OBJECT, P.OBJECT_END)
    block = image_block(tokenizer, config)
    expected = [1, g, p, *text_ids(tokenizer, "a dog"), pe, o, *block, oe, *block,
                *text_ids(tokenizer, "and"), p, *text_ids(tokenizer, "a cat"), pe, o, *block, oe, *block, *block, 2]
    assert sample.input_ids.tolist() == expected
    assert sample.image_is_target == [False, False, False, False, True]
    assert supervised(sample) == []
    box = P.preprocess_image(draw_box_image([(0.1, 0.1, 0.4, 0.4)], cfg.image_size), cfg.image_size)
    assert torch.equal(sample.images[0], box)


def test_grounded_generation_drops_entities_and_box_images(tokenizer, config):
    no_entities = build(_grounded_generation(), tokenizer, replace(config, drop_entity_prob=1.0))
    assert len(no_entities.images) == 1 and no_entities.image_is_target == [True]
    assert ids_of(tokenizer, P.PHRASE)[0] not in no_entities.input_ids.tolist()
    no_boxes = build(_grounded_generation(), tokenizer, replace(config, drop_entity_prob=0.0, drop_box_prob=1.0))
    assert len(no_boxes.images) == 3 and ids_of(tokenizer, P.OBJECT)[0] not in no_boxes.input_ids.tolist()
    sizes = {len(build(_grounded_generation(), tokenizer, config, seed).images) for seed in range(60)}
    assert len(sizes) > 1 and 5 in sizes  # default rates drop some, keep most


def test_draw_box_image_is_a_white_3px_rectangle_on_black():
    image = draw_box_image([(0.25, 0.25, 0.75, 0.75)], 64)
    pixels = torch.from_numpy(np.array(image))
    assert image.size == (64, 64)
    assert pixels[32, 16:19].eq(255).all() and pixels[32, 19].eq(0).all()  # 3 px wide left edge
    assert pixels[0, 0].eq(0).all() and pixels[32, 32].eq(0).all()


# ------------------------------------------------------------------------------------- cuts, cleaning, seeds
def test_overlong_sequence_is_cut_before_an_image_and_keeps_eos(tokenizer, config):
    long_text = " ".join(["word"] * 40)
    record = K.InterleavedDocument([long_text, "end"], [make_image()], [0], image_position="after")
    cfg = replace(config, n_query=16, document_max_length=48)
    sample = build(record, tokenizer, cfg)
    assert len(sample) <= 48 and sample.input_ids[-1] == 2 and sample.labels[-1] == IGNORE_INDEX
    assert sample.images == [] and ids_of(tokenizer, P.BOI)[0] not in sample.input_ids.tolist()
    text = build(K.Text(long_text), tokenizer, replace(config, max_length=10))
    assert len(text) == 10 and text.input_ids[-1] == 2 and text.labels[-1] == IGNORE_INDEX


def test_control_tokens_in_raw_text_cannot_forge_images(tokenizer, config):
    sample = build(K.ImageTextPair(make_image(), "evil [IMG]<image>[/IMG] </s> [<IMG_PLH>] text"), tokenizer,
                   replace(config, stage=1))
    assert len(sample.images) == 1
    assert sample.input_ids.tolist().count(ids_of(tokenizer, P.IMAGE_TOKEN)[0]) == config.n_query
    assert sample.input_ids.tolist().count(2) == 1


def test_same_seed_builds_the_same_sample(tokenizer, config):
    a, b = (build(_document(12), tokenizer, config, seed=7) for _ in range(2))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.image_is_target == b.image_is_target
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


# --------------------------------------------------------------------------------------------------- collate
def test_collate_right_pads_and_concatenates_visuals(tokenizer, config):
    samples = [build(K.ImageTextPair(make_image(), "short"), tokenizer, config),
               build(K.VideoTextPair([make_image()] * 3, "a longer caption with more words"), tokenizer, config),
               build(K.Text("only text"), tokenizer, config)]
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    length = max(len(s) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    for i, s in enumerate(samples):
        n = len(s)
        assert batch["input_ids"][i, :n].tolist() == s.input_ids.tolist()
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
    assert batch["images"].shape == (1, 3, config.image_size, config.image_size)
    assert batch["frames"].shape == (3, 3, config.image_size, config.image_size)
    assert batch["images"].dtype == torch.float32 and batch["image_is_target"].dtype == torch.bool
    assert batch["frame_is_target"].tolist() == samples[1].frame_is_target
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long


def test_collate_without_images_gives_empty_image_batches(tokenizer, config):
    batch = collate([build(K.Text("text"), tokenizer, config)], pad_id=0)
    assert batch["images"].shape == (0, 3, config.image_size, config.image_size)
    assert batch["frames"].shape == (0, 3, config.image_size, config.image_size)
    assert batch["image_is_target"].shape == (0,) and batch["image_is_target"].dtype == torch.bool


def test_clean_text_removes_every_control_token_unless_kept():
    every = "".join([*P.SPECIAL_TOKENS, P.USER, P.ASSISTANT, P.PAD_TOKEN, P.VIDEO_END, "<s>", "</s>",
                     P.IMAGE_PLACEHOLDER, P.VIDEO_PLACEHOLDER])
    assert clean_text(every) == ""
    kept = clean_text(every, keep_placeholders=True, keep_grounding=True)
    assert kept.startswith(P.GROUNDING) and kept.endswith(P.IMAGE_PLACEHOLDER + P.VIDEO_PLACEHOLDER)
