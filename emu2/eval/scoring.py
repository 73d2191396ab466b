"""A benchmark's number from its records and the model's (post-processed) predictions (paper Table 9).

Each scorer is ``(predictions: list[str], records: list[EvalRecord]) -> float in [0, 1]``, the ``metric``
that `emu2.eval.fewshot.run_fewshot` takes:
  VQAv2, OKVQA, VizWiz, TextVQA   `score_vqa`              VQA score
  GQA, MSVD-QA, MSRVTT-QA          `score_exact_match`      EM
  Hateful Memes                    `score_hateful_memes`    ROC AUC
  SEED-Bench, MMMU                 `score_multiple_choice`  accuracy
  RefCOCO/+/g                      `score_grounding`        Acc@0.5
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from emu2.eval.datasets import EvalRecord
from emu2.eval.datasets.record import IMAGE_SUFFIXES, resolve_media_path
from emu2.eval.metrics import exact_match, grounding_accuracy, multiple_choice_accuracy, vqa_accuracy
from emu2.eval.metrics import roc_auc as _roc_auc
from emu2.processing import parse_box


def _check(predictions: Sequence[str], records: Sequence[EvalRecord]) -> None:
    if len(predictions) != len(records):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} records")
    if not records:
        raise ValueError("nothing to score: no records")
    unanswered = [r.id for r in records if not r.answers and r.box is None and r.label is None]
    if unanswered:
        raise ValueError(f"{len(unanswered)} records have no ground truth (e.g. {unanswered[0]!r}); test splits "
                         "such as VQAv2 test-dev are scored by the benchmark's server, not here")


def score_vqa(predictions: Sequence[str], records: Sequence[EvalRecord]) -> float:
    """Mean `vqa_accuracy` against each record's annotator answers."""
    _check(predictions, records)
    return sum(vqa_accuracy(p, r.answers) for p, r in zip(predictions, records)) / len(records)


def score_exact_match(predictions: Sequence[str], records: Sequence[EvalRecord]) -> float:
    """Fraction of predictions equal (after normalisation) to one of the record's answers."""
    _check(predictions, records)
    hits = [max(exact_match(p, a) for a in r.answers) for p, r in zip(predictions, records)]
    return sum(hits) / len(hits)


_NUMBER = re.compile(r"^\s*(?:0(?:\.\d+)?|1(?:\.0+)?)\s*$")


def yes_score(prediction: str) -> float:
    """A hatefulness score from an answer: a probability written as a number ("0.83") is used as is, else a
    leading "yes" is 1, "no" is 0 and anything else 0.5.

    ROC AUC ranks items by score, so the paper-comparable number needs P("yes"): let the answer function
    return it as a decimal string. Plain yes/no answers give a coarser AUC.
    """
    if _NUMBER.match(prediction):
        return float(prediction)
    words = prediction.strip().lower().split()
    first = words[0].strip(".,!") if words else ""
    return {"yes": 1.0, "no": 0.0}.get(first, 0.5)


def score_hateful_memes(predictions: Sequence[str], records: Sequence[EvalRecord]) -> float:
    """ROC AUC of `yes_score` against the hateful labels."""
    _check(predictions, records)
    return _roc_auc([yes_score(p) for p in predictions], [int(r.label) for r in records])


def score_multiple_choice(predictions: Sequence[str], records: Sequence[EvalRecord]) -> float:
    """Accuracy of the option letter parsed from each prediction (`emu2.eval.metrics.parse_choice`)."""
    _check(predictions, records)
    return multiple_choice_accuracy(predictions, [r.answers[0] for r in records], [r.options for r in records])


def _image_size(record: EvalRecord) -> tuple[float, float]:
    if "width" in record.meta and "height" in record.meta:
        return float(record.meta["width"]), float(record.meta["height"])
    with Image.open(resolve_media_path(record.images[0], IMAGE_SUFFIXES)) as image:  # reads the header only
        return float(image.width), float(image.height)


def score_grounding(predictions: Sequence[str], records: Sequence[EvalRecord]) -> float:
    """Acc@0.5 of the first box in each answer (coordinate tokens, `emu2.processing.parse_box`) in pixels."""
    _check(predictions, records)
    boxes = [parse_box(p, *_image_size(r)) for p, r in zip(predictions, records)]
    return grounding_accuracy(boxes, [r.box for r in records])
