"""Referring expressions: RefCOCO, RefCOCO+ and RefCOCOg, scored by box IoU >= 0.5.

The official release keeps the referring expressions in a pickle (``refs(unc).p``), which we do not load;
read a preprocessed JSON-lines file instead, one expression per line:
``{"image": "COCO_train2014_000000581857.jpg", "sentence": "the lady with the blue shirt",
"bbox": [x, y, w, h], "id": ..., "width": ..., "height": ...}`` (id, width, height optional).
"""

from __future__ import annotations

from pathlib import Path

from .record import EvalRecord, read_jsonl, require_dir


def load_refcoco(jsonl: str | Path, image_dir: str | Path) -> list[EvalRecord]:
    """RefCOCO/+/g expressions -> records with ``question`` = the expression and ``box`` in (x1, y1, x2, y2).

    ``bbox`` is COCO's ``[x, y, width, height]`` in pixels. Image width/height, when given, go to ``meta``.
    """
    rows = read_jsonl(jsonl, "RefCOCO expressions (jsonl)", "write one {image, sentence, bbox} object per line")
    image_dir = require_dir(image_dir, "RefCOCO (COCO train2014) image folder")
    records = []
    for index, row in enumerate(rows):
        missing = [key for key in ("image", "sentence", "bbox") if key not in row]
        if missing:
            raise ValueError(f"{jsonl}, line {index + 1}: missing {missing}; each line needs image, sentence and "
                             "bbox [x, y, w, h]")
        x, y, w, h = (float(v) for v in row["bbox"])
        records.append(EvalRecord(
            id=str(row.get("id", index)),
            question=row["sentence"],
            images=[image_dir / row["image"]],
            box=(x, y, x + w, y + h),
            meta={k: row[k] for k in ("width", "height") if k in row},
        ))
    return records
