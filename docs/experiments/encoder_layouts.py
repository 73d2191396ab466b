"""Exploratory encoder-layout experiments behind docs/training-notes.md ("What the shapes encoder needs").

Not part of the package: a record of the measurements, kept so each figure has its command. It trains the shapes
ViT variants named by its first argument (tokens of the name: pre = pre-norm blocks, light/stem1/stem2 = conv
stems, noblocks = no transformer blocks, dense = per-patch labels, maxshape = shape/colour read as a max over
patches, shapeonly = the shape label alone, ls<value> = layer scale) with supervised attribute heads for
<steps> steps on <renders> training renders, then prints a ridge-free SGD linear probe of the flattened pooled
embeddings (`_val`: new renders of training combinations; no suffix: held-out combinations) and, for maxshape,
the training read-out's own shape accuracy.

    NT=1 python docs/experiments/encoder_layouts.py pre-stem2-maxshape-noblocks-shapeonly 300 3000 lr=2e-3
"""
# ruff: noqa
import random, time, sys, math, json
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from emu2.data.shapes.world import World, SHAPES, COLOURS, BACKGROUNDS, SIZES, CELL_NAMES
from emu2.data.shapes.render import render_scene
from emu2.config import Emu2VisionConfig
from emu2.model import vision as V

torch.set_num_threads(int(__import__("os").environ.get("NT", "2")))
world = World.from_seed(0)
ATTR = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS), "size": list(SIZES),
        "count": [1, 2, 3, 4], "position": sorted(CELL_NAMES[2])}

def dense(s):
    sh = np.zeros((8, 8), np.int64); co = np.zeros((8, 8), np.int64)
    for g in s.groups:
        for (x1, y1, x2, y2) in g.boxes:
            cells = {(min(7, int((y1 + y2) / 2 * 8)), min(7, int((x1 + x2) / 2 * 8)))}
            for i in range(8):
                for j in range(8):
                    cx, cy = (j + .5) / 8, (i + .5) / 8
                    if x1 <= cx <= x2 and y1 <= cy <= y2:
                        cells.add((i, j))
            for i, j in cells:
                sh[i, j] = 1 + ATTR["shape"].index(g.shape); co[i, j] = 1 + ATTR["colour"].index(g.colour)
    return sh, co

DENSE = {}
def make(n, split, seed):
    rng = random.Random(seed)
    X, Y, D = [], [], []
    for _ in range(n):
        s = world.group_scene(rng, split)
        g = s.groups[0]
        D.append(np.stack(dense(s)))
        X.append(np.asarray(render_scene(s, 64)))
        Y.append([ATTR["shape"].index(g.shape), ATTR["colour"].index(g.colour), ATTR["background"].index(s.background),
                  ATTR["size"].index(g.size), g.count - 1, ATTR["position"].index(g.cell)])
    X = torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1
    DENSE[seed] = torch.tensor(np.stack(D))  # (n, 2, 8, 8)
    return X, torch.tensor(Y)

t = time.time()
Xtr, Ytr = make(int(sys.argv[3]) if len(sys.argv) > 3 else 6000, "train", 1)
Xte, Yte = make(600, "heldout", 2)
Xva, Yva = make(600, "train", 3)
print("data", time.time() - t, flush=True)

LS = None
class PreBlock(V.Block):
    def __init__(self, cfg):
        super().__init__(cfg)
        if LS is not None:
            self.g1 = nn.Parameter(torch.full((cfg.width,), LS)); self.g2 = nn.Parameter(torch.full((cfg.width,), LS))
    def forward(self, x):
        if LS is not None:
            x = x + self.g1 * self.attn(self.norm1(x))
            return x + self.g2 * self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

class ConvStem(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, width, 3, 2, 1))
    def forward(self, x):
        return self.net(x).flatten(2).transpose(1, 2)

class LightStem(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(64, width, 3, 2, 1))
    def forward(self, x):
        return self.net(x).flatten(2).transpose(1, 2)

class Stem1(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, width, 3, 2, 1))
    def forward(self, x):
        return self.net(x).flatten(2).transpose(1, 2)

