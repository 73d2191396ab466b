"""The shapes world's tokenizer: LLaMA's design, 1,024 pieces learned from the training splits, Emu2's special
tokens after them, and a `shapes` preset whose vocabulary and token ids fit it."""

import json
import random

import pytest

from emu2 import processing as P
from emu2.config import SHAPES_PIECES, Emu2Config
from emu2.data.kinds import KINDS
from emu2.data.shapes.tasks import HELDOUT_LABEL_WORDS, SPLITS, ShapesMaker
from emu2.data.shapes.tokenizer import NOT_TEXT, record_strings, train_shapes_tokenizer
from emu2.data.shapes.world import World
from emu2.data.shapes.write import HELDOUT_KINDS


@pytest.fixture(scope="module")
def tokenizer():
    return P.load_tokenizer(P.SHAPES_TOKENIZER, instruct=True)


def _model(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def test_the_packaged_tokenizer_is_what_the_builder_learns(tokenizer):
    learned = train_shapes_tokenizer()
    assert learned.get_vocab() == {t: i for t, i in tokenizer.get_vocab().items() if i < SHAPES_PIECES}
    assert _model(learned)["merges"] == _model(tokenizer)["merges"]
    text = "Look: a tulver is a small pink hexagon; florp! (3) | tazzle"
    assert learned.tokenize(text) == tokenizer.tokenize(text)


def test_every_text_of_every_split_is_pieces_and_decodes_back(tokenizer):
    """No split needs the byte fallback (ids 3-258) or <unk> but for newlines, which are the byte <0x0A> as in
    LLaMA: the alphabet and the pieces cover the world."""
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    maker = ShapesMaker(World.from_seed(0), image_size=16, video_frames=2)
    jobs = [("train", kind) for kind in KINDS] + [("lm", "text"), ("lm_long", "text")]
    jobs += [(split, kind) for split, kinds in HELDOUT_KINDS.items() for kind in kinds]
    assert {split for split, _ in jobs} == set(SPLITS) - {"val"}
    checked = 0
    for split, kind in jobs:
        for index in range(5):
            record, _ = maker.make(kind, random.Random(f"test:{split}:{kind}:{index}"), split)
            for text in record_strings(record):
                if any(token in text for token in NOT_TEXT) or not text.strip():
                    continue  # special tokens and placeholders are added tokens, not pieces
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert all(i > 258 or i == newline for i in ids), (text, tokenizer.convert_ids_to_tokens(ids))
                assert tokenizer.decode(ids) == text.lstrip(" ")
                checked += 1
    assert checked > 100


def test_other_text_still_encodes_through_the_byte_fallback(tokenizer):
    text = "Café ☺ naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(3 <= i <= 258 for i in ids) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_held_out_label_words_are_read_as_trained_pieces_not_pieces_of_their_own(tokenizer):
    vocab = tokenizer.get_vocab()
    for word in HELDOUT_LABEL_WORDS:
        assert "▁" + word not in vocab
        assert len(tokenizer.tokenize(" " + word)) > 1


def test_the_shapes_preset_is_sized_and_numbered_for_it(tokenizer):
    config = Emu2Config.from_preset("shapes")
    assert config.text_config.vocab_size == len(tokenizer) == SHAPES_PIECES + 274
    assert tokenizer.pad_token_id == config.text_config.pad_token_id == SHAPES_PIECES
    ids = tokenizer.convert_tokens_to_ids([P.BOI, P.EOI, P.IMAGE_TOKEN, P.FRAME_TOKEN, P.USER, P.ASSISTANT])
    assert ids[:4] == [config.boi_token_id, config.eoi_token_id, config.image_token_id, config.frame_token_id]
    assert ids == [SHAPES_PIECES + k for k in (1, 2, 3, 4)] + [len(tokenizer) - 2, len(tokenizer) - 1]
    assert P.preset_tokenizer("shapes") == P.SHAPES_TOKENIZER and P.preset_tokenizer("emu2") == P.DEFAULT_TOKENIZER


def test_a_tokenizer_that_does_not_fit_the_model_is_refused():
    from emu2.model import Emu2ForCausalLM
    from emu2.pipelines.emu2 import Emu2Pipeline

    model = Emu2ForCausalLM(Emu2Config.from_preset("tiny-chat"))  # LLaMA's vocabulary
    with pytest.raises(ValueError, match="does not fit the model"):
        Emu2Pipeline(model, P.load_tokenizer(P.SHAPES_TOKENIZER, instruct=True))
