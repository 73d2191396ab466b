"""The paper's metrics on hand-worked cases (expected values computed in the comments)."""

import pytest

from emu2.eval.metrics import (
    box_iou,
    exact_match,
    grounding_accuracy,
    multiple_choice_accuracy,
    normalize_answer,
    parse_choice,
    postprocess_answer,
    roc_auc,
    vqa_accuracy,
)


# ------------------------------------------------------------------------------------------ VQA score
# With 10 answers of which m match the prediction, each of the 10 leave-one-out subsets scores
# min(matches among the other 9 / 3, 1): a matching annotator left out leaves m-1 matches, another leaves m.
#   m=1: (1 * min(0/3, 1) + 9 * min(1/3, 1)) / 10 = (0 + 3) / 10   = 0.3
#   m=2: (2 * 1/3 + 8 * 2/3) / 10                 = (2/3 + 16/3)/10 = 0.6
#   m=3: (3 * 2/3 + 7 * 1) / 10                   = (2 + 7) / 10    = 0.9
#   m=4: (4 * 1 + 6 * 1) / 10                                       = 1.0
@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_answers_score_by_leave_one_out(matching, expected):
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_number_words_become_digits():
    # "two" -> "2", which 3 of 10 annotators gave: 0.9
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_articles_are_removed():
    # "the dog" -> "dog", 4 of 10 annotators: 1.0
    assert vqa_accuracy("the dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert normalize_answer("A red car") == "red car"


def test_trailing_period_is_dropped_when_annotators_disagree():
    # "yes." -> "yes", 9 of 10: 1.0
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)


def test_contractions_get_their_apostrophe():
    # "dont" -> "don't", 2 of 10: 0.6
    assert vqa_accuracy("dont", ["don't"] * 2 + ["no"] * 8) == pytest.approx(0.6)


def test_comma_inside_a_number_is_deleted():
    assert normalize_answer("1,000") == "1000"
    # "1,000" -> "1000", 3 of 10: 0.9
    assert vqa_accuracy("1,000", ["1000"] * 3 + ["100"] * 7) == pytest.approx(0.9)


def test_punctuation_touching_a_space_is_deleted_inside_a_word_becomes_space():
    assert normalize_answer("red, white") == "red white"
    assert normalize_answer("red,white") == "red white"
    assert normalize_answer("black-and-white") == "black and white"


def test_period_before_a_digit_is_kept_other_periods_go():
    assert normalize_answer("1.5") == "1.5"
    assert normalize_answer("2.") == "2"
    assert normalize_answer("e.g.") == "eg"


# Official vqaEval.py, v2.0 revision (2017; what OpenFlamingo and LAVIS ship), `evaluate`: the prediction goes
# through strip -> processPunctuation -> processDigitArticle every time; the ten answers are left as written when
# `len(set(gtAnswers)) == 1`, and otherwise get processPunctuation only. Expected scores worked by hand:
def test_official_2017_normalises_the_prediction_even_when_the_annotators_agree():
    # "Two." -> periodStrip -> "Two" -> lower -> manualMap "two" -> "2"; ten raw "2" all match: 1.0.
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    # "Yes" -> "yes", the raw "yes" matches: 1.0.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0


def test_official_2017_leaves_unanimous_answers_raw_so_a_comma_number_never_matches():
    # "1,000": commaStrip finds digit-comma-digit, so every mark is deleted -> "1000"; the ten answers stay
    # "1,000" (unanimous, so unprocessed): no match, 0.0.
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0
    # Unanimous answers are not even stripped: "yes " never equals the stripped prediction "yes".
    assert vqa_accuracy("yes", ["yes "] * 10) == 0.0


def test_official_2017_gives_disagreeing_answers_punctuation_processing_only():
    # Answers disagree -> processPunctuation only: "Two" keeps its capital and its spelling, while the
    # prediction "two" becomes "2": 0 matches among "Two" x4, "dog" x6 -> 0.0.
    assert vqa_accuracy("two", ["Two"] * 4 + ["dog"] * 6) == 0.0
    # "the dog" -> "dog" but the answers "the dog" keep their article: 0.0; "red,white" -> "red white" on both
    # sides (a mark inside a word becomes a space): 5 of 10 -> 1.0.
    assert vqa_accuracy("the dog", ["the dog"] * 5 + ["cat"] * 5) == 0.0
    assert vqa_accuracy("red,white", ["red,white"] * 5 + ["red"] * 5) == 1.0


