"""The few-shot runner (paper section 3.1, Table 1): k in-context examples per query, k in {0, 4, 8, 16}.

Model-independent: the model enters through ``answer_fn`` and, for RICES, the selector's ``encode``.

The answer_fn contract::

    answer_fn(prompts: list[str], images: list[list[PIL.Image.Image]]) -> list[str]

``prompts[i]`` holds `emu2.processing` placeholders (``[<IMG_PLH>]``, ``[<VID_PLH>]``), not expanded;
``images[i]`` are its visuals in placeholder order (the examples' images, then the query's). It returns one
generated text per prompt; the runner post-processes it (`emu2.eval.metrics.postprocess_answer`) and scores.

Predictions are appended to a JSONL file as they come, one row per (shot, id); a rerun with the same file
skips the rows already there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from emu2.eval.datasets import EvalRecord, load_images
from emu2.eval.metrics import postprocess_answer
from emu2.eval.prompts import (
    chat_multiple_choice_prompt,
    chat_vqa_prompt,
    fewshot_vqa_prompt,
    hateful_memes_question,
)
from emu2.eval.rices import ExampleSelector, RandomSelector
from emu2.eval.scoring import score_vqa
from emu2.processing import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

logger = logging.getLogger(__name__)

AnswerFn = Callable[[list[str], list[list[Image.Image]]], list[str]]
PromptFn = Callable[[EvalRecord, Sequence[EvalRecord]], str]
MetricFn = Callable[[list[str], list[EvalRecord]], float]
PAPER_SHOTS = (0, 4, 8, 16)  # Table 1


# ----------------------------------------------------------------------------- record -> prompt adapters
def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave (the first of those tied): an in-context example's answer."""
    if not answers:
        raise ValueError("an in-context example needs an answer; this support record has none")
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a])  # max keeps the first of equal counts


def vqa_prompt_for(query: EvalRecord, examples: Sequence[EvalRecord]) -> str:
    """The paper's VQA prompt (`emu2.eval.prompts.fewshot_vqa_prompt`) for a query record and example records."""
    return fewshot_vqa_prompt(query.question, [(e.question, most_common_answer(e.answers)) for e in examples])


def hateful_memes_prompt_for(query: EvalRecord, examples: Sequence[EvalRecord]) -> str:
    """Hateful Memes as yes/no questions in the paper's VQA template."""
    return fewshot_vqa_prompt(hateful_memes_question(query.text),
                              [(hateful_memes_question(e.text), e.answers[0]) for e in examples])


def chat_vqa_prompt_for(query: EvalRecord, examples: Sequence[EvalRecord]) -> str:
    """Emu2-Chat short-answer prompt (zero-shot only: Table 2)."""
    _zero_shot_only(examples)
    return chat_vqa_prompt(query.question, num_images=len(query.images))


def chat_multiple_choice_prompt_for(query: EvalRecord, examples: Sequence[EvalRecord]) -> str:
    """Emu2-Chat multiple-choice prompt for image questions (zero-shot only)."""
    _zero_shot_only(examples)
    return chat_multiple_choice_prompt(query.question, query.options, num_images=len(query.images))


def _zero_shot_only(examples: Sequence[EvalRecord]) -> None:
    if examples:
        raise ValueError("Emu2-Chat prompts are zero-shot; run them with shots=[0]")


