"""Image question answering and meme classification: VQAv2, OK-VQA, VizWiz, TextVQA, GQA, Hateful Memes.

Each reader takes the files as their publishers distribute them, from local paths (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

from .record import EvalRecord, read_json, read_jsonl, require_dir


def _coco_image_name(subtype: str, image_id: int) -> str:
    """COCO 2014/2015 file naming: ``COCO_val2014_000000262148.jpg``."""
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def load_vqav2(
    questions_json: str | Path,
    image_dir: str | Path,
    annotations_json: str | Path | None = None,
    image_subtype: str | None = None,
) -> list[EvalRecord]:
    """VQAv2 or OK-VQA (same layout): ``{"questions": [{question_id, image_id, question}]}`` plus
    ``{"annotations": [{question_id, answers: [{answer, ...}] x 10, question_type, answer_type, ...}]}``.

    Images are ``image_dir/COCO_{subtype}_{image_id:012d}.jpg``; ``subtype`` defaults to the questions file's
    ``data_subtype`` ("val2014"; "test-dev2015" questions use the "test2015" images). Without
    ``annotations_json`` (test-dev, scored by the server) the records have no answers.
    """
    hint = "VQAv2: https://visualqa.org/download.html; OK-VQA: https://okvqa.allenai.org/download.html"
    questions = read_json(questions_json, "VQA questions file", hint)
    image_dir = require_dir(image_dir, "COCO image folder")
    if image_subtype is None:
        image_subtype = questions.get("data_subtype")
        if image_subtype is None:
            raise ValueError(f"{questions_json} has no 'data_subtype'; pass image_subtype (e.g. 'val2014')")
        image_subtype = "test2015" if image_subtype.startswith("test") else image_subtype
    annotations = {}
    if annotations_json is not None:
        for annotation in read_json(annotations_json, "VQA annotations file", hint)["annotations"]:
            annotations[annotation["question_id"]] = annotation
    records = []
    for question in questions["questions"]:
        annotation = annotations.get(question["question_id"], {})
        if annotations_json is not None and not annotation:
            raise ValueError(f"question {question['question_id']} has no annotation in {annotations_json}; "
                             "are the questions and annotations files from the same split?")
        records.append(EvalRecord(
            id=str(question["question_id"]),
            question=question["question"],
            answers=[a["answer"] for a in annotation.get("answers", [])],
            images=[image_dir / _coco_image_name(image_subtype, question["image_id"])],
            meta={k: annotation[k] for k in ("question_type", "answer_type") if k in annotation},
        ))
    return records


load_okvqa = load_vqav2  # OK-VQA ships in the VQA format (questions + annotations, COCO val2014 images).


def load_vizwiz(annotations_json: str | Path, image_dir: str | Path) -> list[EvalRecord]:
    """VizWiz-VQA: a JSON list of ``{image, question, answers: [{answer, answer_confidence}] x 10,
    answer_type, answerable}``; one question per image, so the image name is the id. Test has no answers."""
    items = read_json(annotations_json, "VizWiz annotations file", "https://vizwiz.org/tasks-and-datasets/vqa/")
    image_dir = require_dir(image_dir, "VizWiz image folder")
    return [
        EvalRecord(
            id=Path(item["image"]).stem,
            question=item["question"],
            answers=[a["answer"] for a in item.get("answers", [])],
            images=[image_dir / item["image"]],
            meta={k: item[k] for k in ("answer_type", "answerable") if k in item},
        )
        for item in items
    ]


def load_textvqa(annotations_json: str | Path, image_dir: str | Path) -> list[EvalRecord]:
    """TextVQA: ``{"data": [{question_id, question, image_id, answers: [10 strings], ...}]}``; images are
    ``image_dir/{image_id}.jpg`` (the val images live in the ``train_images`` folder)."""
    data = read_json(annotations_json, "TextVQA annotations file", "https://textvqa.org/dataset/")
    image_dir = require_dir(image_dir, "TextVQA image folder")
    return [
        EvalRecord(
            id=str(item["question_id"]),
            question=item["question"],
            answers=list(item.get("answers", [])),
            images=[image_dir / f"{item['image_id']}.jpg"],
        )
        for item in data["data"]
    ]


def load_gqa(questions_json: str | Path, image_dir: str | Path) -> list[EvalRecord]:
    """GQA: ``{question_id: {imageId, question, answer, fullAnswer, types, ...}}`` (e.g.
    ``testdev_balanced_questions.json``); images are ``image_dir/{imageId}.jpg``. Scored by exact match."""
    questions = read_json(questions_json, "GQA questions file", "https://cs.stanford.edu/people/dorarad/gqa/")
    image_dir = require_dir(image_dir, "GQA image folder")
    return [
        EvalRecord(
            id=str(question_id),
            question=item["question"],
            answers=[item["answer"]] if "answer" in item else [],
            images=[image_dir / f"{item['imageId']}.jpg"],
            meta={"types": item["types"]} if "types" in item else {},
        )
        for question_id, item in questions.items()
    ]


def load_hateful_memes(jsonl: str | Path, image_root: str | Path | None = None) -> list[EvalRecord]:
    """Hateful Memes: JSON lines ``{id, img: "img/01235.png", label, text}`` (the paper uses ``test_seen``).

    ``img`` is relative to ``image_root`` (default: the folder holding the jsonl). Answers are "yes" for
    hateful (label 1) and "no" otherwise, so the item can be asked as a yes/no question.
    """
    rows = read_jsonl(jsonl, "Hateful Memes annotations (jsonl)", "https://hatefulmemeschallenge.com/")
    root = require_dir(Path(jsonl).parent if image_root is None else image_root, "Hateful Memes image root")
    records = []
    for row in rows:
        label = int(row["label"]) if "label" in row else None
        records.append(EvalRecord(
            id=str(row["id"]),
            images=[root / row["img"]],
            text=row["text"],
            label=label,
            answers=[] if label is None else ["yes" if label == 1 else "no"],
        ))
    return records
