"""Full-scale decoder parts from a local SDXL-base folder (paper 2.2.3: Emu2-Gen's decoder was made from SDXL).

`load_pretrained_decoder_unet` reads SDXL's UNet with its conditioning projections resized to the visual
embeddings, `load_frozen_vae` its VAE. Decoder training downloads nothing: `local_model_folder` turns a hub id
into an error that says how to fetch the weights (`SDXL_DOWNLOAD`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

SDXL_DOWNLOAD = (
    "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir checkpoints/sdxl-base-1.0 unet/config.json "
    "unet/diffusion_pytorch_model.safetensors vae/config.json vae/diffusion_pytorch_model.safetensors"
)


def local_model_folder(path: str | Path, option: str) -> Path:
    """``path`` as an existing local directory. Decoder training never downloads: a hub id (or any path that is not
    a directory) is an error that says how to fetch the weights and what to pass instead."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    raise FileNotFoundError(
        f"{option}={str(path)!r} is not a local directory. Decoder training reads local files only and downloads "
        f"nothing, so a hub id is not accepted here: download the model first, e.g. `{SDXL_DOWNLOAD}`, and pass "
        f"the folder ({option}=checkpoints/sdxl-base-1.0)."
    )


def _weights_variant(folder: Path) -> str | None:
    """None when ``folder`` has plain diffusers weights, else the variant its files carry (e.g. "fp16")."""
    plain = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
    if any((folder / name).is_file() for name in plain):
        return None
    for file in sorted(folder.glob("diffusion_pytorch_model*")):
        match = re.fullmatch(r"diffusion_pytorch_model(?:-\d+-of-\d+)?\.(\w+)\.(?:safetensors|bin)", file.name)
        if match:
            return match.group(1)
    return None


def _component(folder: Path, name: str, option: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of a diffusers component: ``folder/name`` (a pipeline checkout) or ``folder`` itself."""
    if (folder / name / "config.json").is_file():
        return folder, name
    if (folder / "config.json").is_file():
        return folder, None
    raise FileNotFoundError(f"{option}={str(folder)!r} has neither {name}/config.json (a diffusers pipeline folder "
                            f"such as an SDXL-base checkout) nor config.json (the {name} folder itself)")


def visual_embedding_unet_config(config, vision_width: int, sample_size: int | None = None) -> dict:
    """An SDXL-style UNet config with its conditioning resized to visual embeddings Dv wide (SDXL-base ->
    Emu2-Gen: cross_attention_dim 2048 -> 1792, projection_class_embeddings_input_dim 2816 -> 3328)."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if config.get("addition_embed_type") != "text_time" or config.get("encoder_hid_dim_type") is not None:
        raise ValueError(
            "decoder.unet_init is not an SDXL-style UNet: Emu2's decoder needs addition_embed_type 'text_time' "
            f"(got {config.get('addition_embed_type')!r}) and the embeddings fed straight into cross-attention "
            f"(encoder_hid_dim_type null, got {config.get('encoder_hid_dim_type')!r})"
        )
    config["cross_attention_dim"] = vision_width
    config["projection_class_embeddings_input_dim"] = vision_width + 6 * config["addition_time_embed_dim"]
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def load_pretrained_decoder_unet(
    path: str | Path, vision_width: int, sample_size: int | None = None
) -> tuple[UNet2DConditionModel, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """An SDXL-style UNet from a local folder, adapted to decode visual embeddings (paper 2.2.3).

    Emu2-Gen's decoder is SDXL-base with "the dimension of the projection layers in cross-attention modules"
    adjusted to the visual embeddings (official-format 2.3): ``cross_attention_dim`` becomes the vision width Dv
    (SDXL: 2048, Emu2-Gen: 1792) and the pooled ``text_embeds`` of the "text_time" conditions become the mean
    embedding, Dv wide (SDXL: 1280), so ``projection_class_embeddings_input_dim`` = Dv + 6 x
    ``addition_time_embed_dim`` (Emu2-Gen: 3328). Every weight keeps SDXL's value except those whose shape
    changes, which start from PyTorch's default initialisation as in a UNet built from its config: each
    ``attn2.to_k.weight`` and ``attn2.to_v.weight`` (the keys and values computed from the embeddings) and
    ``add_embedding.linear_1.weight`` (its bias keeps SDXL's values). Nothing else changes.

    Args:
        path: a local diffusers folder with ``unet/`` (an SDXL-base checkout) or the UNet folder itself;
            read with ``local_files_only`` (`local_model_folder` rejects hub ids).
        vision_width: Dv, the frozen encoder's embedding width.
        sample_size: the UNet's default latent side (output size / VAE factor); None keeps the pretrained one.

    Returns:
        (unet in float32, {re-initialised key: (pretrained shape, new shape)}), the keys sorted.
    """
    folder, subfolder = _component(local_model_folder(path, "decoder.unet_init"), "unet", "decoder.unet_init")
    pretrained = UNet2DConditionModel.from_pretrained(
        folder, subfolder=subfolder, local_files_only=True, dtype=torch.float32,
        variant=_weights_variant(folder / (subfolder or "")),
    )
    config = visual_embedding_unet_config(pretrained.config, vision_width, sample_size)
    with torch.device("meta"):  # no memory and no initialisation for the weights that SDXL provides
        unet = UNet2DConditionModel.from_config(config)
    state = pretrained.state_dict()
    del pretrained
    changed = {key: (tuple(state[key].shape), tuple(target.shape))
               for key, target in unet.state_dict().items() if target.shape != state[key].shape}
    for key in sorted(changed):
        module_name, leaf = key.rsplit(".", 1)
        module = unet.get_submodule(module_name).to_empty(device="cpu")
        module.reset_parameters()
        state[key] = module.state_dict()[leaf]
    unet.load_state_dict(state, strict=True, assign=True)
    return unet, dict(sorted(changed.items()))


def load_frozen_vae(path: str | Path) -> AutoencoderKL:
    """A local `AutoencoderKL` (a pipeline folder's ``vae/``, or a VAE folder such as SDXL's or any
    `AutoencoderKL.save_pretrained` folder) in float32, frozen: it only turns crops into latents (paper 2.2.3)."""
    folder, subfolder = _component(local_model_folder(path, "decoder.vae"), "vae", "decoder.vae")
    vae = AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=True, dtype=torch.float32,
                                        variant=_weights_variant(folder / (subfolder or "")))
    return vae.requires_grad_(False).eval()
