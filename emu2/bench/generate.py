"""`emu2 bench generate`: seconds per image, official algorithm against ours, on one random model in one run.

- official: uncached regression of the prompt and the empty prompt (the official `generate_image`, re-running
  the sequence per embedding) + 50 Euler steps;
- ours: KV-cached regression (unconditional embeddings cached per pipeline) + 50 Euler steps;
- ours + DPM-Solver++ at 20 steps.
The image difference between schedulers is reported as mean absolute difference (grey levels) and as the cosine
similarity of the two images under the model's own encoder (a CLIP-I-style score).
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _model(seed: int = 0):
    from ..gen.pipeline import Emu2GenPipeline, tiny_decoder_config
    from ..model import Emu2ForCausalLM
    from ..model.decoder import Emu2VisualDecoderPipeline
    from ..pipeline import Emu2Pipeline
    from ..processing import load_tokenizer
    from .regression import bench_config

    torch.manual_seed(seed)
    config = bench_config()
    encoder = Emu2Pipeline(Emu2ForCausalLM(config).eval(), load_tokenizer())
    parts = tiny_decoder_config(config.vision_config.width)
    parts["unet"].update(sample_size=32, block_out_channels=[64, 128], attention_head_dim=[2, 4])
    decoder = Emu2VisualDecoderPipeline.from_configs(parts["unet"], parts["vae"])
    decoder.set_progress_bar_config(disable=True)
    return Emu2GenPipeline(encoder, decoder)


def run(prompt: str = "a large red circle in the top left of the picture, on a white background") -> dict:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from .regression import official_recompute_regression

    gen = _model()
    model = gen.encoder.model
    euler = gen.decoder.scheduler
    ids = gen.encoder.encode([prompt])["input_ids"]
    empty = gen.encoder.encode([""])["input_ids"]
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def decode(cond, uncond, steps):
        return np.asarray(gen.decoder(cond, uncond, num_inference_steps=steps, latents=latents).images[0])

    timings, images = {}, {}
    start = time.perf_counter()
    with torch.no_grad():
        cond = official_recompute_regression(model, ids)
        uncond = official_recompute_regression(model, empty)
    images["official"] = decode(cond, uncond, 50)
    timings["official_s"] = time.perf_counter() - start

    gen.conditioning([prompt])  # fill the unconditional cache once, as a serving pipeline would have
    start = time.perf_counter()
    cond, uncond = gen.conditioning([prompt])
    regression_s = time.perf_counter() - start
    images["ours_euler50"] = decode(cond, uncond, 50)
    timings["ours_euler50_s"] = time.perf_counter() - start

    gen.decoder.scheduler = DPMSolverMultistepScheduler.from_config(euler.config, algorithm_type="dpmsolver++")
    start = time.perf_counter()
    cond, uncond = gen.conditioning([prompt])
    images["ours_dpmpp20"] = decode(cond, uncond, 20)
    timings["ours_dpmpp20_s"] = time.perf_counter() - start
    gen.decoder.scheduler = EulerDiscreteScheduler.from_config(euler.config)

    def own_clip_i(a, b):
        from PIL import Image

        from ..processing import preprocess_images

        pixels = preprocess_images([Image.fromarray(a), Image.fromarray(b)], model.config.vision_config.image_size)
        with torch.no_grad():
            feats = model.encode_image(pixels).flatten(1)
        return float(torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0))

    return {
        **{k: round(v, 3) for k, v in timings.items()},
        "ours_regression_s": round(regression_s, 3),
        "speedup_euler50": round(timings["official_s"] / timings["ours_euler50_s"], 2),
        "speedup_dpmpp20": round(timings["official_s"] / timings["ours_dpmpp20_s"], 2),
        "official_vs_ours_euler50_max_grey_diff": int(np.abs(images["official"].astype(int)
                                                             - images["ours_euler50"].astype(int)).max()),
        "euler50_vs_dpmpp20_mean_grey_diff": round(float(np.abs(images["ours_euler50"].astype(float)
                                                                - images["ours_dpmpp20"].astype(float)).mean()), 2),
        "euler50_vs_dpmpp20_own_clip_i": round(own_clip_i(images["ours_euler50"], images["ours_dpmpp20"]), 4),
        "model": {"hidden": 512, "layers": 8, "n_query": 64, "image": "64 px, 32x32x4 latents (random UNet/VAE)"},
        "prompt_tokens": int(ids.shape[1]),
    }
