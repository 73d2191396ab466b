"""Few-shot in text alone: the held-out splits' tasks with every image replaced by its scene description, as the
LM stage's text few-shot documents write them ("three small red stars in the top left on white: that is dax.").
Perception is then perfect, so what is left is the language model's own in-context learning.

    python docs/experiments/text_fewshot.py MODEL_DIR [EPISODES_PER_SPLIT]

Prints exact match % [95 % Wilson interval] per split and shot count (one query per episode, 9 examples drawn
per episode, the first k shown). MODEL_DIR: e.g. runs/quickstart/lm or runs/quickstart/stage2.
"""
# ruff: noqa
import collections, json, random, sys

import torch

torch.set_num_threads(2)
from emu2.data.shapes.tasks import example_text, sample_task
from emu2.data.shapes.world import World, describe
from emu2.eval.intervals import with_interval
from emu2.eval.shapes import _normal, greedy_answers
from emu2.pipelines.emu2 import Emu2Pipeline

pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 40
world, rng = World.from_seed(0), random.Random(7)


def line(scene, prompt, answer=None):
    g = scene.groups[0]
    described = f"{describe(g)} in the {scene.position(g)} on {scene.background}:"
    return f"{described} {example_text(prompt, answer)}" if answer is not None else f"{described} {prompt}".rstrip()


prompts = []
for split in ("heldout_combos", "heldout_formats", "heldout_labels"):
    for _ in range(episodes):
        task = sample_task(world, rng, split)
        examples = [task.example(world, rng) for _ in range(9)]
        query = examples[8]
        for k in (0, 1, 2, 4, 8):
            context = " ".join(line(*e) for e in examples[:k])
            prompts.append((split, k, (context + " " if context else "") + line(query[0], query[1]), query[2]))
hits = collections.defaultdict(list)
for start in range(0, len(prompts), 64):
    chunk = prompts[start:start + 64]
    batch = pipe.encode([c[2] for c in chunk])
    for (split, k, _, answer), text in zip(chunk, greedy_answers(pipe, batch)):
        for key in (split, "all"):
            hits[(key, k)].append(float(_normal(text) == _normal(answer)))
table = collections.defaultdict(dict)
for (split, k), h in hits.items():
    cell = with_interval(h)
    table[split][k] = f"{100 * cell['value']:.1f} [{100 * cell['ci95'][0]:.1f}, {100 * cell['ci95'][1]:.1f}] (n={len(h)})"
print(json.dumps(table))
