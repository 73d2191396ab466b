"""Sanity check behind docs/training-notes.md: a 4-layer CNN with a max-pooled read-out learns the shapes
world's shape label quickly (single large objects, then every one-group scene). `python docs/experiments/shape_cnn_sanity.py`"""
# ruff: noqa
import random, numpy as np, torch, torch.nn as nn, torch.nn.functional as F, time
torch.set_num_threads(1)
from emu2.data.shapes.world import World, SHAPES
from emu2.data.shapes.render import render_scene
w = World.from_seed(0); rng = random.Random(0)
def make(n, **fixed):
    X, Y = [], []
    for _ in range(n):
        s = w.group_scene(rng, "train", **fixed); X.append(np.asarray(render_scene(s, 64))); Y.append(SHAPES.index(s.groups[0].shape))
    return torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(Y)
for fixed in ({"count": 1, "size": "large"}, {}):
    X, Y = make(3000, **fixed); Xv, Yv = make(500, **fixed)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(),
                        nn.Conv2d(128, 128, 3, 1, 1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, 8))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    t = time.time()
    for step in range(300):
        idx = torch.randint(0, 3000, (64,)); loss = F.cross_entropy(net(X[idx]), Y[idx]); opt.zero_grad(); loss.backward(); opt.step()
        if step % 100 == 99:
            with torch.no_grad(): acc = (net(Xv).argmax(1) == Yv).float().mean().item()
            print(fixed, step + 1, round(time.time() - t), round(loss.item(), 3), "val shape acc", round(acc * 100, 1), flush=True)
