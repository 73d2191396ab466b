"""What must a regression reach for the decoder to draw the scene? The best a mean-squared-error regression can
output for a caption is the mean of the embeddings of the scenes the caption allows. For held-out scenes, this
averages the encoder's embeddings of 8 layouts of the same scene (same attributes, objects placed anew), decodes
the average and reads the image back with the pixel detector, beside the decoded true embeddings. Unconditional
embeddings for guidance: the mean of 3,000 training scenes' embeddings.

    python docs/experiments/decode_conditional_mean.py ENCODER_DIR DECODER_DIR DATA_DIR [SCENES]

ENCODER_DIR: e.g. runs/quickstart/stage1; DECODER_DIR: runs/quickstart/emu2-gen/decoder.
"""
# ruff: noqa
import json, random, sys
from dataclasses import replace
from pathlib import Path

import torch

torch.set_num_threads(2)
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.world import World, layout
from emu2.eval.shapes_generation import attribute_accuracy
from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.processing import preprocess_images

model = Emu2Pipeline.from_pretrained(sys.argv[1]).model.eval()
decoder = Emu2VisualDecoderPipeline.from_pretrained(sys.argv[2])
decoder.set_progress_bar_config(disable=True)
data, n = Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 100
manifest = json.loads((data / "dataset.json").read_text())
world, size = World.from_seed(manifest.get("seed", 0)), manifest.get("image_size", 64)


def encode(scenes):
    with torch.no_grad():
        return torch.cat([model.encode_image(preprocess_images([render_scene(s, size) for s in scenes[i:i + 64]],
                                                               model.config.vision_config.image_size))
                          for i in range(0, len(scenes), 64)])


rng = random.Random(1)
uncond = encode([world.group_scene(rng, "train") for _ in range(3000)]).mean(0, keepdim=True)
rng, relayout = random.Random(1234), random.Random(7)
scenes = [world.group_scene(rng, "heldout") for _ in range(n)]
truth = encode(scenes)
averaged = torch.stack([encode([replace(s, groups=(replace(g, boxes=layout(g.cell, s.grid, g.count, g.size, relayout)),))
                                for _ in range(8)]).mean(0) for s in scenes for g in s.groups[:1]])
print(f"MSE of the 8-layout mean to the scene's own embeddings: {((averaged - truth) ** 2).mean():.3f}")
for name, embeds in (("true embeddings", truth), ("8-layout mean", averaged)):
    for guidance in (1.0, 3.0):
        images = []
        for i in range(0, n, 25):
            generators = [torch.Generator().manual_seed(1234 + j) for j in range(i, min(i + 25, n))]
            images += decoder(embeds[i:i + 25], uncond, num_inference_steps=10, guidance_scale=guidance,
                              generator=generators).images
        acc = attribute_accuracy(images, scenes)
        print(f"{name}, guidance {guidance:g}:",
              {a: acc[a] for a in ("shape", "colour", "count", "position", "background", "size")})
