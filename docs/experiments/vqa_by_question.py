"""Chat VQA exact match per question type on held-out scenes, asked as `emu2.eval.shapes.evaluate_instructions`
asks its VQA items (same questions, prompt and short-answer system message; not the same scenes), with a few
answers printed.

    python docs/experiments/vqa_by_question.py CHAT_DIR DATA_DIR [ITEMS]

Prints correct/asked per question (count, colour, shape, position, background, size) and the total with its
95 % Wilson interval. CHAT_DIR: e.g. runs/quickstart/chat; DATA_DIR: runs/quickstart/data.
"""
# ruff: noqa
import collections, json, random, sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from emu2 import processing as P
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.tasks import VQA_QUESTIONS, attribute_value
from emu2.data.shapes.world import World
from emu2.eval.intervals import wilson_interval
from emu2.eval.shapes import _chat, _cut_answer, _normal
from emu2.pipelines.emu2 import Emu2Pipeline

model, data = sys.argv[1], Path(sys.argv[2])
items = int(sys.argv[3]) if len(sys.argv) > 3 else 96
pipe = Emu2Pipeline.from_pretrained(model)
manifest = json.loads((data / "dataset.json").read_text())
world, size = World.from_seed(manifest.get("seed", 0)), manifest.get("image_size", 64)
rng = random.Random(1234)
asked = []
for _ in range(items):
    scene = world.group_scene(rng, "heldout")
    question = rng.choice(sorted(VQA_QUESTIONS))
    text = VQA_QUESTIONS[question][0].upper() + VQA_QUESTIONS[question][1:]
    asked.append((question, f"{P.IMAGE_PLACEHOLDER}{text}\nAnswer the question using a single word or phrase.",
                  render_scene(scene, size), attribute_value(scene, question)))
answers = _chat(pipe, [(m, [im], []) for _, m, im, _ in asked], P.SHORT_ANSWER_SYSTEM_MESSAGE, 8)
right = collections.defaultdict(list)
for (question, _, _, gold), answer in zip(asked, answers):
    right[question].append(_normal(_cut_answer(answer)) == _normal(gold))
for question, hits in sorted(right.items()):
    print(f"{question}: {sum(hits)}/{len(hits)}")
total = sum(sum(h) for h in right.values())
low, high = wilson_interval(total, items)
print(f"all: {total}/{items} = {100 * total / items:.1f} % [{100 * low:.1f}, {100 * high:.1f}]")
for (question, _, _, gold), answer in list(zip(asked, answers))[:8]:
    print(f"  {question}: gold {gold!r}, answer {answer!r}")
