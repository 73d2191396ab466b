"""Every sample kind made from shapes-world scenes, and the hidden in-context tasks with their held-out splits.

In-context documents (kind `interleaved`) follow one hidden task each, shown only through their examples
(image, then answer), as in the paper's Figure 1:
  * ``attributes``: an attribute tuple in a per-document format, e.g. "[red, white, 3, bottom left]" (the
    official README's) or "(shape: star; count: two)": attribute subset, order, brackets, delimiter, number
    style and keys all vary;
  * ``labels``: arbitrary words for attribute values defined only by the examples ("circle -> dax");
  * ``vqa``: short question/answer pairs in a per-document prompt style.
Held-out splits (`SPLITS`): scenes of held-out (shape, colour) combinations, attribute formats never used in
training, and label words never used in training. The ``lm`` split is the language-only corpus of the language
model's pre-training stand-in (kind `text` only, mostly documents that teach copying).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field, replace

from PIL import Image

from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.shapes.render import render_object, render_scene
from emu2.data.shapes.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Group,
    Scene,
    World,
    changed,
    describe,
    moved,
    plural,
)

SPLITS = ("train", "val", "heldout_combos", "heldout_formats", "heldout_labels", "lm", "lm_long")
ATTRIBUTES = ("colour", "background", "count", "position", "shape", "size")
BRACKETS = {"square": ("[", "]"), "round": ("(", ")"), "curly": ("{", "}"), "none": ("", "")}
SEPARATORS = {"comma": ", ", "semicolon": "; ", "bar": " | ", "slash": " / "}
HELDOUT_FORMAT_FRACTION = 0.1
LABEL_WORDS = ("dax", "wug", "blicket", "fep", "toma", "zup", "kiki", "bouba", "gazzer", "lorp", "tulver", "zorb",
               "fendle", "quip", "rask", "vorn", "yelt", "snib", "glorp", "drell", "jirn", "pilk", "moxo", "trud")
HELDOUT_LABEL_WORDS = ("florp", "tazzle", "woog", "prell", "zindle", "krum", "sploo", "bimble")
# Training documents mostly use fresh nonce words (consonant-vowel syllables), so the only way to predict a
# label is to copy it from the document's own examples (an induction task), never to recall a memorised word.
NONCE_WORD_PROB = 0.75
# Whether the answers nothing before them predicts are read without being scored (`unpredictable_examples`), and
# the share of made-up words drawn from any pieces of the tokenizer rather than syllables (`piece_word`). Measured
# on the quickstart's chain at equal steps (docs/training-notes.md, "Copying the held-out label words"): unscored,
# few-shot exact match at 1 shot went from 6.7 to 12.2 %, chat VQA and text-to-image held or rose; piece words
# made the held-out label words likelier but cost chat VQA (31 against 58 %) and text-to-image, so they stay off.
UNSCORED_UNPREDICTABLE = True
PIECE_WORD_PROB = 0.0
# ... except in the `lm_long` split, whose 300 LM steps come after the copying is learnt and before any image: half
# its made-up words are any pieces, so the copy lessons cover the pieces the held-out words are made of. Measured
# from the same 1,200-step LM to stage 2 at the 5bf23ac quickstart's steps: few-shot all splits 0/1/2/4/8 shots
# 0.3 / 11.2 / 8.0 / 9.8 / 9.2 % with syllables only, 1.0 / 15.5 / 14.2 / 11.7 / 12.7 % with this share
# (docs/training-notes.md, "Copying across a few-shot prompt").
LM_LONG_PIECE_WORD_PROB = 0.5
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "dr", "gl", "kr", "sn", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai")
_CODAS = ("", "n", "m", "p", "k", "x", "sh", "rb", "g", "ll")
LABEL_TEMPLATES = ("{w}", "a {w}", "this is a {w}", "it is called {w}", "that is {w}")
LABEL_ATTRIBUTES = ("shape", "colour", "count", "size")
VQA_QUESTIONS = {
    "count": "how many shapes are there?", "colour": "what colour are the shapes?",
    "shape": "what shape are they?", "position": "where are the shapes?",
    "background": "what colour is the background?", "size": "are the shapes small or large?",
}
VQA_STYLES = ("Q: {q} A:", "Question: {q} Answer:", "based on the picture, {q} short answer:")
EXAMPLE_SEPARATOR = "."
# Share of a few-shot training document's examples (after its first) that repeat an earlier example of the same
# document exactly, image and answer: Bratulic et al. 2025 (arXiv 2501.06256) found such repetitions decide
# whether in-context learning emerges. 0: none (measured: docs/training-notes.md, "What the few-shot documents are
# made of").
EXACT_REPEAT_PROB = 0.0
TEXT_FEWSHOT_PROB = 0.4  # share of language-only documents (kind `text`) that are in-context task documents
TEXT_RECALL_PROB = 0.2  # ... that are word-recall documents (made-up words bound to values, then queried)
TEXT_REPEAT_PROB = 0.25  # ... and that are repeat documents (a list of made-up words, then the same list again)
# The `lm` split (the LM stage's corpus): the documents that teach copying, which a random LM learns late (a phase
# change) and only when most of what it reads rewards it. Shares of repeat, recall and text-only task documents,
# and of lookup documents (`lookup_document`; 0: they teach binding in words only once copying is learnt, in more
# steps than the LM's share of a 20-minute run, and that binding did not carry over to few-shot or referring
# questions about images; training notes, "Finding the named object in words: the questions must not be scored"
# and "Binding in words does not carry to the few-shot prompt"):
LM_CORPUS = {"repeat": 0.7, "recall": 0.2, "fewshot": 0.1, "lookup": 0.0}
# Whether the loss scores a lookup document's questions (which object is asked is a draw) or only the answers.
LOOKUP_SCORES_QUESTIONS = True
# The `lm_long` split: the same documents, with up to this many scene sentences between a list (or the bindings)
# and what repeats it. The LM stage's 64-token rows teach copying across a few tokens only: the quickstart's LM
# copied a list 92.8 % right straight after it but 18.7 % after ten sentences (about 110 tokens), the distance
# from an 8-shot query back to its example (docs/training-notes.md, "Copying across a few-shot prompt").
LM_LONG_GAP = 8
REPEAT_INTROS = ("", "again: ", "once more: ", "repeat: ")
# Boxes the model writes (grounded captions, box answers) are rounded to 1/16 of the image (4 px at 64 px; every
# 14th of the 224 coordinate bins). A coordinate token is a class of its own to the model, with nothing telling
# bin 100 from bin 101; the few hundred box examples of a CPU-budget run cannot fill 225 classes per coordinate,
# and the model's probability spread over them was lower than `</object>`'s, so it wrote empty boxes. Rounding
# costs an 11-px object at most 2 px a side. Evaluation scores against the exact boxes.
BOX_STEPS = 16
SHAPE_FACTS = {"triangle": "three corners", "square": "four corners", "pentagon": "five corners",
               "hexagon": "six corners", "diamond": "four corners", "star": "five points", "cross": "four arms",
               "circle": "no corners"}


# ------------------------------------------------------------------------------------------ answer formats
def attribute_value(scene: Scene, attribute: str, numbers: str = "digit") -> str:
    g = scene.groups[0]
    if attribute == "count":
        return str(g.count) if numbers == "digit" else NUMBER_WORDS[g.count]
    if attribute == "position":
        return scene.position(g)
    if attribute == "background":
        return scene.background
    return getattr(g, attribute)


@dataclass(frozen=True)
class AttributeFormat:
    """How an attribute tuple is written: which attributes in which order, brackets, delimiter, numbers, keys."""

    attributes: tuple[str, ...]
    brackets: str = "square"  # a key of BRACKETS
    separator: str = "comma"  # a key of SEPARATORS
    numbers: str = "digit"  # or "word"
    keyed: bool = False  # "colour: red" instead of "red"

    @property
    def id(self) -> str:
        """e.g. "attributes:colour,background,count,position/square/comma/digit/plain"."""
        return (f"attributes:{','.join(self.attributes)}/{self.brackets}/{self.separator}/{self.numbers}/"
                f"{'keyed' if self.keyed else 'plain'}")

    @classmethod
    def from_id(cls, format_id: str) -> AttributeFormat:
        attributes, brackets, separator, numbers, keyed = format_id.removeprefix("attributes:").split("/")
        return cls(tuple(attributes.split(",")), brackets, separator, numbers, keyed == "keyed")

    def render(self, scene: Scene) -> str:
        values = [attribute_value(scene, a, self.numbers) for a in self.attributes]
        items = [f"{a}: {v}" for a, v in zip(self.attributes, values)] if self.keyed else values
        opening, closing = BRACKETS[self.brackets]
        return opening + SEPARATORS[self.separator].join(items) + closing


README_FORMAT = AttributeFormat(("colour", "background", "count", "position"))  # official README example


def is_heldout_format(fmt: AttributeFormat, seed: int) -> bool:
    if fmt == README_FORMAT:
        return False
    return random.Random(f"{seed}:format:{fmt.id}").random() < HELDOUT_FORMAT_FRACTION


def sample_attribute_format(rng: random.Random, seed: int, heldout: bool) -> AttributeFormat:
    while True:
        fmt = AttributeFormat(tuple(rng.sample(ATTRIBUTES, rng.randint(2, 4))), rng.choice(sorted(BRACKETS)),
                              rng.choice(sorted(SEPARATORS)), rng.choice(("digit", "word")), rng.random() < 0.25)
        if rng.random() < 0.05:
            fmt = README_FORMAT
        if is_heldout_format(fmt, seed) == heldout:
            return fmt


def example_text(prompt: str, answer: str) -> str:
    """The text after an example's image: prompt, answer, separator (same in training documents and eval)."""
    return (prompt + " " if prompt else "") + answer + EXAMPLE_SEPARATOR


