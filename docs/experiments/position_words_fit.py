"""Refit a model's `project_up` as the encoder stage does, with `encoder.word_projection_position` = WEIGHT (the
words of each object's caption position added to its targets; 0 = the fit without them), and save it to OUT
(docs/training-notes.md, "Where the position goes"). Then train stage 1 (and on) from OUT with the quickstart's
own configs, e.g. `emu2 train runs/quickstart/stage1/train_config.yaml model.init_from=OUT
data.root=runs/quickstart/data output_dir=...`.

    python docs/experiments/position_words_fit.py runs/quickstart/encoder runs/quickstart/data OUT 2.5
"""
# ruff: noqa
import json, math, sys
from pathlib import Path
from emu2.pipelines import Emu2Pipeline
from emu2.data.shapes.supervision import AttributePool
from emu2.data.shapes.world import World
from emu2.train.stages.encoder import fit_word_projection

src, data, dst, weight = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
pipe = Emu2Pipeline.from_pretrained(src); model = pipe.model.float()
m = json.loads((data / "dataset.json").read_text()); vc = model.config.vision_config; Q = model.config.n_query
pool = AttributePool(World.from_seed(m.get("seed", 0)), vc.image_size, vc.grid_size, size=3000, seed=0, pooled=math.isqrt(Q))
print("R2", round(fit_word_projection(model, pipe.tokenizer, pool, Q, position_weight=weight), 4))
pipe.save_pretrained(dst)
