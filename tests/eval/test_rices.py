"""RICES: nearest support examples by image embedding, query excluded, features cached in safetensors."""

import numpy as np
import pytest
import torch
from PIL import Image

from emu2.eval.rices import RICES, RandomSelector


def color_image(rgb):
    return Image.new("RGB", (4, 4), tuple(int(c) for c in rgb))


class MeanColorEncoder:
    """A stand-in for the model's pooled image embedding: the mean RGB colour, counting calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images):
        self.calls += 1
        self.images += len(images)
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))


# Support: pure red, orange-ish red, green, blue, and a reddish purple. Cosine similarity sees the hue.
SUPPORT_COLORS = {"red": (255, 0, 0), "orange": (255, 120, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
                  "purple": (200, 0, 120)}
SUPPORT_IDS = list(SUPPORT_COLORS)


def make_rices(encoder, **kwargs):
    return RICES(SUPPORT_IDS, lambda i: color_image(SUPPORT_COLORS[SUPPORT_IDS[i]]), encoder, **kwargs)


def test_nearest_support_items_are_returned_most_similar_last():
    rices = make_rices(MeanColorEncoder())
    query = torch.tensor([[255.0, 0.0, 0.0]])  # pure red
    # cosine to red: red 1, orange 255/|(255,120,0)| = 0.905, purple 200/|(200,0,120)| = 0.857, green/blue 0
    [selection] = rices.find(query, k=3)
    assert [SUPPORT_IDS[i] for i in selection] == ["purple", "orange", "red"]


def test_support_features_are_unit_length():
    rices = make_rices(MeanColorEncoder())
    assert rices.features.shape == (5, 3)
    torch.testing.assert_close(rices.features.norm(dim=-1), torch.ones(5))


def test_the_query_own_item_is_excluded():
    rices = make_rices(MeanColorEncoder())
    [selection] = rices.find(torch.tensor([[255.0, 0.0, 0.0]]), k=2, exclude_ids=["red"])
    assert [SUPPORT_IDS[i] for i in selection] == ["purple", "orange"]


def test_select_encodes_query_images_and_excludes_their_ids():
    encoder = MeanColorEncoder()
    rices = make_rices(encoder)
    selections = rices.select(["green", "q2"], [color_image((0, 255, 0)), color_image((0, 10, 250))], k=1)
    assert [[SUPPORT_IDS[i] for i in s] for s in selections] == [["orange"], ["blue"]]


def test_cached_features_are_reused_without_encoding_again(tmp_path):
    first = MeanColorEncoder()
    make_rices(first, cache_dir=tmp_path, cache_name="colors-meancolor")
    assert first.calls > 0 and (tmp_path / "colors-meancolor.safetensors").exists()
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))

    second = MeanColorEncoder()
    rices = make_rices(second, cache_dir=tmp_path, cache_name="colors-meancolor")
    assert second.calls == 0
    [selection] = rices.find(torch.tensor([[0.0, 0.0, 1.0]]), k=1)
    assert SUPPORT_IDS[selection[0]] == "blue"


def test_a_cache_made_for_other_support_ids_is_recomputed(tmp_path):
    make_rices(MeanColorEncoder(), cache_dir=tmp_path, cache_name="colors")
    fewer = SUPPORT_IDS[:3]
    encoder = MeanColorEncoder()
    rices = RICES(fewer, lambda i: color_image(SUPPORT_COLORS[fewer[i]]), encoder, cache_dir=tmp_path,
                  cache_name="colors")
    assert encoder.calls > 0 and rices.features.shape == (3, 3)
    again = MeanColorEncoder()
    RICES(fewer, lambda i: color_image(SUPPORT_COLORS[fewer[i]]), again, cache_dir=tmp_path, cache_name="colors")
    assert again.calls == 0  # the recomputed cache replaced the stale one


def test_features_are_computed_in_batches():
    encoder = MeanColorEncoder()
    make_rices(encoder, batch_size=2)
    assert (encoder.calls, encoder.images) == (3, 5)


def test_items_sharing_an_image_are_encoded_once():
    encoder = MeanColorEncoder()
    ids = ["q1", "q2", "q3"]
    keys = ["img_a.jpg", "img_a.jpg", "img_b.jpg"]
    colors = {"img_a.jpg": (255, 0, 0), "img_b.jpg": (0, 0, 255)}
    rices = RICES(ids, lambda i: color_image(colors[keys[i]]), encoder, image_keys=keys)
    assert encoder.images == 2
    torch.testing.assert_close(rices.features[0], rices.features[1])
    assert not torch.allclose(rices.features[0], rices.features[2])


def test_asking_for_more_examples_than_the_support_set_has_is_an_error():
    rices = make_rices(MeanColorEncoder())
    with pytest.raises(ValueError, match="cannot select 5 in-context examples from a support set of 4"):
        rices.find(torch.ones(1, 3), k=5, exclude_ids=["red"])


def test_encode_with_the_wrong_shape_is_reported():
    with pytest.raises(ValueError, match=r"encode must return a \(N, D\) tensor"):
        make_rices(lambda images: torch.ones(len(images)))


# -------------------------------------------------------------------------------------- random selector
def test_random_selector_is_seeded_per_query_and_excludes_the_query():
    ids = [str(i) for i in range(50)]
    selector = RandomSelector(ids, seed=0)
    together = selector.select(["3", "7"], [None, None], k=10)
    alone = selector.select(["7"], [None], k=10)
    assert together[1] == alone[0]  # same examples whatever batch the query is in
    assert ids.index("3") not in together[0] and len(set(together[0])) == 10
    assert RandomSelector(ids, seed=1).select(["3"], [None], k=10)[0] != together[0]


def test_rices_from_records_encodes_each_image_file_once(tmp_path):
    from emu2.eval.datasets import EvalRecord

    for name, rgb in [("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))]:
        color_image(rgb).save(tmp_path / name)
    records = [EvalRecord(id=f"q{i}", images=[tmp_path / name]) for i, name in enumerate(["a.png", "a.png", "b.png"])]
    encoder = MeanColorEncoder()
    rices = RICES.from_records(records, encoder, cache_dir=tmp_path / "cache", cache_name="toy")
    assert encoder.images == 2 and rices.support_ids == ["q0", "q1", "q2"]
    [selection] = rices.select(["q0"], [color_image((255, 0, 0))], k=1)
    assert selection == [1]  # q1 shares q0's image; q0 itself is excluded


def test_rices_needs_query_images():
    rices = make_rices(MeanColorEncoder())
    with pytest.raises(ValueError, match="use RandomSelector"):
        rices.select(["video-1"], [None], k=1)
