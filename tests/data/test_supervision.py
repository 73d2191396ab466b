"""Attribute labels of rendered shapes-world scenes (`emu2.data.shapes.supervision`), the encoder stage's
stand-in for EVA-CLIP's pre-training."""

import random

import torch

from emu2.data.shapes.supervision import (
    IGNORE,
    LABEL_CLASSES,
    POSITIONS,
    AttributePool,
    cell_positions,
    global_labels,
    patch_labels,
)
from emu2.data.shapes.world import SHAPES, Group, Scene, World


def scene_with(boxes, shape="star", colour="red", count=None, cell=(0, 0)):
    group = Group(shape, colour, "large", count or len(boxes), cell, tuple(boxes))
    return Scene("white", 2, (group,))


def test_patches_under_an_object_carry_its_shape_and_colour_and_the_rest_none():
    scene = scene_with([(0.0, 0.0, 0.5, 0.5)])  # the top-left quarter of a 4x4 grid: patches (0..1, 0..1)
    shapes, colours = patch_labels(scene, 4)
    star = 1 + SHAPES.index("star")
    assert [i for i, s in enumerate(shapes) if s] == [0, 1, 4, 5]
    assert {shapes[i] for i in (0, 1, 4, 5)} == {star} and all(c > 0 for c in colours if c)
    assert sum(1 for s in shapes if s == 0) == 12


def test_an_object_smaller_than_a_patch_still_labels_the_patch_holding_its_centre():
    scene = scene_with([(0.30, 0.30, 0.36, 0.36)])  # inside patch (1, 1) of 4x4, no patch centre covered
    shapes, _ = patch_labels(scene, 4)
    assert [i for i, s in enumerate(shapes) if s] == [5]


def test_global_labels_exist_for_one_group_and_are_ignored_for_several():
    one = scene_with([(0.0, 0.0, 0.2, 0.2), (0.25, 0.0, 0.45, 0.2)], count=2)
    labels = global_labels(one)
    assert labels["count"] == 1 and POSITIONS[labels["position"]] == "top left"
    world = World.from_seed(0)
    several = world.multi_scene(random.Random(0), "train", objects=2)
    labels = global_labels(several)
    assert labels["count"] == labels["size"] == labels["position"] == IGNORE and labels["background"] >= 0


def test_the_pool_renders_training_scenes_with_labels_in_range():
    world = World.from_seed(0)
    pool = AttributePool(world, image_size=32, grid=4, size=40, seed=0)
    batch = pool.batch(torch.arange(8))
    assert batch["images"].shape == (8, 3, 32, 32) and batch["patch_shape"].shape == (8, 16)
    for name, classes in LABEL_CLASSES.items():
        values = batch[name][batch[name] != IGNORE]
        assert values.numel() and int(values.min()) >= 0 and int(values.max()) < classes
    again = AttributePool(world, image_size=32, grid=4, size=40, seed=0)
    assert torch.equal(pool.images, again.images)  # seeded: the same scenes every run


def test_pooled_cell_labels_name_what_lies_under_each_pooled_embedding():
    """Four small objects in the top-left quarter of a 2x2 layout: each sits in its own cell of the 4x4 pooled
    grid (what the LM reads), while the 8x8 patch grid spreads each over one patch or more."""
    scene = scene_with([(0.02, 0.02, 0.2, 0.2), (0.27, 0.02, 0.45, 0.2), (0.02, 0.27, 0.2, 0.45),
                        (0.27, 0.27, 0.45, 0.45)], count=4)
    cells, _ = patch_labels(scene, 4)
    shape = 1 + SHAPES.index(scene.groups[0].shape)
    assert [cells[i] for i in (0, 1, 4, 5)] == [shape] * 4 and sum(c != 0 for c in cells) == 4
    world = World.from_seed(0)
    pool = AttributePool(world, image_size=64, grid=8, size=12, seed=0, pooled=4)
    assert pool.labels["cell_shape"].shape == (12, 16) and pool.labels["patch_shape"].shape == (12, 64)
    # every object under some patch is under some pooled cell too
    assert torch.equal(pool.labels["patch_shape"].amax(1) > 0, pool.labels["cell_shape"].amax(1) > 0)


def test_each_pooled_cell_under_an_object_names_the_position_its_caption_gives():
    """Two groups of a 3x3 scene: the cells under each carry that group's caption position, the rest none."""
    top_left = Group("star", "red", "large", 1, (0, 0), ((0.02, 0.02, 0.3, 0.3),))
    centre = Group("circle", "blue", "large", 1, (1, 1), ((0.36, 0.36, 0.64, 0.64),))
    scene = Scene("white", 3, (top_left, centre))
    positions = cell_positions(scene, 4)
    assert {positions[i] for i in (0,)} == {1 + POSITIONS.index("top left")}
    assert {positions[i] for i in (5, 6, 9, 10)} == {1 + POSITIONS.index("center")}
    assert sum(p != 0 for p in positions) == 5
    # the pool's cell positions cover exactly the cells that hold an object
    pool = AttributePool(World.from_seed(0), image_size=64, grid=8, size=12, seed=0, pooled=4)
    assert torch.equal(pool.labels["cell_position"] > 0, pool.labels["cell_shape"] > 0)


def test_the_colourless_view_is_grey_and_its_brightness_varies_per_image():
    from emu2.data.shapes.supervision import shape_view
    from emu2.processing import CLIP_MEAN, CLIP_STD

    pool = AttributePool(World.from_seed(0), image_size=32, grid=4, size=16, seed=0)
    view = shape_view(pool.images, torch.Generator().manual_seed(0))
    rgb = view * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    assert float(rgb.min()) >= -1e-5 and float(rgb.max()) <= 1 + 1e-5
    # the same background colour comes out at different grey levels in different images
    backgrounds = rgb[:, 0, 0, 0]
    assert backgrounds.std() > 0.05
