"""CLIP-I / DINO / CLIP-T scores under encoder callables, including local transformers checkpoints."""

import numpy as np
import PIL.Image
import pytest
import torch

from emu2.eval.image_metrics import (
    clip_i,
    clip_t,
    emu2_image_encoder,
    image_similarity,
    load_clip_encoders,
    load_image_encoder,
)


def _image(color, size=24):
    return PIL.Image.new("RGB", (size, size), color)


def _noise_image(seed, size=24):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mean_colour(images):
    return torch.tensor(np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images]))


def test_image_similarity_paired_and_all_pairs():
    red, green = _image((255, 0, 0)), _image((0, 255, 0))
    assert image_similarity([red, green], [red, green], mean_colour) == pytest.approx(1.0)
    assert image_similarity([red], [green], mean_colour) == pytest.approx(0.0)
    assert image_similarity([red, green], [red], mean_colour, all_pairs=True) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="all_pairs"):
        image_similarity([red, green], [red], mean_colour)


def test_clip_image_encoder_from_a_local_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=12,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    encode = load_image_encoder(tmp_path)
    images = [_noise_image(0), _noise_image(1)]
    assert encode(images).shape == (2, 12)
    assert clip_i(images, images, encode) == pytest.approx(1.0, abs=1e-5)
    assert clip_i(images[:1], images[1:], encode) < 0.9999


def test_dino_encoder_uses_the_cls_token(tmp_path):
    from transformers import AutoModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(tmp_path)
    encode = load_image_encoder(tmp_path)
    images = [_noise_image(0, 40), _noise_image(1, 48)]
    features = encode(images)
    model = AutoModel.from_pretrained(tmp_path).eval()
    from emu2.eval.image_metrics import IMAGENET_MEAN, IMAGENET_STD, preprocess_for_encoder

    with torch.no_grad():
        cls = model(
            pixel_values=preprocess_for_encoder(images, 32, 32, IMAGENET_MEAN, IMAGENET_STD)
        ).last_hidden_state[:, 0]
    torch.testing.assert_close(features, cls)


def test_clip_t_with_a_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {chr(i): i - 33 for i in range(33, 127)}
    vocab |= {k + "</w>": v + 100 for k, v in list(vocab.items())}
    vocab |= {"<|startoftext|>": 300, "<|endoftext|>": 301}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 302,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": 300,
            "eos_token_id": 301,
            "pad_token_id": 301,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    encode_image, encode_text = load_clip_encoders(tmp_path)
    images, texts = [_noise_image(0), _noise_image(1)], ["a red circle", "two blue squares"]
    assert encode_text(texts).shape == (2, 12) and encode_image(images).shape == (2, 12)
    score = clip_t(images, texts, encode_image, encode_text)
    a = torch.nn.functional.normalize(encode_image(images), dim=-1)
    b = torch.nn.functional.normalize(encode_text(texts), dim=-1)
    assert score == pytest.approx(float((a * b).sum(-1).mean()))
    with pytest.raises(ValueError, match="one text per image"):
        clip_t(images, texts[:1], encode_image, encode_text)


def test_project_encoder_is_the_mean_of_pooled_embeddings():
    class Stub(torch.nn.Module):
        class config:  # mimics model.config.vision_config.image_size
            class vision_config:
                image_size = 8

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def encode_image(self, pixels):  # (N, 3, 8, 8) -> (N, Q=2, Dv=3)
            return torch.stack([pixels.mean((2, 3)), pixels.amax((2, 3))], dim=1) * self.scale

    encode = emu2_image_encoder(Stub())
    features = encode([_noise_image(0), _noise_image(1)])
    assert features.shape == (2, 3)
    from emu2.processing import preprocess_images

    pixels = preprocess_images([_noise_image(0), _noise_image(1)], 8)
    torch.testing.assert_close(features, (pixels.mean((2, 3)) + pixels.amax((2, 3))) / 2)
