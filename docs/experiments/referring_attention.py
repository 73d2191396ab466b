"""Where the chat model looks when asked about one of several objects: attention from the question's shape word
and from the last prompt token to the visual embeddings of the named object and of the other objects.

    python docs/experiments/referring_attention.py CHAT_DIR [SPLIT] [ITEMS]

Asks "What colour is the <shape>?" (as `referring.py` does) about ITEMS (default 64) scenes of 2-3 objects of
SPLIT (default `train`). An embedding belongs to an object when its patch centre lies in the object's box (or it
holds the box centre), on the model's n_query grid. For each layer, at the shape word and at the last prompt token,
prints the head that puts most of its attention on the image: that share, and its mean attention per embedding of
the named object divided by that per embedding of the other objects (1.0: no preference); then, among the heads
with at least 5 % on the image, the highest such ratio.
"""
# ruff: noqa
import random, sys

import torch

torch.set_num_threads(2)
from emu2 import processing as P
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.supervision import _covered
from emu2.data.shapes.world import World
from emu2.eval.prompts import SHORT_ANSWER_INSTRUCTION
from emu2.pipelines.emu2 import Emu2Pipeline

SHORT = "\n" + SHORT_ANSWER_INSTRUCTION


def cells(box, side):
    """Row-major indices of the embeddings an object covers, as the encoder's cell labels count them."""
    return {i * side + j for i, j in _covered(box, side)}


pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
split = sys.argv[2] if len(sys.argv) > 2 else "train"
items = int(sys.argv[3]) if len(sys.argv) > 3 else 64
model = pipe.model.eval()
model.language_model.config._attn_implementation = "eager"  # attention weights are returned by eager only
n_query, image_id = model.config.n_query, model.config.image_token_id
side = int(n_query ** 0.5)
world, rng = World.from_seed(0), random.Random(99)
sums = None
for _ in range(items):
    scene = world.multi_scene(rng, split, objects=rng.randint(2, 3))
    g = rng.choice(scene.groups)
    prompt = P.chat_prompt([P.IMAGE_PLACEHOLDER + f"What colour is the {g.shape}?" + SHORT],
                           system=P.SHORT_ANSWER_SYSTEM_MESSAGE)
    batch = pipe.encode([prompt], [render_scene(scene, 64)])
    ids = batch["input_ids"][0]
    image = (ids == image_id).nonzero()[:, 0]  # the n_query embedding positions, row-major
    shape_ids = pipe.tokenizer(" " + g.shape, add_special_tokens=False)["input_ids"]
    word = max(i for i in range(len(ids) - len(shape_ids) + 1) if ids[i:i + len(shape_ids)].tolist() == shape_ids)
    word += len(shape_ids) - 1  # the shape word's last piece
    named = image[sorted(cells(g.box, side))]
    others = image[sorted(set().union(*(cells(h.box, side) for h in scene.groups if h is not g)) - cells(g.box, side))]
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], model.encode_image(batch["images"]))
        attn = model.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                  output_attentions=True).attentions
    rows = []
    for a in attn:  # (1, heads, L, L)
        a = a[0]
        at = torch.stack([a[:, word], a[:, -1]], 1)  # (heads, 2, L)
        rows.append(torch.stack([at[..., named].mean(-1), at[..., others].mean(-1), at[..., image].sum(-1)], -1))
    s = torch.stack(rows)  # (layers, heads, 2 positions, 3)
    sums = s if sums is None else sums + s
print("layer | shape word: most-image head (share, named/other); best ratio (share >= 5 %) | last token: the same")
for layer, s in enumerate(sums / items):
    ratio = s[..., 0] / s[..., 1].clamp(min=1e-9)  # (heads, 2)
    cols = []
    for pos in range(2):
        h = int(s[:, pos, 2].argmax())
        seen = [k for k in range(len(ratio)) if s[k, pos, 2] >= 0.05]
        best = max(seen, key=lambda k: float(ratio[k, pos])) if seen else None
        cols.append(f"h{h} {float(s[h, pos, 2]):.2f} {float(ratio[h, pos]):4.2f}; "
                    + (f"h{best} {float(s[best, pos, 2]):.2f} {float(ratio[best, pos]):4.2f}" if seen else "-"))
    print(f"{layer:5d} | {cols[0]:32s} | {cols[1]}")
