"""The paper's metrics (Table 9): VQA score, exact match, ROC AUC, multiple-choice accuracy, box IoU.

Every metric here scores one answer string (or one list of numbers); `emu2.eval.scoring` turns a benchmark's
records and predictions into its number. Scores are fractions in [0, 1]; reports multiply by 100.

The VQA normalisation reproduces the behaviour of the official VQA evaluation script (``vqaEval.py`` of the
VQA challenge, the version OpenFlamingo and LAVIS ship), quirks included, so our numbers are comparable with
the ones in the paper. See `vqa_accuracy` for the quirks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------------- VQA normalisation
# Apostrophe-less spellings -> the spelling the annotators mostly used (the official table; its entries with
# capital letters never match, because words are lower-cased first, so they are left out; its backwards
# "somebody'd" -> "somebodyd" is kept).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a look-ahead that never fires,
# so every period not followed by a digit goes ("2." -> "2", "e.g." -> "eg") and "1.5" keeps its period. The
# official call also passes re.UNICODE where `count` goes, so at most 32 periods are removed.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32


def _process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip periods.

    A mark touching a space (``"red, white"``) is deleted; a mark inside a word (``"red,white"``) becomes a
    space. If the text holds a digit-comma-digit (``"1,000"``) every mark is deleted, so it reads ``"1000"``.
    """
    out = text
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digits_and_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full VQA normalisation of one answer: whitespace, punctuation, case, number words, articles, contractions.

    >>> normalize_answer("The Two dogs.")
    '2 dogs'
    """
    return _process_digits_and_articles(_process_punctuation(_clean_whitespace(text)))


VQA_EVAL_REVISIONS = ("2017", "2021")


def vqa_accuracy(prediction: str, answers: Sequence[str], revision: str = "2017") -> float:
    """VQA score of one prediction against the annotators' answers (usually 10), in [0, 1].

    ``min(1, #other annotators who gave the prediction / 3)`` averaged over the leave-one-out subsets: each
    annotator in turn is left out and the prediction is matched against the remaining ones. With 10 answers of
    which ``m`` match: m=0 -> 0, m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9, m>=4 -> 1.

    Which strings are normalised, and when, follows the official ``vqaEval.py`` (GT-Vision-Lab/VQA) exactly,
    asymmetries included, in one of its two revisions:
      - "2017" (default; the v2.0 release, the copy OpenFlamingo and LAVIS ship, so the one comparable with
        the paper): the prediction is always normalised in full (whitespace, `_process_punctuation`, then
        `_process_digits_and_articles`). The answers are used as written (not even stripped) when they are all
        the same string; otherwise only their punctuation is processed (no lower-casing, no number words, no
        articles). So "Two." scores 1.0 against ten "2" but "1,000" scores 0.0 against ten "1,000" (the
        prediction becomes "1000"), and "two" scores 0.0 against answers "Two" that disagree with others.
      - "2021" (the repository's last commit): whitespace is cleaned on both sides; both are normalised in
        full only when the answers disagree, and compared raw when they agree.
    """
    if revision not in VQA_EVAL_REVISIONS:
        raise ValueError(f"unknown vqaEval.py revision {revision!r}; expected one of {VQA_EVAL_REVISIONS}")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer; this record has none")
    gold = list(answers)
    if revision == "2017":
        prediction = normalize_answer(prediction)
        if len(set(gold)) > 1:
            gold = [_process_punctuation(a) for a in gold]
    else:
        prediction, gold = _clean_whitespace(prediction), [_clean_whitespace(a) for a in gold]
        if len(set(gold)) > 1:
            prediction, gold = normalize_answer(prediction), [normalize_answer(a) for a in gold]
    matches = [a == prediction for a in gold]
    total = sum(matches)
    # Leaving out annotator i removes one match exactly when annotator i matched.
    scores = [min(1.0, (total - left_out) / 3.0) for left_out in matches]
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer are equal after `normalize_answer` (GQA, MSVD-QA, MSRVTT-QA), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


# ------------------------------------------------------------------------------- answer post-processing
# Text the model may echo after its answer: the next few-shot example's scaffolding or a chat role marker.
_ECHO = re.compile(r"short answer:|based on the picture|question:|answer:|\[<IMG_PLH>\]|\[IMG\]|\[USER\]", re.IGNORECASE)
_LEADING_ANSWER_LABEL = re.compile(r"^\s*(?:short answer|answer)\s*:\s*", re.IGNORECASE)


def postprocess_answer(text: str) -> str:
    """The short-answer clean-up applied to generated text before scoring.

    Keep the first line; drop a leading "short answer:"/"answer:" label; cut where the model starts echoing
    the prompt (``short answer:``, ``based on the picture``, ``question:``, ...); strip, lower-case, and drop
    trailing periods (the few-shot separator is ". ", so answers tend to end with one).

    >>> postprocess_answer(" Yes. based on the picture, what is")
    'yes'
    """
    text = text.strip().split("\n", 1)[0]
    text = _LEADING_ANSWER_LABEL.sub("", text)
    text = _ECHO.split(text, maxsplit=1)[0]
    return text.strip().lower().rstrip(".").strip()


# ------------------------------------------------------------------------------------------ ROC AUC
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values (N,)``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Hateful Memes), from ``scores (N,)`` and binary ``labels (N,)``.

    Mann-Whitney form: the probability that a random positive scores above a random negative, ties counting
    one half (average ranks).
    """
    scores_arr = np.asarray(scores, dtype=np.float64)
    labels_arr = np.asarray(labels)
    if scores_arr.shape != labels_arr.shape or scores_arr.ndim != 1:
        raise ValueError(f"roc_auc needs two 1-D sequences of equal length; got {scores_arr.shape} and "
                         f"{labels_arr.shape}")
    if not np.isin(labels_arr, (0, 1)).all():
        raise ValueError(f"roc_auc labels must be 0 or 1; got values {sorted(set(labels_arr.tolist()))}")
    positives = int(labels_arr.sum())
    negatives = len(labels_arr) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("roc_auc is undefined with only one class present; the labels need both 0s and 1s")
    ranks = _average_ranks(scores_arr)
    rank_sum = ranks[labels_arr == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


# ---------------------------------------------------------------------------------- multiple choice
_LETTER_FIRST = re.compile(r"^\(?([A-Z])(?:[).:,]|$)")
_LETTER_STATED = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([A-Z])\b")
_LETTER_THEN_SPACE = re.compile(r"^([A-Z])\s")


def parse_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none.

    Tried in order: a leading letter ("B", "B.", "(B) two"), a stated letter ("the answer is B"), the text of
    exactly one option appearing in the answer ("two towels" with option B "Two"), and last a leading letter
    followed by a space ("B because"), which comes last because "A dog" is more often the article.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = prediction.strip()
    for pattern in (_LETTER_FIRST, _LETTER_STATED):
        match = pattern.search(text)
        if match and match.group(1) in letters:
            return match.group(1)
    lowered = text.lower()
    named = [letter for letter, option in zip(letters, options) if option and option.lower() in lowered]
    if len(named) == 1:
        return named[0]
    match = _LETTER_THEN_SPACE.match(text)
    return match.group(1) if match and match.group(1) in letters else None


def multiple_choice_accuracy(
    predictions: Sequence[str], answers: Sequence[str], options: Sequence[Sequence[str]]
) -> float:
    """Fraction of predictions whose parsed letter (`parse_choice`) equals the answer letter (SEED-Bench, MMMU)."""
    if not (len(predictions) == len(answers) == len(options)):
        raise ValueError(f"got {len(predictions)} predictions, {len(answers)} answers and {len(options)} option "
                         "lists; they must be the same length")
    if not predictions:
        raise ValueError("multiple_choice_accuracy needs at least one prediction")
    correct = [parse_choice(p, o) == a.strip().upper() for p, a, o in zip(predictions, answers, options)]
    return sum(correct) / len(correct)


# -------------------------------------------------------------------------------------------- boxes
Box = tuple[float, float, float, float]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when both are empty)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    intersection = inter_w * inter_h
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - intersection
    return intersection / union if union > 0 else 0.0


def grounding_accuracy(
    pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]], threshold: float = 0.5
) -> float:
    """Referring-expression accuracy: fraction of predicted boxes with IoU >= ``threshold`` (RefCOCO's Acc@0.5).

    A missing prediction (None, e.g. an answer with no box tokens) counts as wrong.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"got {len(pred_boxes)} predicted boxes for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        raise ValueError("grounding_accuracy needs at least one box")
    hits = [p is not None and box_iou(p, g) >= threshold for p, g in zip(pred_boxes, gt_boxes)]
    return sum(hits) / len(hits)
