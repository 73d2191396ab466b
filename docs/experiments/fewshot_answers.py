"""Greedy few-shot answers of a base model on the first episodes of each held-out split, beside the gold answer
(docs/quickstart-results.md, "What bounds it"). `python docs/experiments/fewshot_answers.py MODEL_DIR DATA_DIR SHOTS`"""
# ruff: noqa
import json, sys
from pathlib import Path
from PIL import Image
import emu2.eval.shapes as S
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.data.shapes import fewshot_prompt
pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
root = Path(sys.argv[2]) / "eval"
eps = json.loads((root/"episodes.json").read_text())["episodes"]
k = int(sys.argv[3])
for split in ("heldout_labels", "heldout_combos", "heldout_formats"):
    chosen = [e for e in eps if e["split"] == split][:6]
    rows = []
    for ep in chosen:
        text, images, answer = fewshot_prompt(ep, k, 0)
        rows.append((text, [Image.open(root/im).convert("RGB") for im in images], answer, ep["format"]))
    batch = pipe.encode([r[0] for r in rows], [im for r in rows for im in r[1]])
    for r, t in zip(rows, S.greedy_answers(pipe, batch)):
        print(split, "| fmt", r[3][:50], "| gold", repr(r[2]), "| got", repr(t), "| ctx", repr(r[0][-120:].replace("<image>","I")))
