"""Does the language model find, in its context, the object a question names? Lookup documents in the LM corpus
(`ShapesMaker.lookup_document`: a scene of 2-4 objects told in words, then questions naming one object by one
attribute and asking another), and a text-only score of the lookup.

    python docs/experiments/lookup.py data SRC_DATA OUT_DATA SHARE [unscored-questions]   # lm and lm_long splits
    python docs/experiments/lookup.py eval MODEL [ITEMS [SPLIT]]       # a base model (LM stage, stage 1 or 2)

`data` writes OUT_DATA: SRC_DATA (a quickstart's `data/`) with its `lm` and `lm_long` splits rewritten at the
same counts and seed, a SHARE of their documents lookup documents, taken from the repeat documents' share (SHARE 1:
lookup documents only; `unscored-questions`: the loss scores their answers only). Then
train the LM stages on it (`emu2 train shapes-lm data.root=OUT_DATA ...`).

`eval` asks ITEMS (default 200) questions, one per scene of 2-3 objects of SPLIT (default `heldout`: the held-out
combinations; or `train`), the scene
told as the lookup documents tell it, and counts answers that are the named object's value, another object's
value (the answer a model gives when it reads the scene but not which object the question names), or neither.
"""
# ruff: noqa
import collections, json, os, random, sys
from pathlib import Path

import torch

torch.set_num_threads(2)
import emu2.data.shapes.tasks as T
from emu2.data.shapes.world import World
from emu2.data.shapes import write as W


def write_data(src: Path, dst: Path, share: float):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in ("lm", "lm_long", "dataset.json") and not (dst / p.name).exists():
            os.symlink(p.resolve(), dst / p.name)
    manifest = json.loads((src / "dataset.json").read_text())
    if share >= 1:  # nothing but lookup documents
        T.LM_CORPUS = {"lookup": 1.0}
    else:
        T.LM_CORPUS = {**T.LM_CORPUS, "repeat": T.LM_CORPUS["repeat"] - share, "lookup": share}
    for split in ("lm", "lm_long"):
        count = manifest["splits"][split]["text"]["count"]
        manifest["splits"][split]["text"] = W._write_kind(str(dst), manifest["seed"], split, "text", count,
                                                          manifest["image_size"], 250)
    (dst / "dataset.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def evaluate(model: str, items: int, split: str = "heldout"):
    from emu2.eval.shapes import _normal, greedy_answers
    from emu2.pipelines.emu2 import Emu2Pipeline

    pipe = Emu2Pipeline.from_pretrained(model)
    world, rng = World.from_seed(0), random.Random(7)
    asked = []  # (prompt, answer, the other objects' answers to the same question, question kind)
    for _ in range(items):
        scene = world.multi_scene(rng, split, objects=rng.randint(2, 3))
        groups = rng.sample(scene.groups, len(scene.groups))
        told = T.tell_scene(scene, groups)
        g = rng.choice(groups)
        question, answer, attribute = T.referring_question(scene, g, rng)
        others = {T.REFERRED_ATTRIBUTES[attribute](scene, h) for h in groups if h is not g} - {answer}
        asked.append((f"{told} {question}", answer, others, " ".join(question.split()[:2])))
    out = collections.Counter()
    for start in range(0, items, 32):
        chunk = asked[start:start + 32]
        for said, (_, answer, others, kind) in zip(greedy_answers(pipe, pipe.encode([c[0] for c in chunk]), 8), chunk):
            said = _normal(said)
            verdict = ("named object" if said == _normal(answer) else
                       "another object" if said in {_normal(o) for o in others} else "neither")
            out[f"{kind}: {verdict}"] += 1
            out[f"all: {verdict}"] += 1
    for key in sorted(out):
        print(f"{key:36s} {out[key]}")


if __name__ == "__main__":
    if sys.argv[1] == "data":
        T.LOOKUP_SCORES_QUESTIONS = "unscored-questions" not in sys.argv[5:]
        write_data(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]))
    else:
        evaluate(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200, *sys.argv[4:5])
