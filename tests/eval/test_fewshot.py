"""The few-shot runner with fake models: paper prompts, more shots help, resumable JSONL."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from emu2.eval.datasets import EvalRecord
from emu2.eval.fewshot import hateful_memes_prompt_for, most_common_answer, run_fewshot
from emu2.eval.rices import RICES, RandomSelector
from emu2.eval.scoring import score_hateful_memes

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def color_image(rgb):
    return Image.new("RGB", (4, 4), tuple(int(c) for c in rgb))


def mean_color(images):
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))


def color_records(prefix, count, seed):
    """Records whose image is a jittered colour and whose answer is that colour's name."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        name = list(COLORS)[i % 3]
        rgb = np.clip(np.array(COLORS[name]) + rng.integers(0, 40, size=3), 0, 255)
        records.append(EvalRecord(id=f"{prefix}{i}", question="what color is it?", answers=[name] * 10,
                                  meta={"rgb": tuple(int(c) for c in rgb)}))
    return records


def visuals(record):
    return [color_image(record.meta["rgb"])]


EXAMPLE_ANSWER = re.compile(r"short answer: ([^.]+)\. ")


def copy_last_example(prompts, images):
    """A fake model that repeats the answer of the in-context example right before the query."""
    return [(EXAMPLE_ANSWER.findall(p) or ["no idea"])[-1] for p in prompts]


def test_the_closest_example_makes_a_copying_model_right_and_rices_beats_random():
    queries, support = color_records("q", 12, seed=0), color_records("s", 30, seed=1)
    selector = RICES([r.id for r in support], lambda i: visuals(support[i])[0], mean_color)
    scores = run_fewshot(queries, support, copy_last_example, shots=[0, 4, 8, 16], selector=selector,
                         load_visuals=visuals)
    assert scores == {0: 0.0, 4: 1.0, 8: 1.0, 16: 1.0}
    random_scores = run_fewshot(queries, support, copy_last_example, shots=[4],
                                selector=RandomSelector([r.id for r in support], seed=0), load_visuals=visuals)
    assert random_scores[4] < 0.7


def majority_of_examples(prompts, images):
    """A fake model that answers with the majority answer of its examples ("no" on a tie)."""
    answers = []
    for prompt in prompts:
        counts = Counter(EXAMPLE_ANSWER.findall(prompt))
        answers.append("unknown" if not counts else "yes" if counts["yes"] > counts["no"] else "no")
    return answers


def test_more_random_shots_help_a_majority_vote_model():
    # Support answers are 70% "yes"; every query's answer is "yes". With k examples the vote is right when
    # more than k/2 of them say yes: P = 0.65 (k=4), 0.81 (k=8), 0.92 (k=16) in expectation.
    support = [EvalRecord(id=f"s{i}", question="is it?", answers=["yes" if i % 10 < 7 else "no"] * 10,
                          meta={"rgb": (0, 0, 0)}) for i in range(200)]
    queries = [EvalRecord(id=f"q{i}", question="is it?", answers=["yes"] * 10, meta={"rgb": (0, 0, 0)})
               for i in range(60)]
    scores = run_fewshot(queries, support, majority_of_examples, shots=[0, 4, 8, 16], load_visuals=visuals)
    assert scores[0] == 0.0
    assert scores[0] < scores[4] < scores[8] < scores[16]


def test_prompts_are_the_paper_strings_and_images_follow_placeholder_order(tmp_path):
    support = [EvalRecord(id="s0", question="how many dogs?", answers=["2"] * 6 + ["3"] * 4,
                          images=[tmp_path / "s0.png"]),
               EvalRecord(id="s1", question="is it raining?", answers=["no"] * 10, images=[tmp_path / "s1.png"])]
    query = EvalRecord(id="q0", question="what color is the bus?", answers=["red"] * 10,
                       images=[tmp_path / "q0.png"])
    for record, color in zip([*support, query], [(10, 0, 0), (20, 0, 0), (30, 0, 0)]):
        color_image(color).save(record.images[0])

    class FixedOrder:  # examples s0 then s1, whatever the query
        def select(self, query_ids, query_images, k):
            return [[0, 1][-k:] for _ in query_ids]

    seen = []

    def model(prompts, images):
        seen.extend(zip(prompts, [[im.getpixel((0, 0))[0] for im in ims] for ims in images]))
        return ["red"] * len(prompts)

    scores = run_fewshot([query], support, model, shots=[0, 2], selector=FixedOrder())
    assert scores == {0: 1.0, 2: 1.0}
    assert seen == [
        ("[<IMG_PLH>] based on the picture, answer in one word or phrase. what color is the bus? short answer:",
         [30]),
        (("[<IMG_PLH>] based on the picture, how many dogs? short answer: 2. "
         "[<IMG_PLH>] based on the picture, is it raining? short answer: no. "
         "[<IMG_PLH>] based on the picture, what color is the bus? short answer:"), [10, 20, 30]),
    ]


