"""Interleaved consistency: the caption parser reads every caption template, true renders of a caption score 1,
a mismatch scores what it should, and the evaluation runs end to end on a tiny random model and decoder."""

import json
import random

import pytest
import torch
from transformers import LogitsProcessor

from emu2.data.shapes.render import render_scene
from emu2.data.shapes.tasks import caption
from emu2.data.shapes.world import World
from emu2.eval.shapes_generation import KEYS, scene_attributes
from emu2.eval.shapes_interleaved import (
    CAPTION_PATTERNS,
    caption_scene,
    consistency,
    evaluate_interleaved_consistency,
    interleaved_table,
    parse_caption,
    story_prompt,
)


@pytest.fixture(scope="module")
def captioned():
    """(scene, caption) for 300 one-group scenes of both splits, captions from `tasks.caption`."""
    world, rng = World.from_seed(0), random.Random(5)
    scenes = [world.group_scene(rng, rng.choice(("train", "heldout"))) for _ in range(300)]
    return [(scene, caption(scene, rng)) for scene in scenes]


def test_parser_reads_every_caption_template(captioned):
    matched = set()
    for scene, text in captioned:
        stated = scene_attributes(scene)
        if f"in the {stated['position']}" not in text.lower():
            stated["position"] = None
        assert parse_caption(text) == stated, text
        matched |= {i for i, pattern in enumerate(CAPTION_PATTERNS) if pattern.fullmatch(text.lower())}
        if text.startswith(("A picture of", "There is")):
            matched.add(text.split()[0])
    assert matched == {*range(len(CAPTION_PATTERNS)), "A", "There"}


def test_parser_reads_the_caption_with_and_without_position():
    assert parse_caption("Two small red stars on gray, in the top left.") == {
        "shape": "star", "colour": "red", "count": 2, "size": "small", "position": "top left", "background": "gray"}
    assert parse_caption("a picture of a large white cross on a black background .")["position"] is None


@pytest.mark.parametrize("text", [
    "A small red circle and a large blue star on a white background.",  # two groups
    "Two small red circle on a white background.",  # the count disagrees with the noun
    "A small red circle on a white background",  # no full stop: cut off
    "A small red circle on a white background. A large blue star.",  # more than the caption
    "A small crimson circle on a white background.",  # not a colour of the world
    "",
])
def test_parser_rejects_what_is_not_one_caption(text):
    assert parse_caption(text) is None


def test_caption_scene_takes_the_grid_its_position_needs():
    assert caption_scene(parse_caption("A small red circle in the center on a white background."),
                         random.Random(0)).grid == 3
    scene = caption_scene(parse_caption("A small red circle on a white background."), random.Random(0))
    assert scene.grid == 2 and len(scene.groups[0].boxes) == 1


def test_true_renders_of_a_caption_score_one(captioned):
    texts = [text for _, text in captioned[:100]]
    scenes = [caption_scene(parse_caption(text), random.Random(i)) for i, text in enumerate(texts)]
    scores = consistency([render_scene(s, 64) for s in scenes], scenes, texts)
    assert scores["n"] == 100
    assert all(scores[k]["value"] == 1.0 for k in KEYS), scores
    assert scores["position"]["n"] < 100  # only the captions that state a position score it


def test_a_mismatched_caption_scores_only_the_attributes_it_shares():
    drawn = caption_scene(parse_caption("A small red circle in the top left on a white background."),
                          random.Random(0))
    text = "Two small blue circles in the bottom right on a white background."
    scores = consistency([render_scene(drawn, 64)], [caption_scene(parse_caption(text), random.Random(0))], [text])
    by_hand = {"shape": 1.0, "colour": 0.0, "count": 0.0, "position": 0.0, "background": 1.0, "size": 1.0, "all": 0.0}
    assert {k: scores[k]["value"] for k in KEYS} == by_hand


def test_consistency_needs_one_scene_and_caption_per_image():
    with pytest.raises(ValueError, match="one each"):
        consistency([], [], ["A small red circle on a white background."])


class WriteText(LogitsProcessor):
    """Makes every row write ``ids`` after the prompt's last ``[/IMG]``, whatever the model's logits."""

    def __init__(self, ids, eoi_token_id):
        self.ids, self.eoi = ids, eoi_token_id

    def __call__(self, input_ids, scores):
        last_image_end = max(i for i, t in enumerate(input_ids[0].tolist()) if t == self.eoi)
        written = input_ids.shape[1] - last_image_end - 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(written, len(self.ids) - 1)]] = 0.0
        return forced


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from emu2.pipelines.gen import Emu2GenPipeline

    gen = Emu2GenPipeline.from_preset("tiny")
    gen.decoder.set_progress_bar_config(disable=True)
    data = tmp_path_factory.mktemp("shapes")
    (data / "dataset.json").write_text(json.dumps({"seed": 0, "image_size": 64}))
    return gen, data


def _run(tiny, writes: str | None, **kwargs):
    gen, data = tiny
    if writes is not None:
        ids = gen.encoder.tokenizer(writes, add_special_tokens=False)["input_ids"]
        kwargs["logits_processor"] = [WriteText(ids, gen.encoder.model.config.eoi_token_id)]
    return evaluate_interleaved_consistency(gen.encoder, gen.decoder, data, documents=3, seed=0,
                                            num_inference_steps=1, batch_size=2, **kwargs)


def test_end_to_end_on_a_tiny_random_model_scores_the_caption_it_wrote(tiny):
    text = "A large red circle in the top right on a white background."
    results = _run(tiny, text)
    assert results["documents"] == 3 and results["parseable"]["value"] == 1.0
    assert [e["caption"] for e in results["examples"]] == [text] * 3
    for key in ("generated", "ceiling", "floor"):
        assert set(results[key]) == {*KEYS, "n"} and results[key]["n"] == 3
        for k in KEYS:
            cell = results[key][k]
            assert cell["n"] == 3 and cell["ci95"][0] <= cell["value"] <= cell["ci95"][1]
    assert results["ceiling"]["all"]["value"] == 1.0
    assert results["seconds_per_document"] > 0
    table = interleaved_table(results)
    assert "| generated (the model's own caption) |" in table and "(ceiling) |" in table and "(floor) |" in table
    assert "100.0 [" in table and "Captions that parse: 100.0" in table


def test_end_to_end_is_deterministic_with_the_seed(tiny):
    text = "Two small blue squares on gray, in the bottom left."
    first, second = _run(tiny, text), _run(tiny, text)
    first.pop("seconds_per_document"), second.pop("seconds_per_document")
    assert first == second


def test_a_caption_copied_from_the_story_is_counted(tiny):
    first_story = story_prompt(World.from_seed(0), random.Random(0), 2, 64)  # document 0's prompt (seed 0)
    results = _run(tiny, first_story[2])  # every document writes document 0's second caption
    assert results["copied_from_prompt"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    assert "copied from their story: 33.3" in interleaved_table(results)


def test_unparseable_captions_are_counted_and_not_scored(tiny):
    results = _run(tiny, None, max_caption_tokens=4)  # a random model's four tokens are no caption
    assert results["parseable"] == {"value": 0.0, "ci95": results["parseable"]["ci95"], "n": 3}
    assert results["generated"]["n"] == 0 and results["generated"]["all"] is None
    assert "| - |" in interleaved_table(results)
