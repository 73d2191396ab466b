"""Stage 0 (`stage: encoder`): contrastive pre-training of a random vision encoder on image-caption pairs."""

import torch

from emu2.pipeline import Emu2Pipeline
from emu2.train.contrastive import CaptionContrast
from emu2.train.loop import train

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
    assert changed and all(k.startswith("visual.") for k in changed)
    assert "visual.patch_embed.proj.weight" in changed or any("blocks" in k for k in changed)
