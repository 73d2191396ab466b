"""Emu2-Gen with its parts on different devices (official demo: the UNet, VAE and safety checker may each sit on
another GPU than the multimodal encoder's layers; the official pipeline draws the latents on ``unet.device``).

A CPU test stands in "meta" for a second device and runs under `_OneDevicePerOp`, which refuses an op mixing
devices as CUDA does. It catches tensors left on the wrong device between the conditioning, the UNet and the VAE;
it does not run real multi-GPU kernels.
"""

import pytest
from PIL import Image

from emu2.pipelines.gen import Emu2GenPipeline

from ..test_model import _OneDevicePerOp


@pytest.fixture
def gen():
    pipe = Emu2GenPipeline.from_preset("tiny")
    pipe.decoder.set_progress_bar_config(disable=True)
    return pipe


def _tiny_safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    return StableDiffusionSafetyChecker(CLIPConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32}, projection_dim=8))


def test_denoising_runs_on_the_unet_device_when_another_part_sits_elsewhere(gen):
    """Official `EmuVisualGeneration.forward` draws the latents on `self.unet.device`. diffusers' execution
    device would be the safety checker's here (it sorts first), so the latents and the conditioning must follow
    the UNet instead."""
    from transformers import CLIPImageProcessor

    decoder = gen.decoder.__class__(unet=gen.decoder.unet, scheduler=gen.decoder.scheduler, vae=gen.decoder.vae,
                                    safety_checker=_tiny_safety_checker().to("meta"),
                                    feature_extractor=CLIPImageProcessor())
    decoder.set_progress_bar_config(disable=True)
    cond, uncond = gen.conditioning(["a red circle"])
    with _OneDevicePerOp():
        latents = decoder(cond, uncond, num_inference_steps=2, output_type="latent").images
    assert latents.device == decoder.unet.device


def test_latents_are_decoded_on_the_vae_device_when_it_sits_apart_from_the_unet(gen):
    """The official demo hooks `vae.decode` to move its input to the VAE's device; the final latents go there."""
    cond, uncond = gen.conditioning([Image.new("RGB", (32, 32), "red")])  # autoencoding: encoder features
    gen.decoder.vae.to("meta")
    with _OneDevicePerOp():
        images = gen.decoder(cond, uncond, num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert images.device.type == "meta" and images.shape == (1, 3, 16, 16)



def test_from_pretrained_puts_the_decoder_whole_on_decoder_device(gen, tmp_path):
    gen.save_pretrained(tmp_path)
    pipe = Emu2GenPipeline.from_pretrained(tmp_path, device_map="cpu", decoder_device="meta")
    assert {p.device.type for p in pipe.decoder.unet.parameters()} == {"meta"}
    assert pipe.decoder.vae.device.type == "meta" and pipe.encoder.model.project_down.weight.device.type == "cpu"


def test_with_a_device_map_the_decoder_follows_the_regressed_embeddings(gen, tmp_path, monkeypatch):
    """``device_map`` splits the encoder (transformers/accelerate); by default the decoder then goes whole to the
    device of ``project_down``, which the regressed embeddings come out of."""
    from emu2.pipelines.emu2 import Emu2Pipeline

    gen.save_pretrained(tmp_path)
    load = Emu2Pipeline.from_pretrained.__func__

    def load_with_project_down_elsewhere(cls, *args, **kwargs):
        encoder = load(cls, *args, **kwargs)
        encoder.model.project_down.to("meta")  # as a device_map that puts the last module on a second GPU
        return encoder

    monkeypatch.setattr(Emu2Pipeline, "from_pretrained", classmethod(load_with_project_down_elsewhere))
    pipe = Emu2GenPipeline.from_pretrained(tmp_path, device_map="cpu")
    assert pipe.decoder.unet.device.type == "meta" and pipe.decoder.vae.device.type == "meta"
