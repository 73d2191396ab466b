"""Does the Gen model's regression read the caption? Per-slot mean squared error of the visual embeddings regressed
for held-out text-to-image captions, against the encoder's embeddings of the true renders, three ways:

- free: what generation does (`Emu2Pipeline.regress_image_embeddings`: each slot fed the model's previous one);
- teacher: the true embedding of slot k-1 fed for slot k (what training optimises);
- mean: the mean embedding of the scenes, whatever the caption (what a regression that ignores the text reaches).

Slot 0 is predicted from the caption alone, so free = teacher = mean there when the caption is not read. Also
prints how much the slot-0 predictions vary across captions against how much the targets do.

    python docs/experiments/gen_regression.py MODEL_DIR DATA_DIR [SCENES]

MODEL_DIR: e.g. runs/quickstart/gen; DATA_DIR: its shapes dataset (runs/quickstart/data).
"""
# ruff: noqa
import json, random, sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.tasks import caption
from emu2.data.shapes.world import World
from emu2.pipelines.emu2 import Emu2Pipeline

path, data, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 64
pipe = Emu2Pipeline.from_pretrained(path)
model = pipe.model.eval()
manifest = json.loads((data / "dataset.json").read_text())
world, rng = World.from_seed(manifest.get("seed", 0)), random.Random(1234)
scenes = [world.group_scene(rng, "heldout") for _ in range(n)]
prompts = [caption(s, rng) for s in scenes]
renders = [render_scene(s, manifest.get("image_size", 64)) for s in scenes]
free, teacher, target = [], [], []
with torch.no_grad():
    for i in range(0, n, 16):
        batch_prompts, batch_renders = prompts[i:i + 16], renders[i:i + 16]
        free.append(pipe.regress_image_embeddings([[p] for p in batch_prompts]))
        batch = pipe.encode_interleaved([[p, r] for p, r in zip(batch_prompts, batch_renders)])
        features = model.encode_image(batch["images"])
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       images=batch["images"]).last_hidden_state
        rows, cols = (batch["input_ids"] == model.config.image_token_id).nonzero(as_tuple=True)
        teacher.append(model.project_down(hidden[rows, cols - 1]).view(features.shape))  # slot k from k-1
        target.append(features)
free, teacher, target = torch.cat(free), torch.cat(teacher), torch.cat(target)
mean = target.mean(0, keepdim=True).expand_as(target)
for name, guess in (("free", free), ("teacher", teacher), ("mean", mean)):
    per_slot = ((guess - target) ** 2).mean((0, 2))
    print(f"{name:8s} all {per_slot.mean():.3f}  slots " + " ".join(f"{x:.2f}" for x in per_slot.tolist()))
print(f"slot-0 spread across captions: predictions {free[:, 0].var(0).mean():.3f}, targets "
      f"{target[:, 0].var(0).mean():.3f}")
