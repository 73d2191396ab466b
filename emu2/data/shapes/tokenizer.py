"""The shapes world's tokenizer: LLaMA's tokenizer design with a vocabulary sized for the shapes world.

The LLaMA vocabulary has 32,000 pieces; the shapes world writes a few hundred words. With it, the `shapes`
preset's embedding and output layers (2 x 256 x 32,274 weights) were 3/4 of its parameters, and the output
layer most of each step's compute. This tokenizer keeps everything about LLaMA's design
(SentencePiece-style BPE over "▁"-marked words; byte fallback, so any text encodes, a newline being the byte
piece <0x0A> as in LLaMA; ``<unk>``/``<s>``/``</s>`` as ids 0-2; a prepended ``<s>``) and learns 1,024 pieces
from what the shapes model trains on. Emu2's special tokens are added after them in the official order by
`emu2.processing.load_tokenizer`, exactly as they are after LLaMA's.

The pieces are learned from the training splits only (``train`` and ``lm``): the held-out label words
("florp", ...) are never pieces of their own, so the model reads them as pieces it has been trained on.

The packaged copy (``emu2/assets/shapes_tokenizer``) is what `train_shapes_tokenizer()` returns;
``python -m emu2.data.shapes.tokenizer --out DIR`` rebuilds it (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import string
from collections.abc import Iterator

from emu2 import processing as P
from emu2.config import SHAPES_PIECES
from emu2.data.kinds import KINDS

VOCAB_SIZE = SHAPES_PIECES  # 1,024 pieces, counting <unk>, <s>, </s> and the 256 byte-fallback pieces
SPECIALS = ("<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)))  # LLaMA's ids 0..258
SAMPLES_PER_KIND = 400
NOT_TEXT = tuple(sorted({*P.SPECIAL_TOKENS, *P.INSTRUCT_TOKENS, P.IMAGE_PLACEHOLDER, P.VIDEO_PLACEHOLDER},
                         key=len, reverse=True))


def record_strings(value) -> Iterator[str]:
    """Every string inside a record (its dataclass fields, lists and tuples, depth first)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from record_strings(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from record_strings(getattr(value, f.name))


def shapes_corpus(seed: int = 0, samples_per_kind: int = SAMPLES_PER_KIND) -> Iterator[str]:
    """Every text field of ``samples_per_kind`` records of each training kind, and of as many ``lm`` documents,
    with Emu2's special tokens and placeholders removed (they are added tokens, never split into pieces)."""
    from emu2.data.shapes.tasks import ShapesMaker
    from emu2.data.shapes.world import World

    # images are drawn, not read; made-up words are syllables only (piece words come from this tokenizer)
    maker = ShapesMaker(World.from_seed(seed), image_size=16, video_frames=2, piece_words=False)
    jobs = [("train", kind) for kind in KINDS] + [("lm", "text")]
    yield from (P.CHAT_SYSTEM_MESSAGE, P.SHORT_ANSWER_SYSTEM_MESSAGE)
    for split, kind in jobs:
        for index in range(samples_per_kind):
            record, _ = maker.make(kind, random.Random(f"tokenizer:{seed}:{split}:{kind}:{index}"), split)
            for text in record_strings(record):
                for token in NOT_TEXT:
                    text = text.replace(token, " ")
                if text.strip():
                    yield text


def train_shapes_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0,
                           samples_per_kind: int = SAMPLES_PER_KIND):
    """-> a `transformers.LlamaTokenizer` (without Emu2's special tokens) whose BPE pieces are learned from
    `shapes_corpus`. Deterministic: the same arguments give the same vocabulary and merges."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    # Pieces never cross a word boundary or join letters to punctuation (as SentencePiece's split_by_whitespace
    # and split_by_unicode_script): "dax." is "dax" then ".", so a copied word is the same pieces everywhere.
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation("isolated"),
    ])
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    learner.train_from_iterator(shapes_corpus(seed, samples_per_kind), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    return LlamaTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]], legacy=True,
                          add_bos_token=True, add_eos_token=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emu2.data.shapes.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(P.SHAPES_TOKENIZER), help="output directory (default: the packaged copy)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="shapes world seed the corpus is drawn from")
    args = parser.parse_args(argv)
    tokenizer = train_shapes_tokenizer(args.vocab_size, args.seed)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({len(tokenizer)} pieces)")


if __name__ == "__main__":
    main()
