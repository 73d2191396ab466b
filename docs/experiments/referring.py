"""Does the chat model find the object a question names? Referring questions on scenes of 2-3 objects, scored as
right, another object's answer, or neither.

    python docs/experiments/referring.py data SRC_DATA OUT_DATA COUNT GROUNDING_SHARE
    python docs/experiments/referring.py eval CHAT_DIR SPLIT [ITEMS]

`data` writes OUT_DATA: SRC_DATA (a quickstart's `data/`, linked) with `train/chat` replaced by COUNT referring
conversations of training scenes, a GROUNDING_SHARE of them "Where is the <description>? Give its box." (the
chat recipe's box answers) and the rest 1-2 short-answer questions about one named object ("What colour is the
star?", "Where is the star?", "Is the star small or large?", "What shape is the red object?" when the colour is
the object's alone). Train on it with `emu2 train CHAT_CONFIG data.root=OUT_DATA model.init_from=STAGE2 steps=N`.

`eval` asks ITEMS (default 200) of each on scenes of SPLIT (`heldout` or `train`): the box questions score a hit
at IoU >= 0.5 with the named object or with another one; the word questions count the named object's answer,
another object's answer, or neither. A model that sees the objects but does not bind the question to one of them
answers another object's value about as often as the named one's (1 or 2 others per scene).
"""
# ruff: noqa
import collections, json, os, random, sys
from pathlib import Path

import torch

torch.set_num_threads(2)
from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.records import encode_record
from emu2.data.shapes.render import render_scene
from emu2.data.shapes.tasks import ShapesMaker, written_box
from emu2.data.shapes.world import World, describe
from emu2.eval.metrics import box_iou
from emu2.eval.prompts import SHORT_ANSWER_INSTRUCTION

SHORT = "\n" + SHORT_ANSWER_INSTRUCTION


def box_question(scene, g):
    return f"{P.IMAGE_PLACEHOLDER}Where is the {describe(g, article='').strip()}? Give its box."


def word_questions(scene, g):
    """(question, answer, kind) about group g of the scene, and the other groups' answers to the same question."""
    qs = [(f"What colour is the {g.shape}?", "colour"), (f"Where is the {g.shape}?", "where"),
          (f"Is the {g.shape} small or large?", "size")]
    if [h.colour for h in scene.groups].count(g.colour) == 1:
        qs.append((f"What shape is the {g.colour} object?", "shape"))
    value = {"colour": lambda h: h.colour, "where": scene.position, "size": lambda h: h.size, "shape": lambda h: h.shape}
    return [(q, value[k](g), k, {value[k](h) for h in scene.groups if h is not g}) for q, k in qs]


def write_data(src: Path, dst: Path, count: int, grounding_share: float):
    import webdataset as wds

    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in ("train", "dataset.json") and not (dst / p.name).exists():
            os.symlink(p.resolve(), dst / p.name)
    (dst / "train").mkdir(exist_ok=True)
    for p in (src / "train").iterdir():
        if not p.name.startswith("chat-") and not (dst / "train" / p.name).exists():
            os.symlink(p.resolve(), dst / "train" / p.name)
    maker = ShapesMaker(World.from_seed(0), 64)
    with wds.ShardWriter(str(dst / "train" / "chat-%06d.tar"), maxcount=250, verbose=0) as writer:
        for i in range(count):
            rng = random.Random(f"referring:{i}")
            scene = maker.world.multi_scene(rng, "train", objects=rng.randint(2, 3))
            g = rng.choice(scene.groups)
            if rng.random() < grounding_share:
                messages = [box_question(scene, g), P.box_to_tokens(written_box(g.box), 1.0, 1.0)]
            else:
                messages = []
                for k, (q, a, _, _) in enumerate(rng.sample(word_questions(scene, g), rng.randint(1, 2))):
                    messages += [(P.IMAGE_PLACEHOLDER if k == 0 else "") + q + SHORT, a]
            record = K.Conversation(messages, [maker.render(scene)], system=P.SHORT_ANSWER_SYSTEM_MESSAGE)
            writer.write(encode_record(record, f"chat-{i:07d}", meta={"combos": []}))
        shards = writer.shard
    manifest = json.loads((src / "dataset.json").read_text())
    manifest["splits"]["train"]["chat"] = {"urls": f"train/chat-{{000000..{shards - 1:06d}}}.tar", "count": count}
    (dst / "dataset.json").write_text(json.dumps(manifest, indent=1))


def evaluate(model: str, split: str, items: int):
    from emu2.eval.shapes import _chat
    from emu2.pipelines.emu2 import Emu2Pipeline

    pipe = Emu2Pipeline.from_pretrained(model)
    world, rng = World.from_seed(0), random.Random(99)
    boxes, words = [], []
    for _ in range(items):
        scene = world.multi_scene(rng, split, objects=rng.randint(2, 3))
        g = rng.choice(scene.groups)
        image = render_scene(scene, 64)
        boxes.append((box_question(scene, g), image, g.box, [h.box for h in scene.groups if h is not g]))
        q, a, kind, others = rng.choice([w for w in word_questions(scene, g) if w[2] != "size"])
        words.append((P.IMAGE_PLACEHOLDER + q + SHORT, image, a, kind, others))
    out = collections.Counter()
    answers = _chat(pipe, [(q, [im], []) for q, im, _, _ in boxes], P.SHORT_ANSWER_SYSTEM_MESSAGE, 8)
    for answer, (_, _, target, others) in zip(answers, boxes):
        b = P.parse_box(answer)
        out["box " + ("unparsed" if b is None else "named object" if box_iou(b, target) >= 0.5 else
                      "another object" if any(box_iou(b, o) >= 0.5 for o in others) else "no object")] += 1
    answers = _chat(pipe, [(q, [im], []) for q, im, _, _, _ in words], P.SHORT_ANSWER_SYSTEM_MESSAGE, 8)
    for answer, (_, _, a, kind, others) in zip(answers, words):
        answer = answer.strip().rstrip(".").lower()
        out[f"{kind} " + ("named object" if answer == a else "another object" if answer in others else "neither")] += 1
    for key in sorted(out):
        print(f"{key:28s} {out[key]}")


if __name__ == "__main__":
    if sys.argv[1] == "data":
        write_data(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        evaluate(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 200)
