"""Token lengths of the LM stage's documents (the `lm` split's kinds: repeat, recall, text few-shot), against the
`shapes-lm` recipe's max_length, which cuts longer ones. `python docs/experiments/lm_document_lengths.py [N]`"""
# ruff: noqa
import collections, json, random, sys

from emu2 import processing as P
from emu2.data.shapes.tasks import ShapesMaker
from emu2.data.shapes.world import World
from emu2.train.config import load_config

limit = load_config("shapes-lm", []).data.max_length
tokenizer = P.load_tokenizer(P.SHAPES_TOKENIZER)
maker = ShapesMaker(World.from_seed(0), image_size=16, video_frames=2)  # text only: no image is drawn at this size
lengths = collections.defaultdict(list)
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 600):
    record, meta = maker.lm_text(random.Random(i))
    kind = meta["task"] if meta.get("task") in ("repeat", "recall") else "text few-shot"
    lengths[kind].append(len(tokenizer(((record.context or "") + " " + record.text).strip())["input_ids"]))
print(json.dumps({kind: {"documents": len(v), "median": sorted(v)[len(v) // 2], "p90": sorted(v)[int(len(v) * 0.9)],
                         "max": max(v), f"share_over_{limit}": round(sum(n > limit for n in v) / len(v), 2)}
                  for kind, v in lengths.items()}))
