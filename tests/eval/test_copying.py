"""`copy_accuracy`: the language model's copying (induction), scored on the repeat of word lists only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from emu2.eval.shapes import copy_accuracy
from emu2.pipelines.emu2 import Emu2Pipeline


def oracle(shift: int, vocab: int):
    """A forward pass whose logits put all mass on the token ``shift`` places after each position (shift 1: the
    true next token, i.e. a perfect copier on the repeat)."""

    def forward(input_ids, attention_mask, images=None, **_):
        target = torch.roll(input_ids, -shift, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, vocab).float() * 30)

    return forward


def test_a_model_that_predicts_the_next_token_scores_one_and_a_shifted_one_scores_near_zero():
    pipe = Emu2Pipeline.from_preset("tiny")
    vocab = pipe.model.config.text_config.vocab_size
    pipe.model.forward = oracle(1, vocab)
    perfect = copy_accuracy(pipe, sequences=8, batch_size=4)
    assert perfect["copy_accuracy"] == 1.0 and perfect["copy_nll"] < 1e-6

    pipe.model.forward = oracle(2, vocab)  # off by one position: only the aligned targets may count
    assert copy_accuracy(pipe, sequences=8, batch_size=4)["copy_accuracy"] < 0.2


def test_held_out_label_words_are_copied_from_lists_of_those_words_only():
    from emu2.data.shapes.tasks import HELDOUT_LABEL_WORDS

    pipe = Emu2Pipeline.from_preset("tiny")
    seen = []
    pipe.encode = lambda texts, **kw: seen.extend(texts) or Emu2Pipeline.encode(pipe, texts, **kw)
    pipe.model.forward = oracle(1, pipe.model.config.text_config.vocab_size)
    assert copy_accuracy(pipe, sequences=8, batch_size=4, words="held-out")["copy_accuracy"] == 1.0
    for text in seen:
        first, repeat = text[: len(text) // 2], text[len(text) // 2 + 1:]
        assert first == repeat and set(first.rstrip(".").split()) <= set(HELDOUT_LABEL_WORDS)
    with pytest.raises(ValueError, match="made-up"):
        copy_accuracy(pipe, words="nonce")


def test_a_random_model_does_not_copy():
    torch.manual_seed(0)
    pipe = Emu2Pipeline.from_preset("tiny")
    scores = copy_accuracy(pipe, sequences=8, batch_size=4)
    assert scores["copy_accuracy"] < 0.05 and scores["copy_nll"] > 5.0 and scores["sequences"] == 8


def test_a_gap_puts_scene_sentences_between_the_list_and_its_repeat():
    pipe = Emu2Pipeline.from_preset("tiny")
    seen = []
    pipe.encode = lambda texts, **kw: seen.extend(texts) or Emu2Pipeline.encode(pipe, texts, **kw)
    pipe.model.forward = oracle(1, pipe.model.config.text_config.vocab_size)
    assert copy_accuracy(pipe, sequences=8, batch_size=4, gap=3)["copy_accuracy"] == 1.0
    gaps = []
    for text in seen:
        first = text[: text.index(".") + 1]
        assert text.endswith(" " + first)
        between = text[len(first): -len(first)].strip()
        gaps.append(between.count("."))
        assert all(" on " in sentence for sentence in between.split(".") if sentence.strip())  # "... on white."
    assert gaps == [3] * 8