class Stem2(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, width, 3, 1, 1))
    def forward(self, x):
        return self.net(x).flatten(2).transpose(1, 2)

class CNN(nn.Module):
    """conv trunk -> (B, 65, 128) like the ViT (a dummy CLS)."""
    def __init__(self, width=128):
        super().__init__()
        def blk(i, o, st): return [nn.Conv2d(i, o, 3, st, 1), nn.BatchNorm2d(o), nn.GELU()]
        self.net = nn.Sequential(*blk(3, 32, 1), *blk(32, 32, 1), *blk(32, 64, 2), *blk(64, 64, 1),
                                 *blk(64, 128, 2), *blk(128, 128, 1), *blk(128, width, 2), nn.Conv2d(width, width, 1))
    def forward(self, x):
        t = self.net(x).flatten(2).transpose(1, 2)
        return torch.cat([t[:, :1] * 0, t], 1)

def build(variant):
    global LS
    import re as _re
    mm = _re.search(r"ls([0-9.e-]+)", variant)
    LS = float(mm.group(1)) if mm else None
    if variant.startswith("cnn"):
        return CNN()
    cfg = Emu2VisionConfig(image_size=64, patch_size=8, width=128, layers=4, head_width=32, mlp_ratio=4.0)
    m = V.EVAVisionTransformer(cfg)
    nn.init.trunc_normal_(m.pos_embed, std=0.02)
    if "pre" in variant:
        m.blocks = nn.ModuleList([PreBlock(cfg) for _ in range(cfg.layers)])
        m.final_norm = nn.LayerNorm(cfg.width)
    if "stem2" in variant:
        m.patch_embed = Stem2(cfg.width)
    if "noblocks" in variant:
        m.blocks = nn.ModuleList()
    if "stem1" in variant:
        m.patch_embed = Stem1(cfg.width)
    if "light" in variant:
        m.patch_embed = LightStem(cfg.width)
    if "conv" in variant:
        m.patch_embed = ConvStem(cfg.width)
    return m

def encode(m, x):
    tokens = m(x)
    if hasattr(m, "final_norm"):
        tokens = m.final_norm(tokens)
    tokens = tokens[:, 1:]
    B, N, D = tokens.shape
    g = tokens.transpose(1, 2).reshape(B, D, 8, 8)
    return F.avg_pool2d(g, 2, 2).flatten(2).transpose(1, 2)  # (B, 16, D)

def probe(m, steps=300):
    m.eval()
    with torch.no_grad():
        ftr = torch.cat([encode(m, Xtr[i:i+500]).flatten(1) for i in range(0, 3000, 500)])
        fte = torch.cat([encode(m, Xte[i:i+300]).flatten(1) for i in range(0, 600, 300)])
        fva = torch.cat([encode(m, Xva[i:i+300]).flatten(1) for i in range(0, 600, 300)])
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-5
    ftr, fte, fva = (ftr - mu) / sd, (fte - mu) / sd, (fva - mu) / sd
    ytr = Ytr[:3000]
    accs = {}
    for a, (name, vals) in enumerate(ATTR.items()):
        lin = nn.Linear(ftr.shape[1], len(vals))
        opt = torch.optim.AdamW(lin.parameters(), 1e-3, weight_decay=1e-2)
        for s in range(steps):
            idx = torch.randint(0, len(ftr), (256,))
            loss = F.cross_entropy(lin(ftr[idx]), ytr[idx, a]); opt.zero_grad(); loss.backward(); opt.step()
        accs[name] = round((lin(fte).argmax(1) == Yte[:, a]).float().mean().item() * 100, 1)
        accs[name + "_val"] = round((lin(fva).argmax(1) == Yva[:, a]).float().mean().item() * 100, 1)
    if "maxshape" in variant:
        with torch.no_grad():
            tokens = m(Xva[:500])
            if hasattr(m, "final_norm"):
                tokens = m.final_norm(tokens)
            accs["maxhead_shape_val"] = round((dense_heads[0](tokens[:, 1:]).max(1).values.argmax(1) == Yva[:500, 0]).float().mean().item() * 100, 1)
            tokens = m(Xte[:500])
            if hasattr(m, "final_norm"):
                tokens = m.final_norm(tokens)
            accs["maxhead_shape_heldout"] = round((dense_heads[0](tokens[:, 1:]).max(1).values.argmax(1) == Yte[:500, 0]).float().mean().item() * 100, 1)
    if DENSEV:
        with torch.no_grad():
            tokens = m(Xva[:300])
            if hasattr(m, "final_norm"):
                tokens = m.final_norm(tokens)
            pred = dense_heads[0](tokens[:, 1:]).argmax(-1)
            lab = DENSE[3][:300, 0].flatten(1)
            obj = lab > 0
            accs["dense_shape_on_objects_val"] = round((pred[obj] == lab[obj]).float().mean().item() * 100, 1)
    m.train()
    return accs