def test_official_2021_revision_normalises_both_sides_only_when_the_annotators_disagree():
    # Last commit ("Fixed processing answers bug"): whitespace cleaned on both sides, then full normalisation
    # of both only if `len(set(gtAnswers)) > 1`.
    assert vqa_accuracy("Two.", ["2"] * 10, revision="2021") == 0.0  # raw "Two." vs raw "2"
    assert vqa_accuracy("1,000", ["1,000"] * 10, revision="2021") == 1.0  # raw vs raw
    assert vqa_accuracy(" yes\n", ["yes"] * 10, revision="2021") == 1.0
    # "two" -> "2" and "Two" -> "2": 4 of 10 -> 1.0 (0.0 in 2017, above).
    assert vqa_accuracy("two", ["Two"] * 4 + ["dog"] * 6, revision="2021") == 1.0
    with pytest.raises(ValueError, match="revision"):
        vqa_accuracy("yes", ["yes"], revision="2019")


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])


def test_exact_match_normalises_both_sides():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("the red car.", "red car") == 1.0
    assert exact_match("blue", "red") == 0.0


# ------------------------------------------------------------------------------- answer post-processing
@pytest.mark.parametrize("generated, expected", [
    (" Yes.", "yes"),
    ("two dogs\nbased on the picture", "two dogs"),
    ("red. [<IMG_PLH>] based on the picture, what", "red"),
    ("blue short answer: green", "blue"),
    ("short answer: Frisbee", "frisbee"),
    ("Answer: 3", "3"),
    ("st. louis", "st. louis"),
])
def test_postprocess_answer_keeps_only_the_short_answer(generated, expected):
    assert postprocess_answer(generated) == expected


# ------------------------------------------------------------------------------------------ ROC AUC
def test_roc_auc_of_perfect_and_inverted_ranking():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_roc_auc_worked_example():
    # positives 0.35, 0.8; negatives 0.1, 0.4. Pairs won: 0.35>0.1, 0.8>0.1, 0.8>0.4 = 3 of 4: 0.75
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_roc_auc_counts_ties_as_half():
    # positive 1 vs negatives 1 (tie: 1/2) and 0 (win: 1): (0.5 + 1) / 2 = 0.75
    assert roc_auc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)
    assert roc_auc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([0.1, 0.9], [1, 1])


# ---------------------------------------------------------------------------------- multiple choice
OPTIONS = ["One", "Two", "Three", "Four"]


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("B.", "B"), ("(C) three", "C"), ("D: four", "D"),
    ("The answer is A.", "A"), ("there are two towels", "B"), ("E", None), ("no idea", None),
])
def test_parse_choice_reads_the_letter_or_the_option_text(prediction, letter):
    assert parse_choice(prediction, OPTIONS) == letter


def test_a_leading_article_is_not_taken_for_a_letter():
    assert parse_choice("A dog", ["cat", "dog"]) == "B"
    assert parse_choice("B because it is", OPTIONS) == "B"


def test_multiple_choice_accuracy_counts_parsed_letters():
    # B right, "three" -> C wrong (answer A), unparseable wrong: 1/3
    predictions = ["B", "three", "hmm"]
    assert multiple_choice_accuracy(predictions, ["B", "A", "D"], [OPTIONS] * 3) == pytest.approx(1 / 3)


# -------------------------------------------------------------------------------------------- boxes
def test_box_iou_worked_examples():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # overlap 1x2 = 2; union 4 + 4 - 2 = 6
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_grounding_accuracy_counts_iou_of_one_half_and_misses_none():
    gt = [(0, 0, 2, 2)] * 3
    # IoU 2/4 = 0.5 (hit), IoU 1/3 (miss), no box (miss): 1/3
    predictions = [(0, 0, 2, 1), (1, 0, 3, 2), None]
    assert grounding_accuracy(predictions, gt) == pytest.approx(1 / 3)
