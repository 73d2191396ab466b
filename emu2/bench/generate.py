"""`emu2 bench generate`: seconds per image, the official algorithm against ours, on one random model in one run.

Two prompts: a short text prompt, and a 12-shot interleaved prompt (12 x [image, caption] then the request, about
1,000 tokens). For each, per repeat and in turn (so machine noise hits every variant alike; the median is kept):

- official: the official `EmuVisualGeneration.forward`: the prompt regressed without a KV cache (`generate_image`
  re-runs the sequence for each embedding), the unconditional embeddings from its per-pipeline cache, 50 Euler
  steps. ``official_first_call_s`` adds the empty prompt's uncached regression, which its first call pays;
- ours: `Emu2GenPipeline` with its defaults (KV-cached regression, cached unconditional embeddings, DPM-Solver++
  at 15 steps); ``ours_first_call_s`` with a cold cache (the guidance pair regressed as one batch);
- ours_official_sampler: ours with ``sampler="official"`` (50 Euler steps), whose image must equal the official one.

Each image of ours is compared with the official 50-step Euler image from the same initial latents: maximum and mean
absolute difference in grey levels, PSNR (dB), and the cosine similarity of the two images under the model's own
vision encoder (a CLIP-I-style score).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

PROMPT = "a large red circle in the top left of the picture, on a white background"


def _model(seed: int = 0):
    from ..model import Emu2ForCausalLM
    from ..pipelines.emu2 import Emu2Pipeline
    from ..pipelines.gen import Emu2GenPipeline, tiny_decoder_config
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline
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


def twelve_shot_prompt(shots: int = 12) -> list:
    """``shots`` x [image, caption], then the request: the interleaved in-context prompt of a few-shot generation."""
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    items = []
    for i in range(shots):
        colour = colours[i % len(colours)]
        items += [Image.new("RGB", (64, 64), colour),
                  f"a small {colour} square in the bottom right of the picture, on a plain grey background. "]
    return [*items, PROMPT]


def _metrics(image: np.ndarray, official: np.ndarray, clip_i) -> dict:
    diff = image.astype(float) - official.astype(float)
    mse = float((diff**2).mean())
    return {"max_grey_diff": int(np.abs(diff).max()), "mean_grey_diff": round(float(np.abs(diff).mean()), 3),
            "psnr_db": round(10 * np.log10(255**2 / mse), 1) if mse else None,  # None: identical images
            "own_clip_i": round(clip_i(image, official), 6)}


def _case(gen, inputs, latents, official_uncond, repeats: int) -> dict:
    from .regression import official_recompute_regression

    model = gen.encoder.model
    batch = gen.encoder.encode_interleaved(inputs)
    empty = gen.encoder.encode([""])["input_ids"]

    def official():
        with torch.no_grad():
            features = model.encode_image(batch["images"]) if batch["images"] is not None else None
            cond = official_recompute_regression(model, batch["input_ids"], features)
        return gen.decoder(cond, official_uncond, num_inference_steps=50, latents=latents).images[0]

    def official_uncond_regression():
        return official_recompute_regression(model, empty)

    def ours():
        return gen(inputs, latents=latents).image

    def ours_first_call():
        gen._uncond.clear()
        return gen(inputs, latents=latents).image

    def ours_regression():
        return gen.conditioning(inputs)

    def ours_official_sampler():
        return gen(inputs, latents=latents, sampler="official").image

    runs = {"official": official, "official_uncond_regression": official_uncond_regression, "ours": ours,
            "ours_first_call": ours_first_call, "ours_regression": ours_regression,
            "ours_official_sampler": ours_official_sampler}
    ours()  # warm-up, and the unconditional cache filled as a serving pipeline would have it
    seconds = {name: [] for name in runs}
    images = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            images[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    s = {name: statistics.median(values) for name, values in seconds.items()}
    s["official_first_call"] = s["official"] + s.pop("official_uncond_regression")
    return {"seconds": s, "images": {k: np.asarray(images[k]) for k in ("official", "ours", "ours_official_sampler")},
            "prompt_tokens": int(batch["input_ids"].shape[1])}


def run(repeats: int = 3, shots: int = 12, gen=None) -> dict:
    """Seconds per image (median of ``repeats``) and image differences for the short and the ``shots``-shot prompt,
    on ``gen`` (an `Emu2GenPipeline`; default the benchmark's 512-wide, 8-layer model with a 32x32-latent UNet)."""
    from PIL import Image

    from ..pipelines.gen import DEFAULT_STEPS
    from ..processing import preprocess_images
    from .regression import official_recompute_regression

    gen = gen or _model()
    model, unet = gen.encoder.model, gen.decoder.unet.config
    latents = torch.randn(1, unet.in_channels, unet.sample_size, unet.sample_size,
                          generator=torch.Generator().manual_seed(0))
    # The official pipeline's `negative_prompt` cache, filled by its first call.
    official_uncond = official_recompute_regression(model, gen.encoder.encode([""])["input_ids"])

    def own_clip_i(a, b):
        pixels = preprocess_images([Image.fromarray(a), Image.fromarray(b)], model.config.vision_config.image_size)
        with torch.no_grad():
            feats = model.encode_image(pixels).flatten(1)
        return float(torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0))

    text = model.config.text_config
    results = {"model": {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "n_query": model.config.n_query,
                         "latents": list(latents.shape[1:]), "threads": torch.get_num_threads()},
               "ours_sampler": f"dpm-solver++, {DEFAULT_STEPS['dpm-solver++']} steps", "repeats": repeats,
               "cases": {}}
    for name, inputs in (("short", [PROMPT]), (f"{shots}_shot", twelve_shot_prompt(shots))):
        case = _case(gen, inputs, latents, official_uncond, repeats)
        s, images = case["seconds"], case["images"]
        results["cases"][name] = {
            "prompt_tokens": case["prompt_tokens"],
            **{f"{k}_s": round(v, 3) for k, v in s.items()},
            "speedup": round(s["official"] / s["ours"], 2),
            "speedup_first_call": round(s["official_first_call"] / s["ours_first_call"], 2),
            # official's first call against ours warm: how the figures before this benchmark were stated
            "speedup_vs_official_first_call": round(s["official_first_call"] / s["ours"], 2),
            "speedup_official_sampler": round(s["official"] / s["ours_official_sampler"], 2),
            "ours_vs_official": _metrics(images["ours"], images["official"], own_clip_i),
            "ours_official_sampler_vs_official": _metrics(images["ours_official_sampler"], images["official"],
                                                          own_clip_i),
        }
    results.update({k: results["cases"]["short"][k] for k in ("speedup", "ours_vs_official")})
    return results
