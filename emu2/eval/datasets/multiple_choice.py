"""Multiple-choice benchmarks for large multimodal models: SEED-Bench and MMMU (answers are option letters)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

from .record import EvalRecord, read_json, read_jsonl, require_dir


def load_seed_bench(
    seed_json: str | Path,
    image_dir: str | Path,
    video_dir: str | Path | None = None,
    data_types: Sequence[str] = ("image", "video"),
) -> list[EvalRecord]:
    """SEED-Bench (v1): ``{"questions": [{question_id, question, choice_a..choice_d, answer: "A", data_id,
    data_type: "image"|"video", question_type_id, ...}]}``.

    Image questions read ``image_dir/{data_id}`` (extension added if missing); video questions point at
    ``video_dir/{data_id}`` (with the segment, if given, in ``meta``). Keep only some ``data_types`` to run
    the image part alone.
    """
    data = read_json(seed_json, "SEED-Bench.json", "https://huggingface.co/datasets/AILab-CVC/SEED-Bench")
    image_dir = require_dir(image_dir, "SEED-Bench image folder")
    if "video" in data_types and video_dir is None:
        raise ValueError("SEED-Bench video questions need video_dir; pass it or use data_types=('image',)")
    records = []
    for item in data["questions"]:
        if item["data_type"] not in data_types:
            continue
        is_video = item["data_type"] == "video"
        meta = {k: item[k] for k in ("question_type_id", "segment") if k in item}
        records.append(EvalRecord(
            id=str(item["question_id"]),
            question=item["question"],
            options=[item[f"choice_{letter}"] for letter in "abcd"],
            answers=[item["answer"]],
            images=[] if is_video else [image_dir / item["data_id"]],
            video=Path(video_dir) / item["data_id"] if is_video else None,
            meta=meta,
        ))
    return records


def _mmmu_image_path(value, image_dir: Path) -> Path | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict):  # Hugging Face exports write images as {"bytes": ..., "path": ...}
        value = value.get("path")
        if not value:
            raise ValueError("MMMU image fields must be file paths; this export embeds the image bytes only. "
                             "Save the images to files and write their paths into image_1..image_7")
    return image_dir / value


def load_mmmu(path: str | Path, image_dir: str | Path | None = None) -> list[EvalRecord]:
    """MMMU from a JSON (list) or JSON-lines export of its parquet files: ``{id, question, options:
    "['a', 'b']", answer, question_type: "multiple-choice"|"open", image_1..image_7: file path or null}``.

    Image paths are relative to ``image_dir`` (default: the export's folder). Open questions have no options
    and their answer is the answer text.
    """
    path = Path(path)
    hint = "export https://huggingface.co/datasets/MMMU/MMMU to json/jsonl with the images saved as files"
    rows = read_jsonl(path, "MMMU export", hint) if path.suffix == ".jsonl" else read_json(path, "MMMU export", hint)
    image_dir = require_dir(path.parent if image_dir is None else image_dir, "MMMU image folder")
    records = []
    for row in rows:
        options = row.get("options") or []
        if isinstance(options, str):
            options = ast.literal_eval(options)  # the parquet stores the list as its Python repr
        images = [_mmmu_image_path(row.get(f"image_{i}"), image_dir) for i in range(1, 8)]
        records.append(EvalRecord(
            id=str(row["id"]),
            question=row["question"],
            options=[str(o) for o in options],
            answers=[str(row["answer"])],
            images=[p for p in images if p is not None],
            meta={k: row[k] for k in ("question_type", "subfield", "topic_difficulty") if k in row},
        ))
    return records
