"""The vision encoder's layouts: the official post-norm patch ViT, and the two options for small encoders
trained from scratch (pre-norm blocks with a final norm; a convolutional stem)."""

import pytest
import torch

from emu2.config import PRESETS, Emu2Config, Emu2VisionConfig
from emu2.model.vision import EVAVisionTransformer


def small(**options) -> Emu2VisionConfig:
    return Emu2VisionConfig(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0, **options)


@pytest.mark.parametrize("name", ["emu2", "emu2-chat", "emu2-gen"])
def test_official_presets_keep_post_norm_blocks_and_the_patch_convolution(name):
    vision = Emu2Config.from_preset(name).vision_config
    assert vision.postnorm is True and vision.stem == "patch"


def test_post_norm_encoder_has_no_final_norm_and_official_parameter_names():
    names = set(EVAVisionTransformer(small()).state_dict())
    assert "patch_embed.proj.weight" in names
    assert not any(n.startswith("norm.") or "stem" in n for n in names)


def test_pre_norm_block_normalises_before_attention_and_mlp():
    torch.manual_seed(0)
    model = EVAVisionTransformer(small(postnorm=False))
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    expected = x + block.attn(block.norm1(x))
    expected = expected + block.mlp(block.norm2(expected))
    assert torch.allclose(block(x), expected, atol=1e-6)
    tokens = model(torch.randn(2, 3, 32, 32))
    # the final norm: every token has zero mean and unit variance across channels before its affine map
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 17), atol=1e-5)


def test_conv_stem_reaches_the_same_patch_grid_with_stride_two_convolutions():
    model = EVAVisionTransformer(small(stem="conv"))
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] and convs[-1].out_channels == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)
    assert model.encode_image(torch.randn(2, 3, 32, 32), 4).shape == (2, 4, 32)


def test_stem_norm_normalises_each_stride_two_convolution_and_keeps_images_independent_of_their_batch():
    torch.manual_seed(0)
    model = EVAVisionTransformer(small(stem="conv", stem_norm=True)).eval()
    layers = list(model.patch_embed.stem)
    norms = [layers[i + 1] for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [type(n) for n in norms] == [torch.nn.GroupNorm] * 3
    assert not isinstance(layers[-1], torch.nn.GroupNorm)  # the last (stride-1) convolution is not normalised
    # GroupNorm, not BatchNorm: an image's embeddings do not depend on what else is in its batch
    a, b = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32) * 5
    assert torch.allclose(model.encode_image(a, 4), model.encode_image(torch.cat([a, b]), 4)[:1], atol=1e-5)
    assert Emu2Config.from_preset("shapes").vision_config.stem_norm is True


def test_stem_norm_needs_the_conv_stem():
    with pytest.raises(ValueError, match='stem_norm=True needs stem="conv"'):
        EVAVisionTransformer(small(stem_norm=True))


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        EVAVisionTransformer(Emu2VisionConfig(image_size=28, patch_size=14, width=16, layers=1, head_width=8,
                                              stem="conv"))
    with pytest.raises(ValueError, match='stem must be "patch" or "conv"'):
        EVAVisionTransformer(small(stem="hybrid"))


def test_encoder_options_survive_a_save_and_load(tmp_path):
    from emu2.pipelines.emu2 import Emu2Pipeline

    pipe = Emu2Pipeline.from_preset("shapes")
    vision = pipe.model.config.vision_config
    pipe.save_pretrained(tmp_path)
    loaded = Emu2Pipeline.from_pretrained(tmp_path)
    loaded_vision = loaded.model.config.vision_config
    assert (loaded_vision.postnorm, loaded_vision.stem, loaded_vision.stem_norm, loaded_vision.pos_embed_init) == \
        (vision.postnorm, vision.stem, vision.stem_norm, vision.pos_embed_init)
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.equal(pipe.model.encode_image(pixels), loaded.model.encode_image(pixels))


def test_sincos_position_init_gives_every_patch_a_distinct_code_and_official_presets_keep_evas():
    from emu2.model.emu2 import Emu2ForCausalLM

    shapes = Emu2ForCausalLM(Emu2Config.from_preset("shapes")).visual
    table = shapes.pos_embed[0, 1:]  # CLS row first
    assert shapes.config.pos_embed_init == "sincos"
    assert torch.equal(shapes.pos_embed[0, 0], torch.zeros(shapes.config.width))
    distances = torch.cdist(table, table) + torch.eye(len(table)) * 1e9
    assert distances.min() > 0.1  # no two patches share a position code
    # neighbouring patches are closer than far ones: the code is smooth in the row and the column
    assert (table[0] - table[1]).norm() < (table[0] - table[7]).norm()
    assert (table[0] - table[8]).norm() < (table[0] - table[56]).norm()
    for name in ("emu2", "emu2-chat", "emu2-gen"):
        assert Emu2Config.from_preset(name).vision_config.pos_embed_init == "normal"
    tiny = Emu2ForCausalLM(Emu2Config.from_preset("tiny")).visual.pos_embed
    assert 0.01 < tiny.std() < 0.03


def test_pos_embed_init_is_checked():
    with pytest.raises(ValueError, match="pos_embed_init"):
        EVAVisionTransformer(small(pos_embed_init="learned"))


def test_every_preset_builds_its_vision_layout():
    for name in PRESETS:
        vision = Emu2Config.from_preset(name).vision_config
        assert vision.stem in ("patch", "conv") and isinstance(vision.postnorm, bool)
