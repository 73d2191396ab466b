"""Stage 0 (`stage: encoder`): contrastive pre-training of a random vision encoder on image-caption pairs."""

import torch

from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.train import train
from emu2.train.stages.encoder import CaptionContrast

from .conftest import tiny_config


def test_the_loss_is_low_when_images_and_captions_match_and_high_when_they_do_not():
    torch.manual_seed(0)
    head = CaptionContrast(vocab_size=50, n_query=4, vision_width=8, dim=16)
    features = torch.randn(6, 4, 8)
    ids = torch.randint(0, 50, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[0, 3:] = 0  # padding is not a word of the caption
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):  # the heads alone can learn to pair these 6 fixed examples
        loss = head(features, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        matched = float(head(features, ids, mask))
        shuffled = float(head(features, ids[[1, 2, 3, 4, 5, 0]], mask[[1, 2, 3, 4, 5, 0]]))
    assert matched < 0.1
    assert shuffled > 1.0


def test_encoder_stage_trains_only_the_vision_encoder_and_writes_a_model_directory(shapes_dir, tmp_path):
    config = tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                         overrides=["steps=12", "optim.lr.visual=3e-3"])
    before = Emu2Pipeline.from_preset("tiny-chat", seed=config.seed).model.state_dict()
    result = train(config)
    assert result["finished"] and result["step"] == 12
    assert result["loss"] < result["first_loss"]
    after = Emu2Pipeline.from_pretrained(tmp_path / "enc").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The recipe's word_projection sets the projection by a fit at the end; nothing else outside visual moves.
    assert config.encoder.word_projection and "project_up.weight" in changed
    assert changed - {"project_up.weight"} and all(k.startswith("visual.") for k in changed - {"project_up.weight"})
    assert "visual.patch_embed.proj.weight" in changed or any("blocks" in k for k in changed)


def test_without_word_projection_the_projection_is_left_as_it_was(shapes_dir, tmp_path):
    config = tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                         overrides=["steps=2", "encoder.word_projection=false", "encoder.attribute_pool=32"])
    before = Emu2Pipeline.from_preset("tiny-chat", seed=config.seed).model.project_up.weight
    train(config)
    assert torch.equal(Emu2Pipeline.from_pretrained(tmp_path / "enc").model.project_up.weight, before)


def test_word_projection_maps_pooled_embeddings_onto_the_words_for_what_lies_under_them(shapes_dir):
    """The fit is least squares: it lands each pooled embedding nearer the sum of its words' input embeddings
    (object: shape + colour; empty: background colour + "background") than the random projection did."""
    from emu2.data.shapes.supervision import LABEL_WORDS, AttributePool
    from emu2.data.shapes.world import World
    from emu2.train.stages.encoder import fit_word_projection

    pipe = Emu2Pipeline.from_preset("tiny-chat", seed=0)
    model, tokenizer, n_query = pipe.model, pipe.tokenizer, pipe.model.config.n_query
    vision = model.config.vision_config
    pool = AttributePool(World.from_seed(0), vision.image_size, vision.grid_size, size=48, seed=0,
                         pooled=int(n_query ** 0.5))
    table = model.get_input_embeddings().weight.detach()

    def word(w):
        return table[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0)

    def error():
        with torch.no_grad():
            got = model.project_up(model.visual.encode_image(pool.images, n_query)).reshape(-1, table.shape[1])
        shape, colour = pool.labels["cell_shape"].reshape(-1), pool.labels["cell_colour"].reshape(-1)
        background = pool.labels["background"].repeat_interleave(n_query)
        want = torch.stack([word(LABEL_WORDS["cell_shape"][s - 1]) + word(LABEL_WORDS["cell_colour"][c - 1]) if s
                            else word(LABEL_WORDS["background"][b]) + word("background")
                            for s, c, b in zip(shape.tolist(), colour.tolist(), background.tolist())])
        return float(((got - want) ** 2).sum())

    before = error()
    r2 = fit_word_projection(model, tokenizer, pool, n_query)
    assert 0 < r2 <= 1
    assert error() < 0.9 * before