def test_in_context_examples_use_the_most_common_answer():
    assert most_common_answer(["3", "2", "2", "3", "2"]) == "2"
    assert most_common_answer(["a", "b"]) == "a"  # ties: the first given


class CountingModel:
    def __init__(self, fail_on_call=None):
        self.items = 0
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, prompts, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.items += len(prompts)
        return copy_last_example(prompts, images)


def test_a_rerun_only_answers_unfinished_items(tmp_path):
    queries, support = color_records("q", 10, seed=0), color_records("s", 20, seed=1)
    out = tmp_path / "preds.jsonl"
    kwargs = {"shots": [0, 4], "out_jsonl": out, "batch_size": 4, "load_visuals": visuals,
                  "selector": RandomSelector([r.id for r in support], seed=0)}

    crashing = CountingModel(fail_on_call=3)  # batch 1 answers shot 0 and shot 4 (2 calls), batch 2 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fewshot(queries, support, crashing, **kwargs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {(r["shot"], r["id"]) for r in rows} == {(k, f"q{i}") for k in (0, 4) for i in range(4)}

    resumed = CountingModel()
    scores = run_fewshot(queries, support, resumed, **kwargs)
    assert resumed.items == 20 - 8
    assert len(out.read_text().splitlines()) == 20

    finished = CountingModel()
    assert run_fewshot(queries, support, finished, **kwargs) == scores
    assert finished.calls == 0


def test_a_torn_last_line_is_redone(tmp_path):
    queries, support = color_records("q", 3, seed=0), color_records("s", 6, seed=1)
    out = tmp_path / "preds.jsonl"
    run_fewshot(queries, support, CountingModel(), shots=[0], out_jsonl=out, load_visuals=visuals)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # crash in the middle of the last write
    model = CountingModel()
    run_fewshot(queries, support, model, shots=[0], out_jsonl=out, load_visuals=visuals)
    assert model.items == 1


def test_rows_record_prediction_raw_text_and_examples(tmp_path):
    queries, support = color_records("q", 1, seed=0), color_records("s", 6, seed=1)
    out = tmp_path / "preds.jsonl"
    run_fewshot(queries, support, lambda p, i: [" Red.\nmore"] * len(p), shots=[2], out_jsonl=out,
                load_visuals=visuals)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["shot"], row["id"], row["prediction"], row["raw"]) == (2, "q0", "red", " Red.\nmore")
    assert len(row["examples"]) == 2 and row["prompt"].count("[<IMG_PLH>]") == 3


def test_hateful_memes_runs_as_yes_no_questions_scored_by_roc_auc():
    memes = [EvalRecord(id=str(i), text=f"meme {i}", label=i % 2, answers=["yes" if i % 2 else "no"],
                        meta={"rgb": (0, 0, 0)}) for i in range(6)]

    def model(prompts, images):  # P(yes) as a number: perfect ranking
        return ["0.9" if re.search(r'meme (\d+)". is it hateful\? short answer:$', p).group(1) in "135" else "0.2"
                for p in prompts]

    scores = run_fewshot(memes, memes, model, shots=[0, 2], metric=score_hateful_memes,
                         prompt_fn=hateful_memes_prompt_for, load_visuals=visuals)
    assert scores == {0: 1.0, 2: 1.0}


def test_wrong_number_of_answers_is_reported():
    queries = color_records("q", 2, seed=0)
    with pytest.raises(ValueError, match="returned 1 answers for 2 prompts"):
        run_fewshot(queries, queries, lambda p, i: ["x"], shots=[0], load_visuals=visuals)


def test_duplicate_record_ids_are_refused():
    queries = color_records("q", 2, seed=0)
    queries[1].id = queries[0].id
    with pytest.raises(ValueError, match="ids must be unique"):
        run_fewshot(queries, queries, copy_last_example, shots=[0], load_visuals=visuals)


def test_test_splits_run_without_a_metric(tmp_path):
    queries = [EvalRecord(id="q0", question="what?", meta={"rgb": (0, 0, 0)})]  # no answers: test-dev
    scores = run_fewshot(queries, queries, lambda p, i: ["x"], shots=[0], metric=None,
                         out_jsonl=tmp_path / "p.jsonl", load_visuals=visuals)
    assert np.isnan(scores[0]) and json.loads((tmp_path / "p.jsonl").read_text())["prediction"] == "x"
