"""Copying by distance: a list of 6-10 made-up words and its repeat, with scene sentences before the list (how
far into the row it sits) or between the list and its repeat (how far back the copy reaches).

    python docs/experiments/copy_distance.py MODEL_DIR

Prints next-token accuracy on the repeat (after its first token; 64 lists per row of the table) and the mean
sequence length in tokens. An 8-shot few-shot prompt puts a query about ten scene sentences after an example.
"""
# ruff: noqa
import random, sys

import torch

torch.set_num_threads(2)
from emu2.data.shapes.tasks import ShapesMaker, nonce_word
from emu2.data.shapes.world import World
from emu2.pipelines.emu2 import Emu2Pipeline

pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
pipe.model.eval()
sentences = ShapesMaker(World.from_seed(0)).scene_sentences


def run(before, between, n=64):
    rng = random.Random(5)
    hits = total = 0
    lengths = []
    for _ in range(n):
        first = " ".join(nonce_word(rng) for _ in range(rng.randint(6, 10))) + "."
        head = " ".join(x for x in (sentences(rng, before), first, sentences(rng, between)) if x)
        ids = pipe.tokenizer(f"{head} {first}")["input_ids"]
        start = len(pipe.tokenizer(head)["input_ids"])
        x = torch.tensor([ids])
        with torch.no_grad():
            predicted = pipe.model(x, torch.ones_like(x)).logits[0, :-1].argmax(-1)
        scored = slice(start, len(ids) - 1)  # the predictions of the repeat's tokens after its first
        hits += int((predicted[scored] == x[0, 1:][scored]).sum())
        total += len(ids) - 1 - start
        lengths.append(len(ids))
    return hits / total, sum(lengths) / len(lengths)


for before, between in [(0, 0), (2, 0), (5, 0), (10, 0), (0, 2), (0, 5), (0, 10)]:
    accuracy, length = run(before, between)
    print(f"{before:2d} sentences before, {between:2d} between: copy {100 * accuracy:5.1f} %, mean length {length:.0f}")
