"""What a base model's greedy few-shot answers are, on one held-out split: the gold answer, another support
example's answer (copied, but from the wrong example), or no support answer at all (not a copy); beside how often
the gold answer is among the shown examples and is the last of them (what copying the last answer would score).
With ``--syllable-words`` the held-out label words are first replaced, per episode, by fresh training-style
made-up words (`nonce_word`), which tells copying the held-out words' pieces apart from choosing the right
example (docs/training-notes.md, "What the few-shot answers are").

    python docs/experiments/fewshot_answer_kinds.py MODEL_DIR DATA_DIR [SPLIT] [--syllable-words] [--shots 1 2 4 8]

Prints one JSON line per shot count: percentages of the split's queries, and per label attribute (label splits).
"""
# ruff: noqa
import argparse, collections, json, random, re
from pathlib import Path

import torch
from PIL import Image

torch.set_num_threads(2)
from emu2.data.shapes import fewshot_prompt
from emu2.data.shapes.tasks import nonce_word
from emu2.eval.shapes import _normal, greedy_answers
from emu2.pipelines.emu2 import Emu2Pipeline

parser = argparse.ArgumentParser()
parser.add_argument("model"); parser.add_argument("data"); parser.add_argument("split", nargs="?", default="heldout_labels")
parser.add_argument("--syllable-words", action="store_true"); parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
args = parser.parse_args()
pipe = Emu2Pipeline.from_pretrained(args.model)
root = Path(args.data) / "eval"
episodes = [e for e in json.loads((root / "episodes.json").read_text())["episodes"] if e["split"] == args.split]
if args.syllable_words:
    rng = random.Random(0)
    for ep in episodes:
        swap = {w: nonce_word(rng) for w in ep["label_words"]}
        for example in ep["support"] + ep["queries"]:
            for old, new in swap.items():
                example["answer"] = re.sub(rf"\b{old}\b", new, example["answer"])
for k in args.shots:
    rows = []
    for ep in episodes:
        for q in range(len(ep["queries"])):
            text, images, answer = fewshot_prompt(ep, k, q)
            rows.append((text, [Image.open(root / im).convert("RGB") for im in images], answer,
                         [_normal(s["answer"]) for s in ep["support"][:k]], ep["format"].split("|")[0]))
    counts = collections.Counter()
    for start in range(0, len(rows), 32):
        chunk = rows[start:start + 32]
        batch = pipe.encode([r[0] for r in chunk], [im for r in chunk for im in r[1]])
        for (_, _, answer, support, kind), text in zip(chunk, greedy_answers(pipe, batch)):
            got, gold = _normal(text), _normal(answer)
            verdict = "gold" if got == gold else "another example's answer" if got in support else "not a copy"
            counts[verdict] += 1
            counts[f"{kind}: {verdict}"] += 1
            counts[f"{kind}: queries"] += 1
            counts["gold among the examples"] += gold in support
            counts["gold is the last example's"] += gold == support[-1]
    print(json.dumps({"split": args.split, "shots": k, "queries": len(rows),
                      **{key: round(100 * v / len(rows), 1) for key, v in sorted(counts.items())}}), flush=True)
