"""Does the projection still map each pooled embedding to the words for what it shows? For 500 new training-split
renders of the seed-0 world (the quickstart's; the encoder stage's label layout), each pooled embedding is
projected (`project_up`) and matched to the LM's input embeddings of the colour and shape words (object cells) and background colours (empty cells) by dot
product; prints the share matched correctly. The encoder stage fits the projection this way
(`encoder.word_projection`); later stages train it on, and this says how much of the fit is left.

    python docs/experiments/word_readout.py MODEL_DIR [MODEL_DIR ...]

MODEL_DIR: e.g. runs/quickstart/encoder, runs/quickstart/stage1 (chance: colour 1/9, shape 1/8, background 1/4).
"""
# ruff: noqa
import math, sys

import torch

torch.set_num_threads(2)
from emu2.data.shapes.supervision import LABEL_WORDS, AttributePool
from emu2.data.shapes.world import World
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.train.stages.encoder import word_vectors

for directory in sys.argv[1:]:
    pipe = Emu2Pipeline.from_pretrained(directory)
    model, n_query = pipe.model.eval(), pipe.model.config.n_query
    vision = model.config.vision_config
    pool = AttributePool(World.from_seed(0), vision.image_size, vision.grid_size, size=500, seed=99,
                         pooled=math.isqrt(n_query))
    with torch.no_grad():
        features = model.visual.encode_image(pool.images, n_query)
        projected = model.project_up(features.to(model.project_up.weight.dtype)).flatten(0, 1)  # (500*Q, D)
    shape = pool.labels["cell_shape"].reshape(-1)
    objects = shape > 0
    background = pool.labels["background"].repeat_interleave(n_query)
    # (the words' table, each embedding's class, which embeddings) per label; cell classes k > 0 name word k - 1
    labels = {"cell_colour": (pool.labels["cell_colour"].reshape(-1) - 1, objects),
              "cell_shape": (shape - 1, objects), "background": (background, ~objects)}
    scores = {}
    for key, (label, cells) in labels.items():
        words = word_vectors(model, pipe.tokenizer, LABEL_WORDS[key])
        scores[key] = ((projected[cells] @ words.T).argmax(1) == label[cells]).float().mean().item()
    print(directory, {k: f"{100 * v:.1f} %" for k, v in scores.items()},
          f"projection norm {projected.norm(dim=1).mean():.2f}")
