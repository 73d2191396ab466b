"""Does a visual embedding say which slot of the pooled grid it is? A ridge probe of the slot index of the
object-bearing embeddings of 1,500 training renders (fitted on 80 %, scored on the rest), from the raw pooled
embeddings and from `project_up` of them (docs/training-notes.md, "Where the position goes").

    python docs/experiments/slot_probe.py runs/quickstart/encoder runs/quickstart/data 16
"""
# ruff: noqa
import json, sys, math
from pathlib import Path
import torch
from emu2.pipelines import Emu2Pipeline
from emu2.data.shapes.supervision import AttributePool
from emu2.data.shapes.world import World

pipe = Emu2Pipeline.from_pretrained(sys.argv[1]); data = Path(sys.argv[2]); Q = int(sys.argv[3]) if len(sys.argv) > 3 else 16
m = json.loads((data / "dataset.json").read_text()); model = pipe.model.float().eval()
vc = model.config.vision_config
pool = AttributePool(World.from_seed(m.get("seed", 0)), vc.image_size, vc.grid_size, size=1500, seed=5, pooled=math.isqrt(Q))
with torch.no_grad():
    f = torch.cat([model.visual.encode_image(pool.images[i:i+250], Q) for i in range(0, len(pool), 250)])  # (N,Q,Dv)
    p = model.project_up(f)
shape = pool.labels["cell_shape"]  # (N, Q), 0 = empty
obj = shape > 0
slot = torch.arange(Q).expand_as(shape)
def probe(x):
    x = x[obj].double(); y = slot[obj]
    n = len(y); tr = torch.arange(n) < int(0.8 * n)
    X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    Y = torch.nn.functional.one_hot(y, Q).double()
    W = torch.linalg.solve(X[tr].T @ X[tr] + 1.0 * torch.eye(X.shape[1], dtype=X.dtype), X[tr].T @ Y[tr])
    return float(((X[~tr] @ W).argmax(1) == y[~tr]).double().mean())
print(json.dumps({"model": sys.argv[1], "object_slots": int(obj.sum()), "raw": round(probe(f), 3), "projected": round(probe(p), 3),
                  "chance": round(1 / Q, 3)}))
