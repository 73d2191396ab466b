"""Generation attribute accuracy: true renders score ~1, renders of other scenes score about chance, and the
end-to-end evaluation runs on a tiny random Emu2-Gen pipeline."""

import json
import random

import pytest

from emu2.data.shapes.render import render_scene
from emu2.data.shapes.world import World, moved
from emu2.eval.shapes_generation import (
    KEYS,
    asked_in_caption,
    attribute_accuracy,
    evaluate_generation,
    generation_table,
)


@pytest.fixture(scope="module")
def scenes():
    world, rng = World.from_seed(0), random.Random(11)
    return [world.group_scene(rng, "heldout") for _ in range(60)]


def test_true_renders_score_about_one(scenes):
    scores = attribute_accuracy([render_scene(s, 64) for s in scenes], scenes)
    assert scores["n"] == 60
    assert all(scores[k] >= 0.95 for k in KEYS), scores


def test_renders_of_other_scenes_score_about_chance(scenes):
    others = scenes[1:] + scenes[:1]  # image i shows scene i + 1
    scores = attribute_accuracy([render_scene(s, 64) for s in others], scenes)
    assert scores["shape"] < 0.35 and scores["colour"] < 0.35 and scores["position"] < 0.5, scores
    assert scores["all"] < 0.05, scores


def test_attributes_not_asked_for_are_not_scored(scenes):
    scene = scenes[0]
    row, col = scene.groups[0].cell
    elsewhere = [moved(scene, 0, (1 - row, col), random.Random(0))]  # the group asked for in another cell
    image = [render_scene(scene, 64)]
    assert attribute_accuracy(image, elsewhere)["position"] == 0.0
    scores = attribute_accuracy(image, elsewhere, [{"shape", "colour", "count", "background", "size"}])
    assert scores["position"] is None and scores["all"] == 1.0


def test_asked_in_caption_drops_position_only_when_missing(scenes):
    scene = scenes[0]
    where = scene.position(scene.groups[0])
    assert "position" in asked_in_caption(scene, f"A red star in the {where} on a white background.")
    assert asked_in_caption(scene, "A red star on a white background.") == {
        "shape", "colour", "count", "background", "size"}


def test_image_and_scene_counts_must_match(scenes):
    with pytest.raises(ValueError, match="images for"):
        attribute_accuracy([], scenes[:1])


def test_evaluate_generation_end_to_end_on_a_tiny_random_pipeline(tmp_path):
    from emu2.pipelines.gen import Emu2GenPipeline

    gen = Emu2GenPipeline.from_preset("tiny")
    gen.decoder.set_progress_bar_config(disable=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"seed": 0, "image_size": 64}))
    results = evaluate_generation(gen, tmp_path, items=2, seed=0, num_inference_steps=1)
    assert set(results) == {"text_to_image", "autoencode", "truth_renders", "items"} and results["items"] == 2
    for key in ("text_to_image", "autoencode", "truth_renders"):
        assert set(results[key]) == {*KEYS, "n", "ci95", "scored"}
        assert all(v is None or 0.0 <= v <= 1.0 for k, v in results[key].items() if k in KEYS)
    assert results["truth_renders"]["all"] == 1.0
    table = generation_table(results)
    assert "| text-to-image |" in table and "| true renders |" in table and "100.0" in table



def test_batched_evaluation_draws_the_images_item_by_item_evaluation_draws(tmp_path):
    import numpy as np

    from emu2.pipelines.gen import Emu2GenPipeline

    gen = Emu2GenPipeline.from_preset("tiny")
    gen.decoder.set_progress_bar_config(disable=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"seed": 0, "image_size": 64}))

    def recorded(batch_size):
        drawn = {"text": [], "image": []}

        def call(inputs, **kwargs):
            out = gen(inputs, **kwargs)
            drawn["text" if isinstance(inputs[0], list) else "image"].extend(out.images)
            return out

        evaluate_generation(call, tmp_path, items=3, seed=0, num_inference_steps=1, batch_size=batch_size)
        return drawn

    alone, together = recorded(1), recorded(3)
    for kind in ("text", "image"):
        assert len(alone[kind]) == len(together[kind]) == 3
        for a, b in zip(alone[kind], together[kind]):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