@dataclass
class Task:
    """A hidden in-context task: produces (scene, prompt, answer) examples."""

    name: str
    format: str
    scene_split: str  # "train" or "heldout" scenes
    attribute_format: AttributeFormat | None = None
    label_attribute: str = ""
    label_map: dict = field(default_factory=dict)  # attribute value -> label word
    label_template: str = "{w}"
    vqa_style: str = ""

    def example(self, world: World, rng: random.Random) -> tuple[Scene, str, str]:
        if self.name == "attributes":
            scene = world.group_scene(rng, self.scene_split)
            return scene, "", self.attribute_format.render(scene)
        if self.name == "labels":
            value = rng.choice(sorted(self.label_map, key=str))
            scene = world.group_scene(rng, self.scene_split, **{self.label_attribute: value})
            return scene, "", self.label_template.format(w=self.label_map[value])
        scene = world.group_scene(rng, self.scene_split)
        question = rng.choice(sorted(VQA_QUESTIONS))
        return scene, self.vqa_style.format(q=VQA_QUESTIONS[question]), attribute_value(scene, question)


def _label_values(world: World, attribute: str, scene_split: str) -> list:
    if attribute == "shape":
        return sorted({s for s, _ in world.heldout_combos}) if scene_split == "heldout" else list(SHAPES)
    if attribute == "colour":
        return sorted({c for _, c in world.heldout_combos}) if scene_split == "heldout" else list(COLOURS)
    if attribute == "count":
        return list(NUMBER_WORDS)
    return list(SIZES)


