"""Generation attribute accuracy on the shapes world: do generated images show the scene that was asked for?

Each generated image is read back with the pixel detector (`emu2.data.shapes.detect.detect_scene`) and its
shape, colour, count, position, background and size compared with the scene's; "all" is every scored
attribute right at once. `evaluate_generation` runs an `Emu2GenPipeline` on held-out scenes two ways:
text-to-image from the scene's caption, and autoencoding (the true render as the only input); the detector
on the true renders themselves is the ceiling.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..data.shapes.detect import ATTRIBUTES, detect_scene
from ..data.shapes.world import Scene
from .intervals import format_interval, wilson_interval

KEYS = (*ATTRIBUTES, "all")


def scene_attributes(scene: Scene) -> dict:
    """``{attribute: value}`` of a single-group scene, valued like `Detection.attributes` (count an int)."""
    g = scene.groups[0]
    return {"shape": g.shape, "colour": g.colour, "count": g.count, "position": scene.position(g),
            "background": scene.background, "size": g.size}


def asked_in_caption(scene: Scene, text: str) -> set[str]:
    """The attributes a caption states: all six, except the position when the caption leaves it out."""
    asked = set(ATTRIBUTES)
    if f"in the {scene.position(scene.groups[0])}" not in text.lower():
        asked.discard("position")
    return asked


def attribute_accuracy(images: Sequence[Image.Image], scenes: Sequence[Scene],
                       asked: Sequence[set[str]] | None = None) -> dict:
    """Per-attribute accuracy of images against the single-group scenes they should show.

    images[i] (any size) is detected with ``grid=scenes[i].grid`` and compared with scenes[i]. ``asked[i]``
    (default: all attributes) limits what item i is scored on, e.g. no position for a caption without one.
    Returns ``{attribute: accuracy over the items that asked it (None if none did), "all": share of items
    with every asked attribute right, "n": items, "ci95": {attribute: [low, high]}, "scored": {attribute: items
    that asked it}}`` (Wilson intervals).
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    asked = list(asked) if asked is not None else [set(ATTRIBUTES)] * len(scenes)
    right = dict.fromkeys(KEYS, 0)
    scored = dict.fromkeys(KEYS, 0)
    for image, scene, wanted in zip(images, scenes, asked):
        got = detect_scene(image, grid=scene.grid).attributes()
        truth = scene_attributes(scene)
        ok = {a: got[a] == truth[a] for a in ATTRIBUTES if a in wanted}
        for a, hit in ok.items():
            right[a] += hit
            scored[a] += 1
        right["all"] += all(ok.values())
        scored["all"] += 1
    out = {k: (round(right[k] / scored[k], 4) if scored[k] else None) for k in KEYS}
    out["n"] = len(scenes)
    out["ci95"] = {k: [round(b, 4) for b in wilson_interval(right[k], scored[k])] for k in KEYS if scored[k]}
    out["scored"] = dict(scored)
    return out


def evaluate_generation(gen_pipe, data_dir: str | Path, items: int = 32, seed: int = 1234,
                        num_inference_steps: int = 25, guidance_scale: float = 3.0, batch_size: int = 25) -> dict:
    """Attribute accuracy of an `Emu2GenPipeline` on ``items`` fresh held-out group scenes of the dataset's
    world (``data_dir/dataset.json``: "seed", "image_size").

    Text-to-image prompts are `tasks.caption(scene, rng)`; autoencoding feeds the true render alone. Item i
    samples with ``torch.Generator().manual_seed(seed + i)`` (its own initial noise, whatever ``batch_size``
    items are drawn together). Returns ``{"text_to_image": {...}, "autoencode": {...}, "truth_renders": {...},
    "items": items}``, each inner dict from `attribute_accuracy`.
    """
    import torch

    from ..data.shapes.render import render_scene
    from ..data.shapes.tasks import caption
    from ..data.shapes.world import World

    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    world = World.from_seed(manifest.get("seed", 0))
    size = manifest.get("image_size", 64)
    rng = random.Random(seed)
    scenes, truths, prompts, made, recon = [], [], [], [], []
    for _ in range(items):
        scene = world.group_scene(rng, "heldout")
        scenes.append(scene)
        truths.append(render_scene(scene, size))
        prompts.append(caption(scene, rng))
    for start in range(0, items, batch_size):
        stop = min(items, start + batch_size)

        def draw(inputs):
            generators = [torch.Generator().manual_seed(seed + i) for i in range(start, stop)]
            return gen_pipe(inputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            generator=generators).images

        made += draw([[prompt] for prompt in prompts[start:stop]])  # a batch of one-text prompts
        recon += draw(truths[start:stop])  # a batch of images: each autoencoded alone
    asked = [asked_in_caption(s, p) for s, p in zip(scenes, prompts)]
    return {
        "text_to_image": attribute_accuracy(made, scenes, asked),
        "autoencode": attribute_accuracy(recon, scenes),
        "truth_renders": attribute_accuracy(truths, scenes),
        "items": items,
    }


def generation_table(results: dict) -> str:
    """Markdown: rows = text-to-image, autoencode, true renders; columns = attribute accuracy % [95 % interval]."""
    lines = ["| images | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS)]
    for key, name in (("text_to_image", "text-to-image"), ("autoencode", "autoencoded"),
                      ("truth_renders", "true renders")):
        row = results[key]
        cells = ["-" if row[k] is None else
                 format_interval({"value": row[k], "ci95": row["ci95"][k]}) if "ci95" in row else f"{100 * row[k]:.1f}"
                 for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