# ------------------------------------------------------------------------------------------ the runner
def _read_finished(path: Path | None) -> dict[tuple[int, str], str]:
    """(shot, id) -> prediction for the rows already in the JSONL; a torn last line (a crash) is skipped."""
    finished: dict[tuple[int, str], str] = {}
    if path is None or not path.exists():
        return finished
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            finished[(int(row["shot"]), str(row["id"]))] = row["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("skipping unreadable line %d of %s (it will be redone)", number, path)
    return finished


def _check_visual_count(prompt: str, images: list[Image.Image]) -> None:
    placeholders = prompt.count(IMAGE_PLACEHOLDER) + prompt.count(VIDEO_PLACEHOLDER)
    if placeholders != len(images):
        raise ValueError(f"the prompt has {placeholders} image/frame placeholders but {len(images)} images go with "
                         f"it; the prompt function and the record's images disagree. Prompt: {prompt[:200]!r}")


def _prompt_with_images(record: EvalRecord, support: Sequence[EvalRecord], indices: list[int], prompt_fn: PromptFn,
                        query_visuals: list[Image.Image], example_visuals: dict[int, list[Image.Image]],
                        load_visuals: Callable[[EvalRecord], list[Image.Image]]) -> tuple[str, list[Image.Image]]:
    """The prompt of ``record`` after the examples ``support[i]`` for ``i`` in ``indices``, and its images in
    placeholder order (the examples' first); ``example_visuals`` caches them by index across queries."""
    for i in indices:
        if i not in example_visuals:
            example_visuals[i] = load_visuals(support[i])
    prompt = prompt_fn(record, [support[i] for i in indices])
    images = [im for i in indices for im in example_visuals[i]] + query_visuals
    _check_visual_count(prompt, images)
    return prompt, images


def _checked_shots(records: Sequence[EvalRecord], shots: Sequence[int]) -> list[int]:
    """``shots`` sorted and deduplicated; raises on negative shot counts or duplicate record ids."""
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("record ids must be unique; found duplicates such as "
                         f"{next(i for i in ids if ids.count(i) > 1)!r}")
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 0:
        raise ValueError(f"shots must be non-negative integers; got {shots}")
    return shots


def _select_examples(selector, todo: dict[int, list], visuals: dict, max_shot: int) -> dict[str, list[int]]:
    """For each query of ``todo`` that needs examples (k > 0): the indices of its ``max_shot`` examples."""
    query_ids = list({r.id: None for k, records in todo.items() if k > 0 for r in records})
    if not query_ids:
        return {}
    query_images = [visuals[rid][0] if visuals[rid] else None for rid in query_ids]
    return dict(zip(query_ids, selector.select(query_ids, query_images, max_shot)))


def _open_predictions(out_jsonl):
    """``(path, the answers it already holds by (shot, id), the file opened to append)``; all None or empty
    without a predictions file."""
    if out_jsonl is None:
        return None, {}, None
    path = Path(out_jsonl)
    finished = _read_finished(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, finished, path.open("a", encoding="utf-8")


def _keep_answers(k, records, prompts, generated, example_ids, postprocess, finished: dict, out_file) -> None:
    """Store the ``k``-shot answers of ``records`` in ``finished`` and, when writing, one JSON line each."""
    for record, prompt, raw, used in zip(records, prompts, generated, example_ids):
        finished[(k, record.id)] = postprocess(raw)
        if out_file is not None:
            row = {"shot": k, "id": record.id, "prediction": finished[(k, record.id)], "raw": raw,
                   "examples": used, "prompt": prompt}
            out_file.write(json.dumps(row, ensure_ascii=False) + "\n")
    if out_file is not None:
        out_file.flush()


def run_fewshot(
    records: Sequence[EvalRecord],
    support_records: Sequence[EvalRecord],
    answer_fn: AnswerFn,
    shots: Sequence[int] = PAPER_SHOTS,
    selector: ExampleSelector | None = None,
    out_jsonl: str | Path | None = None,
    batch_size: int = 8,
    metric: MetricFn | None = score_vqa,
    prompt_fn: PromptFn = vqa_prompt_for,
    postprocess: Callable[[str], str] = postprocess_answer,
    load_visuals: Callable[[EvalRecord], list[Image.Image]] = load_images,
    seed: int = 0,
) -> dict[int, float]:
    """Answer every record with k in-context examples for each k in ``shots``; return ``{k: score in [0, 1]}``.

    Args:
        records: the evaluation items (ids unique).
        support_records: where in-context examples come from (usually the training split).
        answer_fn: the model, see the module docstring.
        shots: numbers of in-context examples (Table 1: 0, 4, 8, 16).
        selector: picks examples (`RICES` as in the paper, or `RandomSelector`); default: random with ``seed``.
            The k-shot examples are the last k of the max(shots) selection, so with RICES the closest example
            is always right before the query and smaller prompts are suffixes of larger ones.
        out_jsonl: predictions file (appended to; rows already there are not redone). None: keep in memory.
        batch_size: queries per ``answer_fn`` call (each call has one k).
        metric: ``(predictions, records) -> score`` (`emu2.eval.scoring`); None for splits without ground truth
            (VQAv2 test-dev): the scores are then NaN and the predictions are in ``out_jsonl``.
        prompt_fn: ``(query, examples) -> prompt`` (default: the paper's VQA prompt).
        postprocess: applied to each generated text before it is stored and scored.
        load_visuals: a record's images (or video frames), in placeholder order.

    Most of its length is the arguments above; the loop is one pass over batches and shot counts that skips
    what ``out_jsonl`` already holds and writes each answer as it comes, so an interrupted run loses nothing.
    """
    shots = _checked_shots(records, shots)
    max_shot = shots[-1]
    if max_shot > 0 and selector is None:
        selector = RandomSelector([r.id for r in support_records], seed=seed)
    out_path, finished, out_file = _open_predictions(out_jsonl)
    wanted = {(k, r.id) for k in shots for r in records}
    done_before = len(wanted & finished.keys())
    if done_before:
        logger.info("resuming: %d of %d (shot, id) items already in %s", done_before, len(wanted), out_path)
    progress = tqdm(total=len(wanted), initial=done_before, desc="few-shot", unit="item")
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            todo = {k: [r for r in batch if (k, r.id) not in finished] for k in shots}
            if not any(todo.values()):
                continue
            needed = {r.id: r for k in shots for r in todo[k]}
            visuals = {rid: load_visuals(r) for rid, r in needed.items()}
            selections = _select_examples(selector, todo, visuals, max_shot)
            example_visuals: dict[int, list[Image.Image]] = {}
            for k in shots:
                if not todo[k]:
                    continue
                prompts, images, example_ids = [], [], []
                for record in todo[k]:  # the k-shot examples: the last k of the max_shot selection
                    indices = selections[record.id][max_shot - k:] if k else []
                    prompt, prompt_images = _prompt_with_images(record, support_records, indices, prompt_fn,
                                                                visuals[record.id], example_visuals, load_visuals)
                    prompts.append(prompt)
                    images.append(prompt_images)
                    example_ids.append([support_records[i].id for i in indices])
                generated = answer_fn(prompts, images)
                if len(generated) != len(prompts):
                    raise ValueError(f"answer_fn returned {len(generated)} answers for {len(prompts)} prompts")
                _keep_answers(k, todo[k], prompts, generated, example_ids, postprocess, finished, out_file)
                progress.update(len(prompts))
    finally:
        progress.close()
        if out_file is not None:
            out_file.close()
    if metric is None:
        return {k: float("nan") for k in shots}
    return {k: metric([finished[(k, r.id)] for r in records], list(records)) for k in shots}
