"""Interleaved consistency on the shapes world: does the base model draw the scene it has just written about?

Each document is a story of held-out scenes in the stage-2 interleaved layout the model was trained on, each
caption followed by its image (an MMC4-style document with every image "after" its sentence, paper A.1):
``Caption 1.[IMG]..[/IMG]Caption 2.[IMG]..[/IMG]``. The model continues it in two calls of the interleaved loop
(`Emu2Pipeline.generate_interleaved`):

1. it writes the next caption (text only, ``max_images=0``) until its full stop;
2. the image is forced where a training document puts an image that follows its sentence, right after the
   caption's full stop (the loop's ``force_image_at=[0]`` on prompt + caption), and the loop regresses its
   ``n_query`` visual embeddings, which the visual decoder turns into pixels.

The caption the model wrote is parsed back into the attributes it states (`parse_caption`: every template of
`tasks.caption` for one group of shapes) and the decoded image is read with the pixel detector; consistency is
the share of images whose detector-read attributes match the model's own caption (per attribute and "all").
Beside it: the ceiling, the same measure for true renders of the scene each caption describes, and the floor,
each generated image against another document's caption. Every figure carries a 95 % interval.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..data.shapes.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Group,
    Scene,
    layout,
    plural,
)
from .intervals import format_interval, with_interval
from .shapes_generation import KEYS, asked_in_caption, attribute_accuracy

ROWS = (("generated", "generated (the model's own caption)"),
        ("ceiling", "true renders of the caption (ceiling)"),
        ("floor", "another document's caption (floor)"))


# ------------------------------------------------------------------------------------------ caption parser
def _any(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "top left"


_COUNTS = {"a": 1, **{word: n for n, word in NUMBER_WORDS.items()}}
_SINGULAR = {s: s for s in SHAPES}
_PLURAL = {plural(s): s for s in SHAPES}
_POSITIONS = {name for names in CELL_NAMES.values() for name in names.values()}
_GROUP = (rf"(?P<count>{_any(_COUNTS)}) (?P<size>{_any(SIZES)}) (?P<colour>{_any(COLOURS)}) "
          rf"(?P<shape>{_any({**_SINGULAR, **_PLURAL})})")
_POSITION, _BACKGROUND = rf"(?P<position>{_any(_POSITIONS)})", rf"(?P<background>{_any(BACKGROUNDS)})"
# The single-group templates of `tasks.caption` (its own four and `grounded_caption` for one group), lower case.
CAPTION_PATTERNS = tuple(re.compile(p) for p in (
    rf"(?:a picture of |there is )?{_GROUP}(?: in the {_POSITION})? on a {_BACKGROUND} background\.",
    rf"{_GROUP} (?:is|are) in the {_POSITION} of the picture, on a {_BACKGROUND} background\.",
    rf"a {_BACKGROUND} background with {_GROUP} in the {_POSITION}\.",
    rf"{_GROUP} on {_BACKGROUND}, in the {_POSITION}\.",
))


def _normalise(text: str) -> str:
    return re.sub(r"\s+([.,])", r"\1", " ".join(text.split())).lower()


def parse_caption(text: str) -> dict | None:
    """The attributes a one-group caption states, or None when it follows none of the caption templates.

    ``"Two small red stars on gray, in the top left."`` -> ``{"shape": "star", "colour": "red", "count": 2,
    "size": "small", "position": "top left", "background": "gray"}``; ``position`` is None when the caption
    leaves it out. Case and spacing are ignored; the count word must agree with the noun ("a star", "two
    stars"); the whole text must be the caption, its full stop included.
    """
    text = _normalise(text)
    for pattern in CAPTION_PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        count, shape = _COUNTS[match["count"]], match["shape"]
        if (count == 1) != (shape in _SINGULAR):
            return None
        return {"shape": _SINGULAR.get(shape) or _PLURAL[shape], "colour": match["colour"], "count": count,
                "size": match["size"], "position": match["position"], "background": match["background"]}
    return None


def caption_scene(attributes: dict, rng: random.Random) -> Scene:
    """The one-group scene a parsed caption describes, laid out with ``rng`` (a random cell when the caption
    names none). Positions that exist only in the 3x3 grid ("center", "top", ...) put the scene on it; the
    others on the 2x2 grid of the attribute tasks' scenes (`World.group_scene`)."""
    position = attributes["position"]
    grid = 2 if position is None or position in CELL_NAMES[2].values() else 3
    cells = {name: cell for cell, name in CELL_NAMES[grid].items()}
    cell = cells[position] if position is not None else rng.choice(sorted(CELL_NAMES[grid]))
    count, size = attributes["count"], attributes["size"]
    group = Group(attributes["shape"], attributes["colour"], size, count, cell, layout(cell, grid, count, size, rng))
    return Scene(attributes["background"], grid, (group,))


# ------------------------------------------------------------------------------------------------- scoring
def consistency(images: Sequence[Image.Image], scenes: Sequence[Scene], captions: Sequence[str]) -> dict:
    """Share of images whose detector-read attributes match their caption, each attribute scored only where
    the caption states it (`asked_in_caption`).

    images[i] (any size) is read against scenes[i], the scene captions[i] describes (`caption_scene`).
    Returns ``{attribute: {"value", "ci95", "n"} (`with_interval`; None if no caption stated it), "all": every
    stated attribute right, "n": items}``.
    """
    if not len(images) == len(scenes) == len(captions):
        raise ValueError(f"{len(images)} images, {len(scenes)} scenes and {len(captions)} captions: one each")
    items = [attribute_accuracy([image], [scene], [asked_in_caption(scene, text)])
             for image, scene, text in zip(images, scenes, captions)]
    out = {}
    for key in KEYS:
        hits = [item[key] for item in items if item[key] is not None]
        out[key] = with_interval(hits) if hits else None
    out["n"] = len(items)
    return out


# ------------------------------------------------------------------------------------------------- runner
def story_prompt(world, rng: random.Random, pairs: int, image_size: int) -> list:
    """An interleaved story of ``pairs`` held-out scenes, each caption then its render (official input list)."""
    from ..data.shapes.render import render_scene
    from ..data.shapes.tasks import caption

    items = []
    for _ in range(pairs):
        scene = world.group_scene(rng, "heldout")
        items += [caption(scene, rng), render_scene(scene, image_size)]
    return items


def evaluate_interleaved_consistency(base_pipe, decoder, data_dir: str | Path, documents: int = 200,
                                     seed: int = 1234, num_inference_steps: int = 15, guidance_scale: float = 3.0,
                                     batch_size: int = 16, context_pairs: int = 2, max_caption_tokens: int = 48,
                                     **generate_kwargs) -> dict:
    """Consistency of the captions an `Emu2Pipeline` (the stage-2 base model) writes and the images it draws
    next to them, on ``documents`` stories of the dataset's world (``data_dir/dataset.json``: "seed",
    "image_size"); see the module docstring.

    ``decoder``: an `Emu2VisualDecoderPipeline` for the model's visual embeddings, guided (``guidance_scale``)
    by the regressed embeddings of the empty prompt, as Emu2-Gen. Document i's noise comes from
    ``torch.Generator().manual_seed(seed + i)`` and the prompts from ``random.Random(seed)``, so with greedy
    captions (the default) a run repeats exactly. ``generate_kwargs`` (do_sample, temperature,
    logits_processor, ...) go to the caption step's `generate_interleaved`. Documents whose caption does not
    parse get no image (nothing could score it), so the time per document grows with the share that parse.

    Returns ``{"generated", "ceiling", "floor"}`` (each from `consistency`, over the documents whose caption
    parses), ``"parseable"`` (share of documents whose caption parses, with its interval),
    ``"copied_from_prompt"`` (share of the parsed captions that repeat one of their story's), ``"documents"``,
    ``"seconds_per_document"`` and ``"examples"`` (the first captions and what they parsed to).
    """
    import torch

    from ..data.shapes.render import render_scene
    from ..data.shapes.world import World
    from ..model.interleaved import InterleavedImage

    if documents < 1 or batch_size < 1 or context_pairs < 1:
        raise ValueError(f"documents, batch_size and context_pairs must be >= 1; got {documents}, {batch_size} "
                         f"and {context_pairs}")
    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    world, size = World.from_seed(manifest.get("seed", 0)), manifest.get("image_size", 64)
    started = time.perf_counter()
    rng = random.Random(seed)
    prompts = [story_prompt(world, rng, context_pairs, size) for _ in range(documents)]

    # 1. The next caption, text only, up to and including its full stop.
    captions = _next_captions(base_pipe, prompts, batch_size, max_caption_tokens, generate_kwargs)
    parsed = [parse_caption(text) for text in captions]
    kept = [i for i, attributes in enumerate(parsed) if attributes is not None]

    # 2. The image right after the caption (forced, as an image after its sentence), decoded in batches.
    uncond = base_pipe.regress_image_embeddings([""]) if guidance_scale > 1.0 else None
    images: list[Image.Image] = []
    for start in range(0, len(kept), batch_size):
        rows = kept[start:start + batch_size]
        answers = base_pipe.generate_interleaved([prompts[i] + [captions[i]] for i in rows], max_images=1,
                                                 max_new_tokens=0, force_image_at=[0])
        embeddings = torch.stack([next(p for p in parts if isinstance(p, InterleavedImage)).embeddings
                                  for parts in answers])  # (b, Q, Dv)
        images += decoder(embeddings, uncond, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale,
                          generator=[torch.Generator().manual_seed(seed + i) for i in rows]).images

    # 3. Score: own caption, true renders of it (ceiling), the next kept document's caption (floor).
    scenes = [caption_scene(parsed[i], random.Random(f"{seed}:{i}")) for i in kept]
    texts = [captions[i] for i in kept]
    results = {"documents": documents, "parseable": with_interval([p is not None for p in parsed])}
    # A caption copied from the story itself is still consistent if drawn right, but says less about writing.
    copied = [_normalise(captions[i]) in {_normalise(t) for t in prompts[i][0::2]} for i in kept]
    results["copied_from_prompt"] = with_interval(copied) if kept else None
    if kept:
        results["generated"] = consistency(images, scenes, texts)
        results["ceiling"] = consistency([render_scene(s, size) for s in scenes], scenes, texts)
        results["floor"] = (consistency(images, scenes[1:] + scenes[:1], texts[1:] + texts[:1])
                            if len(kept) > 1 else _empty())
    else:
        results.update({key: _empty() for key, _ in ROWS})
    results["seconds_per_document"] = round((time.perf_counter() - started) / documents, 4)
    results["examples"] = [{"caption": captions[i], "parsed": parsed[i]} for i in range(min(5, documents))]
    return results


def _next_captions(base_pipe, prompts: list, batch_size: int, max_tokens: int, generate_kwargs: dict) -> list[str]:
    """The caption each story prompt continues with: text only, up to and including its full stop."""
    from transformers import StopStringCriteria

    full_stop = StopStringCriteria(base_pipe.tokenizer, ["."])
    captions = []
    for start in range(0, len(prompts), batch_size):
        answers = base_pipe.generate_interleaved(prompts[start:start + batch_size], max_images=0,
                                                 max_new_tokens=max_tokens, stopping_criteria=[full_stop],
                                                 **generate_kwargs)
        captions += ["".join(p for p in parts if isinstance(p, str)).strip() for parts in answers]
    return captions


def _empty() -> dict:
    return {**dict.fromkeys(KEYS), "n": 0}


def interleaved_table(results: dict) -> str:
    """Markdown: rows = generated, ceiling, floor; columns = consistency % [95 % interval] per attribute and
    "all", and the images scored; then the share of documents whose caption parsed."""
    lines = ["| images | " + " | ".join(KEYS) + " | n |", "|---|" + "---:|" * (len(KEYS) + 1)]
    for key, name in ROWS:
        row = results[key]
        cells = ["-" if row[k] is None else format_interval(row[k]) for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['n']} |")
    copied = results.get("copied_from_prompt")
    lines += ["", f"Captions that parse: {format_interval(results['parseable'])} % of {results['documents']} "
                  "documents" + (f"; of those, copied from their story: {format_interval(copied)} %" if copied else "")
              + f" ({results['seconds_per_document']:.2f} s per document)."]
    return "\n".join(lines)
