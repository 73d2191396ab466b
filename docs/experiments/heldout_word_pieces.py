"""Which pieces the copy lessons cover: each held-out label word's pieces (shapes tokenizer) and how often each
occurs in 2,000 repeat documents of the `lm` split, with made-up words drawn as syllables only
(``piece_words=False``) and as the generator draws them (half of them from any tokenizer pieces).

    python docs/experiments/heldout_word_pieces.py
"""
# ruff: noqa
import collections, random

from emu2 import processing as P
from emu2.data.shapes.tasks import HELDOUT_LABEL_WORDS, ShapesMaker
from emu2.data.shapes.world import World

tokenizer = P.load_tokenizer(P.SHAPES_TOKENIZER, instruct=True)
for piece_words in (False, True):
    maker = ShapesMaker(World.from_seed(0), image_size=16, piece_words=piece_words)
    counts = collections.Counter()
    for seed in range(2000):
        record, meta = maker.make("text", random.Random(seed), "lm")
        if meta.get("task") == "repeat":
            counts.update(tokenizer.tokenize(record.text))
    print(f"piece_words={piece_words}: {len(counts)} distinct pieces in the repeat documents")
    for word in HELDOUT_LABEL_WORDS:
        print("  ", word, " ".join(f"{p}:{counts[p]}" for p in tokenizer.tokenize(word)))