variant, budget = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
m = build(variant)
MAXTOK = "maxtok" in variant
DENSEV = "dense" in variant
dense_heads = nn.ModuleList([nn.Linear(128, 9 if "maxshape" not in variant else 8), nn.Linear(128, 10 if "maxshape" not in variant else 9)])
heads = nn.ModuleList([nn.Linear(128 if MAXTOK else 16 * 128, len(v)) for v in ATTR.values()])
lr = float(dict(a.split("=") for a in sys.argv[4:]).get("lr", 1e-3)) if len(sys.argv) > 4 else 1e-3
bs = int(dict(a.split("=") for a in sys.argv[4:]).get("bs", 64)) if len(sys.argv) > 4 else 64
opt = torch.optim.AdamW(list(m.parameters()) + list(heads.parameters()) + list(dense_heads.parameters()), lr, betas=(0.9, 0.98), weight_decay=0.05)
t0 = time.time(); step = 0
while step < budget:
    idx = torch.randint(0, len(Xtr), (bs,))
    if "maxshape" in variant:
        tokens = m(Xtr[idx])
        if hasattr(m, "final_norm"):
            tokens = m.final_norm(tokens)
        tokens = tokens[:, 1:]
        B, N, D = tokens.shape
        f = F.avg_pool2d(tokens.transpose(1, 2).reshape(B, D, 8, 8), 2, 2).flatten(2).transpose(1, 2).flatten(1)
        loss = sum(F.cross_entropy(dense_heads[k](tokens).max(1).values, Ytr[idx, k]) for k in ((0,) if "shapeonly" in variant else (0, 1)))
        if "shapeonly" not in variant:
            loss = loss + sum(F.cross_entropy(h(f), Ytr[idx, a]) for a, h in enumerate(heads) if a >= 2)
    elif DENSEV:
        tokens = m(Xtr[idx])
        if hasattr(m, "final_norm"):
            tokens = m.final_norm(tokens)
        tokens = tokens[:, 1:]
        lab = DENSE[1][idx].flatten(2)  # (B, 2, 64)
        dl = sum(F.cross_entropy(h(tokens).transpose(1, 2), lab[:, k]) for k, h in enumerate(dense_heads))
        B, N, D = tokens.shape
        f = F.avg_pool2d(tokens.transpose(1, 2).reshape(B, D, 8, 8), 2, 2).flatten(2).transpose(1, 2).flatten(1)
        loss = dl + sum(F.cross_entropy(h(f), Ytr[idx, a]) for a, h in enumerate(heads))
    elif MAXTOK:
        f = encode(m, Xtr[idx])
        loss = sum(F.cross_entropy(h(f).max(1).values, Ytr[idx, a]) for a, h in enumerate(heads))
    else:
        f = encode(m, Xtr[idx]).flatten(1)
        loss = sum(F.cross_entropy(h(f), Ytr[idx, a]) for a, h in enumerate(heads))
    for gr in opt.param_groups:
        gr["lr"] = lr * min(1.0, (step + 1) / 50)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 100 == 0:
        print(step, round(time.time() - t0), round(loss.item(), 3), flush=True)
    if step in (150, 300):
        print(json.dumps({"at": step, "probe": probe(m)}), flush=True)
print(json.dumps({"variant": variant, "steps": step, "s": round(time.time() - t0), "probe": probe(m), "argv": sys.argv[1:]}), flush=True)
