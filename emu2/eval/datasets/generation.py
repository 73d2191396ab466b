"""Image generation benchmarks: MS-COCO text-to-image (30k captions) and DreamBench subject-driven generation.

Records carry the prompt in ``text`` and the real image(s) in ``images`` (for CLIP-I / DINO scoring).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path

from .record import IMAGE_SUFFIXES, EvalRecord, read_json, require_dir, require_file


def load_coco_captions(
    captions_json: str | Path,
    image_dir: str | Path,
    num_samples: int | None = 30_000,
    seed: int = 0,
    one_per_image: bool = True,
) -> list[EvalRecord]:
    """MS-COCO captions (``captions_val2014.json``: ``{images: [{id, file_name}], annotations: [{id, image_id,
    caption}]}``), ``num_samples`` of them drawn with ``seed`` (section 3.3: "30k randomly sampled data from
    the MS-COCO validation set"; None keeps all).

    ``one_per_image`` first keeps one randomly chosen caption per image, so no image is counted twice.
    """
    data = read_json(captions_json, "COCO captions file", "https://cocodataset.org/#download (2014 annotations)")
    image_dir = require_dir(image_dir, "COCO val2014 image folder")
    file_names = {image["id"]: image["file_name"] for image in data["images"]}
    rng = random.Random(seed)
    annotations = sorted(data["annotations"], key=lambda a: a["id"])
    if one_per_image:
        by_image: dict[int, list[dict]] = {}
        for annotation in annotations:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        annotations = [rng.choice(by_image[image_id]) for image_id in sorted(by_image)]
    if num_samples is not None:
        if num_samples > len(annotations):
            raise ValueError(f"asked for {num_samples} captions but {captions_json} has only {len(annotations)}"
                             f"{' images' if one_per_image else ''}")
        annotations = sorted(rng.sample(annotations, num_samples), key=lambda a: a["id"])
    return [
        EvalRecord(
            id=str(a["id"]),
            text=a["caption"].strip(),
            images=[image_dir / file_names[a["image_id"]]],
            meta={"image_id": a["image_id"]},
        )
        for a in annotations
    ]


_PROMPT_LINE = re.compile(r"^'(?P<template>.*)'\.format\(")
LIVE_CLASSES = frozenset({"cat", "dog"})  # DreamBooth's live subjects get the "Live Subject Prompts"


def parse_dreambench_prompts(prompts_txt: str | Path) -> tuple[dict[str, str], list[str], list[str]]:
    """DreamBooth's ``prompts_and_classes.txt`` -> (subject -> class, object templates, live-subject templates).

    Templates keep DreamBooth's ``{0}`` (unique token) and ``{1}`` (class) fields.
    """
    lines = require_file(prompts_txt, "DreamBench prompts_and_classes.txt",
                         "it ships in https://github.com/google/dreambooth under dataset/").read_text().splitlines()
    classes: dict[str, str] = {}
    templates: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in lines:
        line = raw.strip()
        if line in ("Classes", "Object Prompts", "Live Subject Prompts"):
            section = {"Classes": "classes", "Object Prompts": "object", "Live Subject Prompts": "live"}[line]
        elif section == "classes" and "," in line and line != "subject_name,class":
            subject, class_name = line.split(",", 1)
            classes[subject.strip()] = class_name.strip()
        elif section in templates and (match := _PROMPT_LINE.match(line)):
            templates[section].append(match.group("template"))
    if not classes or not templates["object"] or not templates["live"]:
        raise ValueError(f"{prompts_txt} does not look like DreamBooth's prompts_and_classes.txt: found "
                         f"{len(classes)} classes, {len(templates['object'])} object and "
                         f"{len(templates['live'])} live-subject prompts")
    return classes, templates["object"], templates["live"]


def load_dreambench(
    dataset_dir: str | Path,
    prompts_txt: str | Path | None = None,
    chosen_images: Mapping[str, str] | None = None,
) -> list[EvalRecord]:
    """DreamBench: ``dataset_dir/<subject>/*.jpg`` and DreamBooth's ``prompts_and_classes.txt`` (default: in
    ``dataset_dir``) -> one record per (subject, prompt), 30 x 25 = 750.

    ``text`` is the prompt with the class as the subject ("a backpack in the jungle"; zero-shot, no unique
    token); ``meta["template"]`` keeps DreamBooth's template for other phrasings (Kosmos-G's rewrites,
    Appendix D). ``images`` is every subject image, or the one named in ``chosen_images[subject]`` (the paper
    uses Kosmos-G's choice of a single image per subject).
    """
    dataset_dir = require_dir(dataset_dir, "DreamBench dataset folder", "clone https://github.com/google/dreambooth")
    classes, object_templates, live_templates = parse_dreambench_prompts(
        dataset_dir / "prompts_and_classes.txt" if prompts_txt is None else prompts_txt
    )
    records = []
    for subject, class_name in classes.items():
        subject_dir = require_dir(dataset_dir / subject, f"DreamBench subject folder for {subject!r}")
        if chosen_images is not None and subject in chosen_images:
            images = [require_file(subject_dir / chosen_images[subject], f"chosen image for {subject!r}")]
        else:
            images = sorted(p for p in subject_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        live = class_name in LIVE_CLASSES
        for index, template in enumerate(live_templates if live else object_templates):
            records.append(EvalRecord(
                id=f"{subject}-{index:02d}",
                text=" ".join(template.format("", class_name).split()),
                images=images,
                meta={"subject": subject, "class": class_name, "template": template, "live": live},
            ))
    return records