def nonce_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 1-2 syllables, never one of the held-out label words."""
    while True:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2))]
        word = "".join(syllables) + rng.choice(_CODAS)
        if not any(h in word for h in HELDOUT_LABEL_WORDS) and word not in LABEL_WORDS:
            return word


@functools.cache
def tokenizer_pieces() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(word-initial, word-internal) all-letter pieces of the packaged shapes tokenizer's vocabulary."""
    vocab = json.loads((P.SHAPES_TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"]
    letters = [piece.removeprefix("\u2581") for piece in vocab]
    initial = sorted(w for p, w in zip(vocab, letters) if p.startswith("\u2581") and w.isalpha() and w.islower())
    inner = sorted(p for p in vocab if p.isalpha() and p.islower())
    return tuple(initial), tuple(inner)


def piece_word(rng: random.Random) -> str:
    """A made-up word of 2-3 pieces drawn uniformly from the tokenizer's vocabulary, never a held-out label word.

    The syllables of `nonce_word` use a third of the 1,024 pieces. An LM stage taught to copy only those copied
    78 % of the repeat of made-up lists but 70 % of lists of the held-out words ("orp" of "florp" was never copied
    in training), 2 % of them whole; with these words too, 79 % and 93 %, half of them whole
    (docs/training-notes.md, "Copying the held-out label words")."""
    initial, inner = tokenizer_pieces()
    while True:
        word = rng.choice(initial) + "".join(rng.choice(inner) for _ in range(rng.randint(1, 2)))
        if not any(h in word for h in HELDOUT_LABEL_WORDS) and word not in LABEL_WORDS:
            return word


def made_up_word(rng: random.Random, pieces: bool, share: float | None = None) -> str:
    """A fresh word for a training document: syllables (`nonce_word`), or with ``pieces`` a ``share`` of the time
    (default `PIECE_WORD_PROB`) any pieces of the tokenizer (`piece_word`)."""
    share = PIECE_WORD_PROB if share is None else share
    return piece_word(rng) if pieces and share and rng.random() < share else nonce_word(rng)


def training_label_words(rng: random.Random, n: int, pieces: bool = True, share: float | None = None) -> list[str]:
    """``n`` distinct label words for a training document: fresh made-up words (`made_up_word`), or the fixed
    training list."""
    if rng.random() >= NONCE_WORD_PROB:
        return rng.sample(LABEL_WORDS, n)
    words: list[str] = []
    while len(words) < n:
        if (word := made_up_word(rng, pieces, share)) not in words:
            words.append(word)
    return words


def sample_task(world: World, rng: random.Random, split: str, pieces: bool = True,
                share: float | None = None) -> Task:
    """A task for a document of ``split``: training tasks for train/val/heldout_combos (held-out scenes for the
    latter), held-out formats for heldout_formats, held-out label words for heldout_labels. ``pieces``: made-up
    label words may be any pieces of the tokenizer, a ``share`` of the time (`made_up_word`)."""
    scene_split = "heldout" if split == "heldout_combos" else "train"
    if split == "heldout_formats":
        name = "attributes"
    elif split == "heldout_labels":
        name = "labels"
    else:
        name = rng.choices(("attributes", "labels", "vqa"), weights=(0.4, 0.4, 0.2))[0]
    if name == "attributes":
        fmt = sample_attribute_format(rng, world.seed, heldout=split == "heldout_formats")
        return Task(name, fmt.id, scene_split, attribute_format=fmt)
    if name == "labels":
        attribute = rng.choice(LABEL_ATTRIBUTES)
        options = _label_values(world, attribute, scene_split)
        values = rng.sample(options, min(len(options), rng.randint(2, 3)))
        words = (rng.sample(HELDOUT_LABEL_WORDS, len(values)) if split == "heldout_labels"
                 else training_label_words(rng, len(values), pieces, share))
        template = rng.choice(LABEL_TEMPLATES)
        # the label vocabulary is part of the answer format: held-out words make a format unseen in training
        return Task(name, f"labels:{attribute}|{template}|{','.join(sorted(words))}", scene_split,
                    label_attribute=attribute,
                    label_map=dict(zip(values, words)), label_template=template)
    style = rng.choice(VQA_STYLES)
    return Task(name, f"vqa:{style}", scene_split, vqa_style=style)


def unpredictable_examples(task: Task, answers: list[str]) -> tuple[int, ...]:
    """Indices of a task document's examples whose answer nothing before it in the document predicts: the first
    example of an attribute format (the format is shown there first) and the first use of each label word. The
    loss reads them, not scores them: scored, they teach the model to invent a made-up word or a format where it
    should copy one from its context, and a new word the model invented is what it wrote instead of the
    held-out label words (docs/training-notes.md, "Copying the held-out label words"). None when
    `UNSCORED_UNPREDICTABLE` is off."""
    if not UNSCORED_UNPREDICTABLE:
        return ()
    if task.name == "attributes":
        return (0,) if answers else ()
    if task.name != "labels":
        return ()
    seen, first = set(), []
    for k, answer in enumerate(answers):
        if answer not in seen:
            seen.add(answer)
            first.append(k)
    return tuple(first)


def written_box(box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """A box as the training data writes it: each coordinate rounded to the nearest 1/`BOX_STEPS`."""
    return tuple(round(v * BOX_STEPS) / BOX_STEPS for v in box)


def task_meta(task: Task, scenes: list[Scene]) -> dict:
    return {"task": task.name, "format": task.format, "combos": _combos(scenes),
            "label_words": sorted(task.label_map.values())}


def _combos(scenes: list[Scene]) -> list[list[str]]:
    return sorted([list(c) for c in set().union(*(s.combos for s in scenes))]) if scenes else []


# ------------------------------------------------------------------------------------------------ captions
def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def grounded_caption(scene: Scene, rng: random.Random) -> tuple[str, list[tuple[int, int, Group]]]:
    """A caption naming every group, with the character span of each group's noun phrase."""
    with_position = rng.random() < 0.5
    start = rng.choice(("", "a picture of ", "there is "))
    text, spans = start, []
    for i, g in enumerate(scene.groups):
        if i:
            text += " and " if i == len(scene.groups) - 1 else ", "
        phrase = describe(g)
        spans.append((len(text), len(text) + len(phrase), g))
        text += phrase
        if with_position:
            text += f" in the {scene.position(g)}"
    text += f" on a {scene.background} background."
    return text[0].upper() + text[1:], spans


REFERRED_ATTRIBUTES = {"colour": lambda scene, g: g.colour, "cell": lambda scene, g: scene.position(g),
                       "size": lambda scene, g: g.size, "shape": lambda scene, g: g.shape,
                       "whole": lambda scene, g: describe(g)}


def tell_scene(scene: Scene, groups: list[Group]) -> str:
    """The groups of a scene in words, in the given order ("a small red star in the top left and ... on white.")."""
    return _join([f"{describe(g)} in the {scene.position(g)}" for g in groups]) + f" on {scene.background}."


def referring_question(scene: Scene, g: Group, rng: random.Random) -> tuple[str, str, str]:
    """A question naming group ``g`` of a scene of distinct shapes in distinct cells by what tells it from the
    others (its shape, its colour when no other group has it, its cell); its answer, another attribute of ``g``;
    and that attribute's name in `REFERRED_ATTRIBUTES`."""
    choices = [(f"what colour is the {g.shape}?", "colour"), (f"where is the {g.colour} {g.shape}?", "cell"),
               (f"where is the {g.shape}?", "cell"), (f"is the {g.shape} small or large?", "size"),
               (f"what is in the {scene.position(g)}?", "whole")]
    if [h.colour for h in scene.groups].count(g.colour) == 1:
        choices += [(f"what shape is the {g.colour} object?", "shape"), (f"where is the {g.colour} object?", "cell")]
    question, attribute = rng.choice(choices)
    return question, REFERRED_ATTRIBUTES[attribute](scene, g), attribute


def caption(scene: Scene, rng: random.Random) -> str:
    if len(scene.groups) > 1 or rng.random() < 0.5:
        return grounded_caption(scene, rng)[0]
    g = scene.groups[0]
    verb = "is" if g.count == 1 else "are"
    template = rng.choice((
        "{d} {v} in the {p} of the picture, on a {b} background.",
        "A {b} background with {d} in the {p}.",
        "{d} on {b}, in the {p}.",
    ))
    text = template.format(d=describe(g), v=verb, p=scene.position(g), b=scene.background)
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------------------- video
def _interpolate(a: Scene, b: Scene, t: float) -> Scene:
    groups = []
    for ga, gb in zip(a.groups, b.groups):
        boxes = tuple(tuple(round(va + (vb - va) * t, 4) for va, vb in zip(ba, bb)) for ba, bb in zip(ga.boxes, gb.boxes))
        groups.append(replace(ga if t < 0.5 else gb, boxes=boxes))
    return replace(a if t < 0.5 else b, groups=tuple(groups))


def video_event(world: World, scene: Scene, rng: random.Random, split: str) -> tuple[Scene, str, str]:
    """An event happening to the scene's first group: (end scene, event name, sentence predicate)."""
    g = scene.groups[0]
    s = "s" if g.count == 1 else ""
    event = rng.choice(("move", "recolour", "resize"))
    if event == "move":
        cell = rng.choice([c for c in sorted(CELL_NAMES[scene.grid]) if c != g.cell])
        # same jitter pattern in the new cell, so the objects glide without reshuffling
        end = moved(scene, 0, cell, random.Random(0))
        start = moved(scene, 0, g.cell, random.Random(0))
        return (start, end), event, f"move{s} from the {scene.position(g)} to the {CELL_NAMES[scene.grid][cell]}"
    if event == "recolour":
        options = world.colours_for(g.shape, split, exclude=(g.colour, scene.background))
        colour = rng.choice(options) if options else g.colour
        return (scene, changed(scene, 0, colour=colour)), event, f"turn{s} from {g.colour} to {colour}"
    size = "small" if g.size == "large" else "large"
    verb = "grow" if size == "large" else "shrink"
    start = changed(scene, 0, random.Random(0), size=g.size)
    return (start, changed(scene, 0, random.Random(0), size=size)), event, f"{verb}{s} from {g.size} to {size}"


def video_frames(start: Scene, end: Scene, frames: int, size: int) -> list[Image.Image]:
    return [render_scene(_interpolate(start, end, k / (frames - 1)), size) for k in range(frames)]


# ----------------------------------------------------------------------------------------------- the maker
@dataclass
class ShapesMaker:
    """Makes one record of any sample kind, plus json metadata (combinations shown, task, format)."""

    world: World
    image_size: int = 64
    video_frames: int = 8
    clip_frames: int = 4
    # Made-up words may be any pieces of the packaged tokenizer; False for the corpus that tokenizer is learnt from.
    piece_words: bool = True
    piece_word_share: float | None = None  # how often they are (`made_up_word`); None: `PIECE_WORD_PROB`

    def make(self, kind: str, rng: random.Random, split: str) -> tuple[K.Record, dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split in ("lm", "lm_long"):
            if kind != "text":
                raise ValueError(f"the {split} split is language-only (kind text), not {kind!r}")
            if split == "lm_long":
                return replace(self, piece_word_share=LM_LONG_PIECE_WORD_PROB).lm_text(rng, gap=LM_LONG_GAP)
            return self.lm_text(rng)
        scene_split = "heldout" if split == "heldout_combos" else "train"
        if kind == "interleaved" and split.startswith("heldout") or kind == "fewshot":
            return self.fewshot_document(rng, split)
        return getattr(self, kind)(rng, scene_split)

    def render(self, scene: Scene) -> Image.Image:
        return render_scene(scene, self.image_size)

    def _scene(self, rng: random.Random, split: str) -> Scene:
        if rng.random() < 0.7:
            return self.world.group_scene(rng, split)
        return self.world.multi_scene(rng, split, objects=rng.randint(2, 3))

    # -- pretraining kinds
    def pair(self, rng, split):
        scene = self._scene(rng, split)
        return K.ImageTextPair(self.render(scene), caption(scene, rng)), {"combos": _combos([scene])}

    def text_to_image(self, rng, split):
        scene = self._scene(rng, split)
        return K.TextToImage(caption(scene, rng), self.render(scene)), {"combos": _combos([scene])}

    def video_pair(self, rng, split):
        scene = self.world.group_scene(rng, split)
        (start, end), event, predicate = video_event(self.world, scene, rng, split)
        text = f"{describe(scene.groups[0])} {predicate}."
        frames = video_frames(start, end, self.video_frames, self.image_size)
        return K.VideoTextPair(frames, text[0].upper() + text[1:]), {"combos": _combos([start, end]), "event": event}

    def video_interleaved(self, rng, split):
        scene = self.world.group_scene(rng, split)
        texts, clips, scenes = [], [], [scene]
        for k in range(rng.randint(2, 3)):
            (start, end), _, predicate = video_event(self.world, scene, rng, split)
            subject = describe(scene.groups[0]) if k == 0 else ("then it" if scene.groups[0].count == 1 else "then they")
            sentence = f"{subject} {predicate}."
            texts.append(sentence[0].upper() + sentence[1:])
            clips.append(video_frames(start, end, self.clip_frames, self.image_size))
            scene = end
            scenes.append(end)
        return K.VideoDocument(texts, clips, list(range(len(clips)))), {"combos": _combos(scenes)}

    def interleaved(self, rng, split):
        if rng.random() < 0.8:
            return self.fewshot_document(rng, "heldout_combos" if split == "heldout" else "train")
        # an MMC4-like document: captions and a few text-only sentences, images before/after at random
        scenes, texts, index = [], [], []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.3:
                texts.append(rng.choice(("Here is another picture.", "The next one is different.",
                                         "Look at this one.")))
            scene = self._scene(rng, split)
            scenes.append(scene)
            index.append(len(texts))
            texts.append(caption(scene, rng))
        doc = K.InterleavedDocument(texts, [self.render(s) for s in scenes], index, "random")
        return doc, {"task": "captions", "format": "captions", "combos": _combos(scenes), "label_words": []}

    def fewshot_document(self, rng: random.Random, split: str, examples: int | None = None):
        """A document following one hidden task: each image followed by its answer (image_position "before")."""
        task = sample_task(self.world, rng, split, self.piece_words, self.piece_word_share)
        scenes, texts, answers = [], [], []
        for _ in range(examples or rng.randint(4, 8)):
            if EXACT_REPEAT_PROB and scenes and rng.random() < EXACT_REPEAT_PROB:
                earlier = rng.randrange(len(scenes))
                scenes.append(scenes[earlier])
                texts.append(texts[earlier])
                answers.append(answers[earlier])
                continue
            scene, prompt, answer = task.example(self.world, rng)
            scenes.append(scene)
            texts.append(example_text(prompt, answer))
            answers.append(answer)
        doc = K.InterleavedDocument(texts, [self.render(s) for s in scenes], list(range(len(texts))), "before",
                                    unpredictable_examples(task, answers))
        return doc, task_meta(task, scenes)

    def grounded(self, rng, split):
        scene = self.world.multi_scene(rng, split, objects=rng.randint(2, 3), max_count=2)
        text, spans = grounded_caption(scene, rng)
        objects = [K.GroundedObject(s, e, [written_box(b) for b in g.boxes]) for s, e, g in spans]
        return K.GroundedPair(self.render(scene), text, objects), {"combos": _combos([scene])}

    def text(self, rng, split):
        choice = rng.random()
        if choice < TEXT_FEWSHOT_PROB:
            return self.text_fewshot_document(rng, split)
        if choice < TEXT_FEWSHOT_PROB + TEXT_RECALL_PROB:
            return self.recall_document(rng)
        if choice < TEXT_FEWSHOT_PROB + TEXT_RECALL_PROB + TEXT_REPEAT_PROB:
            return self.repeat_document(rng)
        sentences = []
        for _ in range(rng.randint(3, 6)):
            choice = rng.random()
            if choice < 0.4:
                shape = rng.choice(SHAPES)
                sentences.append(f"A {shape} has {SHAPE_FACTS[shape]}.")
            elif choice < 0.8:
                text = caption(self.world.group_scene(rng, split), rng)
                sentences.append(f"Imagine {text[0].lower()}{text[1:]}")
            else:
                n = rng.randint(2, 4)
                sentences.append(f"Counting to {NUMBER_WORDS[n]}: " + ", ".join(NUMBER_WORDS[k] for k in range(1, n + 1)) + ".")
        return K.Text(" ".join(sentences)), {"combos": []}

    def lm_text(self, rng: random.Random, gap: int = 0):
        """A document of the LM stage's corpus (`LM_CORPUS`); ``gap``: at most that many scene sentences between
        what a repeat or recall document tells first and what it asks (`LM_LONG_GAP`)."""
        kind = rng.choices(list(LM_CORPUS), weights=list(LM_CORPUS.values()))[0]
        if kind == "repeat":
            return self.repeat_document(rng, gap)
        if kind == "recall":
            return self.recall_document(rng, gap)
        if kind == "lookup":
            return self.lookup_document(rng, gap)
        return self.text_fewshot_document(rng, "train")

    def scene_sentences(self, rng: random.Random, count: int) -> str:
        """``count`` sentences, each describing a scene ("two small red stars in the top left on white.")."""
        sentences = []
        for _ in range(count):
            scene = self.world.group_scene(rng, "train")
            g = scene.groups[0]
            sentences.append(f"{describe(g)} in the {scene.position(g)} on {scene.background}.")
        return " ".join(sentences)

    def text_fewshot_document(self, rng: random.Random, split: str):
        """A language-only in-context document: the hidden tasks of `fewshot_document` with each image replaced
        by a sentence describing its scene ("a small red star in the top left on white: [red, 1]."). It lets the
        language model learn to infer a task from examples (what a pretrained LLM brings to Emu2) from text."""
        task = sample_task(self.world, rng, "heldout_combos" if split == "heldout" else "train", self.piece_words,
                           self.piece_word_share)
        scenes, text, unscored = [], "", []
        examples = [task.example(self.world, rng) for _ in range(rng.randint(4, 12))]
        first = unpredictable_examples(task, [answer for _, _, answer in examples])
        for k, (scene, prompt, answer) in enumerate(examples):
            scenes.append(scene)
            g = scene.groups[0]
            text += " " if text else ""
            # The description is scored: it is most of the LM corpus's world language, which stage 1's captions
            # build on (unscored, stage 1 started at loss 5.1 instead of 3.1 and every later stage fell behind).
            description = f"{describe(g)} in the {scene.position(g)} on {scene.background}: "
            text += description + example_text(prompt, answer)
            if k in first:
                unscored.append((len(text) - len(example_text(prompt, answer)), len(text)))
        return K.Text(text, unscored=tuple(unscored)), task_meta(task, scenes)

    def recall_document(self, rng: random.Random, gap: int = 0):
        """Made-up words bound to attribute values, then asked again in another order ("dax is red. wug is
        two. ... wug is two."): predicting the second half needs looking the words up in the first, the context."""
        values = list(COLOURS) + list(SHAPES) + list(NUMBER_WORDS.values()) + list(BACKGROUNDS) + list(SIZES)
        words = training_label_words(rng, rng.randint(3, 6), self.piece_words, self.piece_word_share)
        binding = {w: rng.choice(values) for w in words}
        template = rng.choice(("{w} is {v}.", "{w} means {v}.", "{w}: {v}.", "the {w} is {v}."))
        queries = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        bindings = " ".join(template.format(w=w, v=binding[w]) for w in words)
        asked = " ".join(template.format(w=w, v=binding[w]) for w in queries)
        between = self.scene_sentences(rng, rng.randint(0, gap)) if gap else ""
        # the bindings are context (made-up words, drawn values); the loss scores the queries, which they determine
        return K.Text(asked, context=f"{bindings} {between}".rstrip()), {"task": "recall", "format": "recall", "combos": [], "label_words": sorted(words)}

    def lookup_document(self, rng: random.Random, gap: int = 0):
        """A scene of 2-4 objects told in words, then questions that name one object by one of its attributes and
        ask another ("a small red star in the top left and a large blue circle in the center on white. what colour
        is the circle? blue. where is the red star? top left."). Answering needs finding the object the question
        names among the others in the context: what a grounding question asks of the visual embeddings, taught
        here in words."""
        scene = self.world.multi_scene(rng, "train", objects=rng.randint(2, 4))
        groups = rng.sample(scene.groups, len(scene.groups))
        told = tell_scene(scene, groups)
        between = self.scene_sentences(rng, rng.randint(0, gap)) if gap else ""
        asked, questions = "", []
        for _ in range(rng.randint(2, 5)):
            question, answer, _ = referring_question(scene, rng.choice(groups), rng)
            asked += " " if asked else ""
            questions.append((len(asked), len(asked) + len(question)))
            asked += f"{question} {answer}."
        # the scene is context (nothing predicts it); the loss scores the answers, which it determines, and the
        # questions unless LOOKUP_SCORES_QUESTIONS is False (which object is asked is a draw)
        unscored = () if LOOKUP_SCORES_QUESTIONS else tuple(questions)
        return K.Text(asked, context=f"{told} {between}".rstrip(), unscored=unscored), {
            "task": "lookup", "format": "lookup", "combos": [], "label_words": []}

    def repeat_document(self, rng: random.Random, gap: int = 0):
        """A list of fresh made-up words (now and then a word of the world), then the same list two or three
        more times ("kax bloo tum. again: kax bloo tum. ..."). Only copying predicts the repeats: the cheapest
        lesson in induction, the mechanism a label word new to the model is copied by (what pretrained LLMs
        bring). Most of the document is repeats, so most of its tokens teach copying."""
        known = list(COLOURS) + list(SHAPES) + list(SIZES)
        words = [rng.choice(known) if rng.random() < 0.15 else made_up_word(rng, self.piece_words, self.piece_word_share)
                 for _ in range(rng.randint(3, 8))]
        listed = " ".join(words) + "."
        repeats = [rng.choice(REPEAT_INTROS) + listed for _ in range(rng.randint(2, 3))]
        between = self.scene_sentences(rng, rng.randint(0, gap)) if gap else ""
        # the first telling is context (nothing predicts made-up words); the loss scores the repeats
        return K.Text(" ".join(repeats), context=f"{listed} {between}".rstrip()), {"task": "repeat", "format": "repeat", "combos": [],
                                                       "label_words": sorted(set(words))}

    # -- chat
    def chat(self, rng, split):
        choice = rng.random()
        short = P.SHORT_ANSWER_SYSTEM_MESSAGE
        if choice < 0.35:  # VQA with the output-format instruction (2.3.1)
            scene = self.world.group_scene(rng, split)
            questions = rng.sample(sorted(VQA_QUESTIONS), rng.randint(1, 3))
            messages = []
            for k, q in enumerate(questions):
                ask = VQA_QUESTIONS[q][0].upper() + VQA_QUESTIONS[q][1:]
                prefix = P.IMAGE_PLACEHOLDER if k == 0 else ""
                messages += [f"{prefix}{ask}\nAnswer the question using a single word or phrase.",
                             attribute_value(scene, q)]
            return K.Conversation(messages, [self.render(scene)], system=short), {"combos": _combos([scene])}
        if choice < 0.55:
            scene = self._scene(rng, split)
            messages = [f"{P.IMAGE_PLACEHOLDER}Describe the image in detail.", caption(scene, rng)]
            return K.Conversation(messages, [self.render(scene)]), {"combos": _combos([scene])}
        if choice < 0.8:  # referring expression comprehension: answer with the box (a quarter of the mix:
            # a box is four coordinate tokens to learn from few examples)
            scene = self.world.multi_scene(rng, split, objects=rng.randint(2, 3))
            g = rng.choice(scene.groups)
            messages = [f"{P.IMAGE_PLACEHOLDER}Where is the {describe(g, article='').strip()}? Give its box.",
                        P.box_to_tokens(written_box(g.box), 1.0, 1.0)]
            return K.Conversation(messages, [self.render(scene)], system=short), {"combos": _combos([scene])}
        if choice < 0.95:
            record, meta = self.video_pair(rng, split)
            messages = [f"{P.VIDEO_TOKEN}What happens in the video?", record.text]
            return K.Conversation(messages, frames=record.frames), meta
        shape = rng.choice(SHAPES)
        messages = [f"How many corners does a {shape} have?", f"A {shape} has {SHAPE_FACTS[shape]}."]
        return K.Conversation(messages), {"combos": []}

    # -- generation (Emu2-Gen)
    def edit(self, rng, split):
        scene = self.world.group_scene(rng, split)
        g = scene.groups[0]
        things = f"the {g.size} {g.colour} {g.shape if g.count == 1 else plural(g.shape)}"
        choice = rng.choice(("colour", "move", "background", "count", "size"))
        if choice == "colour" and (colours := self.world.colours_for(g.shape, split, (g.colour, scene.background))):
            colour = rng.choice(colours)
            edited, instruction = changed(scene, 0, colour=colour), f"make {things} {colour}"
        elif choice == "move":
            cell = rng.choice([c for c in sorted(CELL_NAMES[scene.grid]) if c != g.cell])
            edited, instruction = moved(scene, 0, cell, rng), f"move {things} to the {CELL_NAMES[scene.grid][cell]}"
        elif choice == "background":
            options = [b for b in BACKGROUNDS if b not in (scene.background, g.colour)]
            background = rng.choice(options)
            edited, instruction = replace(scene, background=background), f"change the background to {background}"
        elif choice == "count" and g.count < 4:
            edited, instruction = changed(scene, 0, rng, count=g.count + 1), f"add one more {g.shape}"
        else:
            size = "small" if g.size == "large" else "large"
            edited, instruction = changed(scene, 0, rng, size=size), f"make {things} {size}"
        record = K.ImageEdit(self.render(scene), instruction[0].upper() + instruction[1:] + ".", self.render(edited))
        return record, {"combos": _combos([scene, edited])}

    def grounded_generation(self, rng, split):
        scene = self.world.multi_scene(rng, split, objects=rng.randint(2, 3))
        text, spans = grounded_caption(scene, rng)
        objects = [K.GroundedObject(s, e, list(g.boxes)) for s, e, g in spans]
        subjects = [render_object(g.shape, g.colour, scene.background, self.image_size) for _, _, g in spans]
        return K.GroundedGeneration(self.render(scene), text, objects, subjects), {"combos": _combos([scene])}


# --------------------------------------------------------------------------------------------- eval episodes
def make_episode(maker: ShapesMaker, rng: random.Random, split: str, support: int = 8, queries: int = 4) -> dict:
    """One few-shot evaluation episode of a held-out split: ``support`` examples, then ``queries``.

    A k-shot prompt uses the first k support examples (see `fewshot_prompt`). Images are PIL images under
    "image"; `write.py` replaces them by file paths.
    """
    task = sample_task(maker.world, rng, split)
    examples = []
    for _ in range(support + queries):
        scene, prompt, answer = task.example(maker.world, rng)
        examples.append({"image": maker.render(scene), "prompt": prompt, "answer": answer,
                         "combos": _combos([scene])})
    return {"split": split, "task": task.name, "format": task.format, "label_words": sorted(task.label_map.values()),
            "support": examples[:support], "queries": examples[support:]}


def fewshot_prompt(episode: dict, shots: int, query: int) -> tuple[str, list, str]:
    """(prompt with ``[<IMG_PLH>]`` placeholders, the images in order, expected answer) for a k-shot query.

    The layout matches the training documents: ``[<IMG_PLH>]`` + example text per support example, then
    ``[<IMG_PLH>]`` + the query's prompt; the model continues with the answer.
    """
    if shots > len(episode["support"]):
        raise ValueError(f"the episode has {len(episode['support'])} support examples, asked for {shots} shots")
    examples = episode["support"][:shots]
    text = "".join(P.IMAGE_PLACEHOLDER + example_text(e["prompt"], e["answer"]) for e in examples)
    q = episode["queries"][query]
    text += P.IMAGE_PLACEHOLDER + q["prompt"]
    return text, [e["image"] for e in examples] + [q["image"]], q["answer"]
