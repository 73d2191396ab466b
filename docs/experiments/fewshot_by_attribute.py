"""Few-shot exact match on the held-out label-word split by the attribute the label words name (shape, colour,
count, size): does in-context binding work where the language model reads the attribute from the image? Greedy
answers of the base model on the quickstart's evaluation episodes (the episodes and prompts the report's few-shot
table uses; exact match after the same normalisation).

    python docs/experiments/fewshot_by_attribute.py MODEL_DIR DATA_DIR SHOTS

MODEL_DIR: e.g. runs/quickstart/stage2; DATA_DIR: runs/quickstart/data. Prints correct/asked and the 95 % Wilson
interval per attribute, and the first answers beside the gold ones.
"""
# ruff: noqa
import collections, json, sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from PIL import Image

import emu2.eval.shapes as S
from emu2.data.shapes import fewshot_prompt
from emu2.eval.intervals import wilson_interval
from emu2.pipelines.emu2 import Emu2Pipeline

pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
root, shots = Path(sys.argv[2]) / "eval", int(sys.argv[3])
episodes = [e for e in json.loads((root / "episodes.json").read_text())["episodes"] if e["split"] == "heldout_labels"]
rows = []
for episode in episodes:
    for query in range(len(episode["queries"])):
        text, images, answer = fewshot_prompt(episode, shots, query)
        rows.append((episode["format"].split("|")[0].removeprefix("labels:"), text,
                     [Image.open(root / im).convert("RGB") for im in images], answer))
right, shown = collections.defaultdict(list), collections.defaultdict(list)
for i in range(0, len(rows), 8):
    chunk = rows[i:i + 8]
    batch = pipe.encode([r[1] for r in chunk], [im for r in chunk for im in r[2]])
    ids = pipe.model.generate_text(**batch, max_new_tokens=24, do_sample=False, stop_strings=list(S.ANSWER_STOPS),
                                   tokenizer=pipe.tokenizer)
    for r, t in zip(chunk, pipe.tokenizer.batch_decode(ids, skip_special_tokens=False)):
        right[r[0]].append(S._normal(S._cut_answer(t)) == S._normal(r[3]))
        shown[r[0]].append(f"{r[3]!r} -> {S._cut_answer(t)!r}")
for attribute, hits in sorted(right.items()):
    low, high = wilson_interval(sum(hits), len(hits))
    print(f"{attribute}: {sum(hits)}/{len(hits)} = {100 * sum(hits) / len(hits):.1f} % [{100 * low:.1f}, {100 * high:.1f}]")
    print("  gold -> answer, first 8 queries:", "; ".join(shown[attribute][:8]))
