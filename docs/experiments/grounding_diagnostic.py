"""Why a chat model's grounding answers do not parse (issue 14 note): the probability after `<object>` on the
coordinate tokens against `</object>`, and the IoU of boxes whose four coordinates are forced (greedy among the
coordinate tokens only), on held-out multi-object scenes.

    python docs/experiments/grounding_diagnostic.py runs/quickstart/chat
"""
# ruff: noqa
import random, sys

import torch

from emu2 import processing as P
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.world import World, describe
from emu2.eval.metrics import box_iou
from emu2.pipelines.emu2 import Emu2Pipeline

pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
tok = pipe.tokenizer
world, rng = World.from_seed(0), random.Random(1234)
coords = torch.tensor(sorted(i for t, i in tok.get_vocab().items() if t.startswith("<patch_index_")))
end = tok.convert_tokens_to_ids(P.OBJECT_END)


@torch.no_grad()
def last_logits(text, image):
    batch = pipe.encode([text], [image])
    return pipe.model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits[0, -1].float()


mass, top, stop, ious = [], [], [], []
for _ in range(100):
    scene = world.multi_scene(rng, "heldout", objects=rng.randint(2, 3))
    group = rng.choice(scene.groups)
    question = f"{P.IMAGE_PLACEHOLDER}Where is the {describe(group, article='').strip()}? Give its box."
    text, image = P.chat_prompt([question], system=P.SHORT_ANSWER_SYSTEM_MESSAGE) + P.OBJECT, render_scene(scene, 64)
    probs = last_logits(text, image).softmax(-1)
    mass.append(float(probs[coords].sum())); top.append(float(probs[coords].max())); stop.append(float(probs[end]))
    for _ in range(4):
        logits = last_logits(text, image)
        text += tok.convert_ids_to_tokens(int(coords[logits[coords].argmax()]))
    box = P.parse_box(text[text.rindex(P.OBJECT):] + P.OBJECT_END)
    ious.append(box_iou(box, group.box) if box else 0.0)
n = len(ious)
print(f"after <object>: coordinate mass {sum(mass) / n:.3f}, best coordinate {sum(top) / n:.3f}, </object> "
      f"{sum(stop) / n:.3f}; forced coordinates: IoU >= 0.5 {100 * sum(i >= 0.5 for i in ious) / n:.1f} %, "
      f"mean IoU {sum(ious) / n:.3f} (n={n})")
