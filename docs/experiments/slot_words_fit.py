"""Refit a model's `project_up` as `fit_word_projection` does, with each slot's half-grid words ("top"/"bottom",
"left"/"right") added to every slot's target, and save the model (docs/training-notes.md, "Where the position
goes"). Then train stage 1, stage 2 and chat from OUT with the quickstart's own configs, e.g.
`emu2 train runs/quickstart/stage1/train_config.yaml model.init_from=OUT data.root=runs/quickstart/data output_dir=...`.

    python docs/experiments/slot_words_fit.py runs/quickstart/encoder runs/quickstart/data OUT
"""
# ruff: noqa
import json, math, sys
from pathlib import Path
import torch
from emu2.pipelines import Emu2Pipeline
from emu2.data.shapes.supervision import AttributePool
from emu2.data.shapes.world import World
from emu2.train.stages.encoder import fit_projection, word_targets, word_vectors

src, data, dst = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]); weight_pos = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
pipe = Emu2Pipeline.from_pretrained(src); model = pipe.model.float(); tok = pipe.tokenizer
m = json.loads((data / "dataset.json").read_text()); vc = model.config.vision_config; Q = model.config.n_query; side = math.isqrt(Q)
pool = AttributePool(World.from_seed(m.get("seed", 0)), vc.image_size, vc.grid_size, size=3000, seed=0, pooled=side)
rows = word_vectors(model, tok, ["top", "bottom"]).double(); cols = word_vectors(model, tok, ["left", "right"]).double()
slot = torch.arange(Q).repeat(len(pool))
r, c = slot // side, slot % side
target = word_targets(model, tok, pool, Q) + weight_pos * (rows[(r >= side / 2).long()] + cols[(c >= side / 2).long()])
r2 = fit_projection(model, pool, Q, target)
print("R2", float(r2))
pipe.save_pretrained(dst)