def test_position_words_are_added_to_the_targets_of_object_embeddings_only():
    """With ``position_weight`` w, an object's target gains w x the sum of its position's words ("top" + "left");
    a background embedding's target is unchanged."""
    from emu2.data.shapes.supervision import POSITIONS, AttributePool
    from emu2.data.shapes.world import World
    from emu2.train.stages.encoder import word_targets, word_vectors

    pipe = Emu2Pipeline.from_preset("tiny-chat", seed=0)
    model, tokenizer, n_query = pipe.model, pipe.tokenizer, pipe.model.config.n_query
    vision = model.config.vision_config
    pool = AttributePool(World.from_seed(0), vision.image_size, vision.grid_size, size=24, seed=0,
                         pooled=int(n_query ** 0.5))
    plain, named = word_targets(model, tokenizer, pool, n_query), word_targets(model, tokenizer, pool, n_query, 2.5)
    position = pool.labels["cell_position"].reshape(-1)
    assert torch.equal(plain[position == 0], named[position == 0])
    k = int((position > 0).nonzero()[0])
    words = word_vectors(model, tokenizer, POSITIONS[position[k] - 1].split()).double().sum(0)
    torch.testing.assert_close(named[k] - plain[k], 2.5 * words)


def test_a_negative_position_weight_is_refused(shapes_dir, tmp_path):
    import pytest

    from emu2.train.config import ConfigError

    with pytest.raises(ConfigError, match="word_projection_position must be >= 0, got -1.0"):
        tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                    overrides=["encoder.word_projection_position=-1.0"])


def test_word_projection_needs_the_attribute_labels(shapes_dir, tmp_path):
    import pytest

    from emu2.train.config import ConfigError

    with pytest.raises(ConfigError, match="word_projection needs encoder.attributes"):
        tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                    overrides=["encoder.attributes=0", "encoder.contrastive=1.0", "encoder.word_projection=true"])


def test_caption_word_loss_marks_exactly_the_tokens_the_caption_contains():
    """The caption-word target is multi-hot over the vocabulary: the unmasked caption tokens, nothing else
    (padding never counts as a word, repeated words count once)."""
    head = CaptionContrast(vocab_size=10, n_query=2, vision_width=3, dim=4, caption_words=True)
    with torch.no_grad():
        head.word_logits.weight.zero_()
        head.word_logits.bias.copy_(torch.tensor([-20.0 if v not in (3, 5) else 20.0 for v in range(10)]))
    features = torch.zeros(1, 2, 3)
    ids, mask = torch.tensor([[3, 5, 5, 7]]), torch.tensor([[1, 1, 1, 0]])  # 7 is padding
    assert float(head.caption_word_loss(features, ids, mask)) < 1e-6  # logits say {3, 5}: exactly right
    wrong = torch.tensor([[3, 5, 7, 7]]), torch.tensor([[1, 1, 1, 0]])  # now 7 is a word: one mistake
    assert float(head.caption_word_loss(features, *wrong)) > 19.0


def test_caption_words_objective_trains_through_the_recipes_encoder_section(shapes_dir, tmp_path):
    config = tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                         overrides=["steps=8", "optim.lr.visual=3e-3", "encoder.caption_words=1.0",
                                    "encoder.contrastive=0.0"])
    result = train(config)
    assert result["finished"] and result["loss"] < result["first_loss"]
    import json

    rows = [json.loads(line) for line in (tmp_path / "enc" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["contrastive_loss"] == 0.0 and row["caption_word_loss"] > 0 for row in rows)


def test_the_encoder_section_is_refused_outside_the_encoder_stage(shapes_dir, tmp_path):
    import pytest

    from emu2.train.config import ConfigError

    with pytest.raises(ConfigError, match="encoder: the section is read by stage: encoder only"):
        tiny_config("shapes-stage1", tmp_path / "s1", shapes_dir, batch_size=2, overrides=["encoder.caption_words=1"])


def test_attribute_objective_trains_the_encoder_on_rendered_scenes_without_shards(shapes_dir, tmp_path):
    """`encoder.attributes` alone: labelled scenes of the dataset's world, no caption stream read."""
    import json

    config = tiny_config("shapes-encoder", tmp_path / "enc", shapes_dir, batch_size=8,
                         overrides=["steps=10", "optim.lr.visual=3e-3", "encoder.attributes=1.0",
                                    "encoder.contrastive=0.0", "encoder.attribute_pool=64"])
    result = train(config)
    assert result["finished"] and result["loss"] < result["first_loss"]
    rows = [json.loads(line) for line in (tmp_path / "enc" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["attribute_loss"] > 0 and row["contrastive_loss"] == 0.0 for row in rows)


def test_attribute_objective_needs_a_shapes_world_dataset(tmp_path):
    import pytest

    (tmp_path / "data").mkdir()
    config = tiny_config("shapes-encoder", tmp_path / "enc", tmp_path / "data", batch_size=8,
                         overrides=["steps=2", "encoder.attributes=1.0", "encoder.contrastive=0.0"])
    with pytest.raises(ValueError, match="needs a shapes-world dataset"):
        train(config)
