"""Copying made-up words against copying the held-out label words.

For each model directory: `emu2.eval.shapes.copy_accuracy` on 64 lists of fresh syllable words and on 64 lists
of the held-out split's label words (next-token accuracy on the repeat), and the share of held-out lists the
model repeats whole (50 lists of 4, every token after the first right).

    python docs/experiments/copying.py MODEL_DIR [MODEL_DIR ...]
"""
# ruff: noqa
import random, sys

import torch

torch.set_num_threads(2)
from emu2.data.shapes.tasks import HELDOUT_LABEL_WORDS
from emu2.eval.shapes import copy_accuracy
from emu2.pipelines.emu2 import Emu2Pipeline


def whole_lists(pipe, lists):
    whole = 0
    for first in lists:
        full = f"{first} {first}"
        batch = pipe.encode([full])
        with torch.no_grad():
            predicted = pipe.model(batch["input_ids"], batch["attention_mask"]).logits[0, :-1].argmax(-1)
        targets = batch["input_ids"][0, 1:]
        n = len(pipe.tokenizer(full)["input_ids"]) - len(pipe.tokenizer(first)["input_ids"])
        whole += int((predicted[-n:] == targets[-n:])[1:].all())
    return whole / len(lists)


rng = random.Random(5)
held = [" ".join(rng.sample(HELDOUT_LABEL_WORDS, 4)) + "." for _ in range(50)]
for model in sys.argv[1:]:
    pipe = Emu2Pipeline.from_pretrained(model)
    made_up, heldout = copy_accuracy(pipe), copy_accuracy(pipe, words="held-out")
    print(f"{model}: made-up {made_up['copy_accuracy']:.1%}, held-out words {heldout['copy_accuracy']:.1%}, "
          f"held-out lists of 4 repeated whole {whole_lists(pipe, held):.0%}", flush=True)
