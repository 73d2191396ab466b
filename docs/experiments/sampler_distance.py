"""How far each sampler's images land from the official 50 Euler steps, on a trained Emu2-Gen.

    python docs/experiments/sampler_distance.py runs/quickstart 24

Reads ``RUN/emu2-gen`` and ``RUN/data/dataset.json`` (a quickstart output). Draws N held-out text-to-image
prompts and N autoencoded renders with the official Euler sampler at 50 steps, then again with DPM-Solver++ at
10, 15 and 20 steps and Euler at 25, every image from the same seeded initial noise as its official one. Prints
JSON: per sampler, the seconds for all images and the mean absolute grey-level difference from the official
image (mean over images and its 90th percentile) with the median PSNR.
"""

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emu2.data.shapes.render import render_scene
from emu2.data.shapes.tasks import caption
from emu2.data.shapes.world import World
from emu2.pipelines.gen import Emu2GenPipeline


def main(run: Path, n: int) -> dict:
    gen = Emu2GenPipeline.from_pretrained(run / "emu2-gen")
    gen.decoder.set_progress_bar_config(disable=True)
    manifest = json.loads((run / "data" / "dataset.json").read_text())
    world, rng = World.from_seed(manifest.get("seed", 0)), random.Random(1234)
    prompts, renders = [], []
    for _ in range(n):
        scene = world.group_scene(rng, "heldout")
        prompts.append([caption(scene, rng)])
        renders.append(render_scene(scene, manifest.get("image_size", 64)))

    def draw(sampler: str, steps: int) -> tuple[list[np.ndarray], float]:
        start, images = time.perf_counter(), []
        for items in (prompts, renders):  # text-to-image, then autoencoding (a batch holds one kind)
            for i in range(0, len(items), 16):
                batch = items[i:i + 16]
                noise = [torch.Generator().manual_seed(i + j) for j in range(len(batch))]
                images += gen(batch, sampler=sampler, num_inference_steps=steps, generator=noise).images
        return [np.asarray(im).astype(float) for im in images], time.perf_counter() - start

    official, seconds = draw("official", 50)
    result = {"images": len(official), "official_euler_50_s": round(seconds, 1)}
    for sampler, steps in (("dpm-solver++", 10), ("dpm-solver++", 15), ("dpm-solver++", 20), ("official", 25)):
        images, seconds = draw(sampler, steps)
        diff = np.array([np.abs(a - b).mean() for a, b in zip(images, official)])
        mse = np.array([((a - b) ** 2).mean() for a, b in zip(images, official)])
        result[f"{sampler} {steps}"] = {
            "s": round(seconds, 1), "mean_grey_diff": round(float(diff.mean()), 2),
            "mean_grey_diff_p90": round(float(np.percentile(diff, 90)), 2),
            "psnr_db_median": round(float(np.median(10 * np.log10(255**2 / np.maximum(mse, 1e-10)))), 1)}
    return result


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2])), indent=2))
