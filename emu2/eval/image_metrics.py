"""Image-generation metrics: CLIP-I / DINO (image-image) and CLIP-T (image-text) cosine similarity.

The paper reports autoencoding CLIP-I on MS-COCO (section 3.3: 0.907) and DINO / CLIP-I / CLIP-T on
DreamBench (section 3.4), following DreamBooth. Each metric is a mean cosine similarity between embeddings
from an encoder passed in as a callable, ``encode(images: list[PIL.Image]) -> (N, D)``, so the same code
scores with:

- the project's own vision encoder (`emu2_image_encoder`; mean of the Q pooled embeddings),
- a local CLIP or DINO checkpoint (`load_image_encoder(path)`: `CLIPVisionModelWithProjection` image
  embeddings, or `AutoModel`'s CLS token, the DreamBooth DINO feature),
- a local CLIP model's two towers for CLIP-T (`load_clip_encoders(path)`).

Nothing is downloaded: paths must be local directories.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageEncoder = Callable[[Sequence[PIL.Image.Image]], torch.Tensor]  # list of N images -> (N, D)
TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # list of N strings -> (N, D)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- scores


def image_similarity(
    generated: Sequence[PIL.Image.Image],
    references: Sequence[PIL.Image.Image],
    encode: ImageEncoder,
    all_pairs: bool = False,
) -> float:
    """Mean cosine similarity of image embeddings (CLIP-I with a CLIP encoder, DINO with a DINO one).

    ``all_pairs=False``: generated[i] against references[i] (autoencoding: reconstruction vs original).
    ``all_pairs=True``: every generated image against every reference (DreamBench subject fidelity).
    """
    if not all_pairs and len(generated) != len(references):
        raise ValueError(
            f"paired similarity needs as many references as generated images ({len(references)} vs "
            f"{len(generated)}); pass all_pairs=True to compare every pair"
        )
    a = F.normalize(encode(list(generated)).float(), dim=-1)
    b = F.normalize(encode(list(references)).float(), dim=-1)
    sims = a @ b.T if all_pairs else (a * b).sum(-1)
    return float(sims.mean())


def clip_i(generated, references, encode: ImageEncoder, all_pairs: bool = False) -> float:
    """CLIP-I: `image_similarity` under a CLIP image encoder."""
    return image_similarity(generated, references, encode, all_pairs)


def clip_t(
    images: Sequence[PIL.Image.Image],
    texts: Sequence[str],
    encode_image: ImageEncoder,
    encode_text: TextEncoder,
) -> float:
    """CLIP-T: mean cosine similarity between each image and its prompt (text fidelity)."""
    if len(images) != len(texts):
        raise ValueError(f"clip_t needs one text per image, got {len(texts)} texts for {len(images)} images")
    a = F.normalize(encode_image(list(images)).float(), dim=-1)
    b = F.normalize(encode_text(list(texts)).float(), dim=-1)
    return float((a * b).sum(-1).mean())


# ---------------------------------------------------------------------------------------------- encoders


def emu2_image_encoder(model, batch_size: int = 16) -> ImageEncoder:
    """The project's own vision encoder as an `ImageEncoder`: official preprocessing, ``encode_image``, then
    the mean over the Q pooled embeddings -> (N, Dv)."""
    from emu2.processing import preprocess_images

    size = model.config.vision_config.image_size

    @torch.no_grad()
    def encode(images):
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_images(images[start : start + batch_size], size).to(device, dtype)
            out.append(model.encode_image(pixels).mean(dim=1).float().cpu())
        return torch.cat(out)

    return encode


def preprocess_for_encoder(
    images: Sequence[PIL.Image.Image], resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIP/DINO eval transform: bicubic short-side resize, centre crop, normalise -> (N, 3, crop, crop)."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), PIL.Image.BICUBIC)
        left, top = (image.size[0] - crop) // 2, (image.size[1] - crop) // 2
        array = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
        out.append((array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _preprocessing(path: Path, image_size: int, clip_like: bool) -> dict:
    """Transform settings from ``preprocessor_config.json`` if present, else the family's defaults."""
    settings = {
        "resize": image_size,
        "crop": image_size,
        "mean": CLIP_MEAN if clip_like else IMAGENET_MEAN,
        "std": CLIP_STD if clip_like else IMAGENET_STD,
    }
    config_file = path / "preprocessor_config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text())
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", image_size))
        if isinstance(crop, dict):
            crop = crop.get("height", size)
        settings.update(
            resize=size,
            crop=crop if cfg.get("do_center_crop", True) else size,
            mean=cfg.get("image_mean", settings["mean"]),
            std=cfg.get("image_std", settings["std"]),
        )
    return settings


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 an output whose pooler_output holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_image_encoder(
    path: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"
) -> ImageEncoder:
    """A local CLIP or DINO checkpoint as an `ImageEncoder`.

    CLIP checkpoints (``model_type`` "clip" or "clip_vision_model") give the projected image embeddings of
    `CLIPVisionModelWithProjection`; any other model loads with `AutoModel` and gives the CLS token of the
    last hidden state (the DreamBooth DINO ViT-S/16 feature).
    """
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory (metrics never download checkpoints)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    clip_like = config.model_type in ("clip", "clip_vision_model")
    if clip_like:
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        image_size = model.config.image_size
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        image_size = getattr(model.config, "image_size", 224)
    model.eval().to(device)
    settings = _preprocessing(path, image_size, clip_like)

    @torch.no_grad()
    def encode(images):
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_for_encoder(images[start : start + batch_size], **settings).to(
                device, model.dtype
            )
            result = model(pixel_values=pixels)
            out.append((result.image_embeds if clip_like else result.last_hidden_state[:, 0]).float().cpu())
        return torch.cat(out)

    return encode


def load_clip_encoders(path: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"):
    """A local `CLIPModel` (its tokenizer in the same folder) -> (encode_image, encode_text) for CLIP-T."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory (metrics never download checkpoints)")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    settings = _preprocessing(path, model.config.vision_config.image_size, clip_like=True)
    max_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def encode_image(images):
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_for_encoder(images[start : start + batch_size], **settings).to(
                device, model.dtype
            )
            out.append(_pooled(model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(texts):
        tokens = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return _pooled(model.get_text_features(**tokens.to(device))).float().cpu()

    return encode_image, encode_text
