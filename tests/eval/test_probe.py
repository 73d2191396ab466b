"""The linear probe of pooled visual embeddings (`emu2.eval.probe`)."""

import torch

from emu2.data.shapes.world import World
from emu2.eval.probe import PROBE_ATTRIBUTES, fit_linear_probes, linear_probe, probe_scenes, scene_labels


def test_a_linearly_readable_attribute_is_probed_near_perfectly_and_noise_near_chance():
    g = torch.Generator().manual_seed(0)
    labels = [str(i % 4) for i in range(800)]
    code = torch.nn.functional.one_hot(torch.tensor([int(v) for v in labels]), 4).float()
    features = torch.cat([code * 3, torch.randn(800, 20, generator=g)], 1)
    noise = torch.randn(800, 24, generator=g)
    readable = fit_linear_probes(features[:600], {"a": labels[:600]}, features[600:], {"a": labels[600:]})["a"]
    unreadable = fit_linear_probes(noise[:600], {"a": labels[:600]}, noise[600:], {"a": labels[600:]})["a"]
    assert readable["value"] > 0.98 and readable["n"] == 200 and readable["classes"] == 4
    assert unreadable["value"] < 0.45  # chance is 0.25
    low, high = unreadable["ci95"]
    assert low <= unreadable["value"] <= high


def test_probe_scenes_are_the_held_out_combinations_when_asked():
    world = World.from_seed(0)
    test = probe_scenes(world, 50, "heldout", seed=0)
    fit = probe_scenes(world, 50, "train", seed=0)
    assert all((s.groups[0].shape, s.groups[0].colour) in world.heldout_combos for s in test)
    assert not any((s.groups[0].shape, s.groups[0].colour) in world.heldout_combos for s in fit)
    assert set(scene_labels(test[0])) == set(PROBE_ATTRIBUTES)


def test_linear_probe_reports_every_attribute_of_a_model_with_an_interval():
    from emu2.pipelines.emu2 import Emu2Pipeline

    model = Emu2Pipeline.from_preset("tiny").model
    result = linear_probe(model, World.from_seed(0), image_size=56, train=60, test=20)
    assert set(result) == set(PROBE_ATTRIBUTES)
    for cell in result.values():
        assert 0 <= cell["ci95"][0] <= cell["value"] <= cell["ci95"][1] <= 1 and cell["n"] == 20
    # the background fills the image: even a random encoder reads it linearly
    assert result["background"]["value"] > 0.5
