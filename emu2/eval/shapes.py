"""The shapes benchmark: the paper's Table 1 / Figure 1 analogue on the procedural shapes world.

Tasks (all on held-out material: attribute combinations, answer formats and label words never trained on):
- few-shot: the `eval/episodes.json` episodes of `emu2 data shapes` at k = 0, 1, 2, 4, 8 shots, with the base
  model; exact match and per-field accuracy of the answer (e.g. "[red; 3; top left]" has three fields);
- with an instruction-tuned (chat) model, on freshly rendered held-out scenes with known answers: VQA (the
  chat data's short-answer format), captioning (attribute recall), grounding (box from "Where is the X?
  Give its box.", accuracy at IoU >= 0.5) and video QA (what happened: event words recalled).
Generation attribute accuracy (pixels read back by `emu2.data.shapes.detect`) is `emu2.eval.shapes_generation`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import processing as P
from .intervals import format_interval, with_interval
from .metrics import box_iou

_FIELDS = re.compile(r"[^\w\s]+")


# What ends an answer: the next image, the end of sequence, a new line, or the examples' separator (the world's
# answers contain no "." of their own, so the answer is what comes before the first one).
ANSWER_STOPS = (P.BOI, "</s>", "\n", ".")


def _cut_answer(text: str) -> str:
    """The generated continuation up to the end of the answer (the first of `ANSWER_STOPS`)."""
    for stop in ANSWER_STOPS:
        text = text.split(stop)[0]
    return text.strip()


def _fields(answer: str) -> list[str]:
    return [f.strip() for f in _FIELDS.split(answer.lower()) if f.strip()]


def field_accuracy(prediction: str, answer: str) -> float:
    """Fraction of the answer's fields (split at punctuation) found at the same place in the prediction."""
    want, got = _fields(answer), _fields(prediction)
    if not want:
        return float(prediction.strip() == answer.strip())
    return sum(w == g for w, g in zip(want, got)) / len(want)


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


@torch.no_grad()
def greedy_answers(pipe, batch: dict, max_new_tokens: int = 24) -> list[str]:
    """The greedy answer of each row of an encoded prompt batch (`pipe.encode`), cut at `ANSWER_STOPS`."""
    # Decoding stops once every row has ended its answer: what follows is cut anyway (`_cut_answer`).
    ids = pipe.model.generate_text(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   stop_strings=list(ANSWER_STOPS), tokenizer=pipe.tokenizer)
    return [_cut_answer(text) for text in pipe.tokenizer.batch_decode(ids, skip_special_tokens=False)]


def evaluate_fewshot(pipe, data_dir: str | Path, shots: Sequence[int] = (0, 1, 2, 4, 8),
                     max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Few-shot accuracy per held-out split and shot count on the dataset's evaluation episodes.

    Returns ``{split: {shots: {"exact": float, "fields": float, "nll": float, "n": int, "exact_ci95": [lo, hi],
    "fields_ci95": [lo, hi]}}}`` plus ``"all"`` over splits; ``nll`` is the gold answer's mean per-token negative
    log-likelihood (`answer_nll`); the intervals are 95 % (Wilson for exact match, normal for field accuracy).
    """
    from ..data.shapes import fewshot_prompt

    episodes_path = Path(data_dir) / "eval" / "episodes.json"
    episodes = json.loads(episodes_path.read_text())["episodes"]
    root = episodes_path.parent
    prompts = []  # (split, shots, prompt text, images, answer)
    for ep in episodes:
        for k in shots:
            if k > len(ep["support"]):
                continue
            for q in range(len(ep["queries"])):
                text, images, answer = fewshot_prompt(ep, k, q)
                prompts.append((ep["split"], k, text, [Image.open(root / im).convert("RGB") for im in images], answer))
    # Batches of one shot count: rows are left-padded to the longest in the batch, so mixing 0-shot with 8-shot
    # prompts would cost every row the 8-shot prefill.
    prompts.sort(key=lambda c: c[1])
    items: dict = {}  # split -> shots -> metric -> per-query scores
    for start in tqdm(range(0, len(prompts), batch_size), desc="shapes few-shot", leave=False):
        chunk = prompts[start:start + batch_size]
        batch = pipe.encode([c[2] for c in chunk], [im for c in chunk for im in c[3]])
        predictions = greedy_answers(pipe, batch, max_new_tokens)
        nlls = answer_nll(pipe, [c[2] for c in chunk], [c[4] for c in chunk], batch["images"])
        for (split, k, _, _, answer), prediction, nll in zip(chunk, predictions, nlls):
            for key in (split, "all"):
                cell = items.setdefault(key, {}).setdefault(k, {"exact": [], "fields": [], "nll": []})
                cell["exact"].append(float(_normal(prediction) == _normal(answer)))
                cell["fields"].append(field_accuracy(prediction, answer))
                cell["nll"].append(nll)
    scores: dict = {}
    for key, per_shot in items.items():
        for k, cell in per_shot.items():
            exact, fields = with_interval(cell["exact"]), with_interval(cell["fields"])
            scores.setdefault(key, {})[k] = {
                "exact": exact["value"], "fields": fields["value"], "nll": round(sum(cell["nll"]) / len(cell["nll"]), 4),
                "n": len(cell["exact"]), "exact_ci95": exact["ci95"], "fields_ci95": fields["ci95"]}
    return scores


@torch.no_grad()
def answer_nll(pipe, prompts: Sequence[str], answers: Sequence[str], images: torch.Tensor | None) -> list[float]:
    """Mean negative log-likelihood (nats per token) of each gold answer, with its closing separator, given its
    prompt: how well the model predicts the answer when it is teacher-forced, not only whether greedy decoding
    hits it. An in-context learner's answer NLL falls as examples are added, even before its answers are exact.

    prompts/answers: one per row; images: the (N, 3, S, S) pixels of all the prompts' placeholders, in order.
    """
    from ..data.shapes.tasks import example_text

    fulls = [p + (" " if p and not p.endswith(P.IMAGE_PLACEHOLDER) else "") + example_text("", a)
             for p, a in zip(prompts, answers)]
    cfg = pipe.model.config

    def token_count(text: str) -> int:
        return len(pipe.tokenizer(P.expand_placeholders(text, cfg.n_query, cfg.v_query))["input_ids"])

    batch = pipe.encode(fulls) if images is None else pipe.encode(fulls, list(images))
    logits = pipe.model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    out = []
    for row, (prompt, full) in enumerate(zip(prompts, fulls)):
        n = token_count(full) - token_count(prompt)  # left padding: the answer is the row's last n tokens
        picked = logprobs[row, -n:].gather(-1, targets[row, -n:, None])
        out.append(float(-picked.mean()))
    return out


def copy_accuracy(pipe, sequences: int = 64, seed: int = 999, batch_size: int = 16, words: str = "made-up",
                  gap: int = 0) -> dict:
    """Whether the language model copies (the induction that binding a new label word needs): text-only word lists
    followed by their exact repeat. Only the repeat is scored: its next-token accuracy (teacher-forced argmax) and
    mean NLL (nats/token). Without copying the repeat is unpredictable (accuracy near 0); a model that copies gets
    it right from its second token on.

    ``words``: "made-up" (lists of 6-14 fresh syllable words, `nonce_word`) or "held-out" (4-8 of the held-out
    split's label words, never in training: a model that copies only the pieces it was taught to copy fails them).
    ``gap``: that many scene sentences (about 11 tokens each) between the list and its repeat, as far as a few-shot
    query is from the example it must copy from.
    """
    from ..data.shapes.tasks import HELDOUT_LABEL_WORDS, ShapesMaker, nonce_word
    from ..data.shapes.world import World

    rng = random.Random(seed)
    if words == "made-up":
        lists = [" ".join(nonce_word(rng) for _ in range(rng.randint(6, 14))) + "." for _ in range(sequences)]
    elif words == "held-out":
        lists = [" ".join(rng.sample(HELDOUT_LABEL_WORDS, rng.randint(4, 8))) + "." for _ in range(sequences)]
    else:
        raise ValueError(f'words must be "made-up" or "held-out", not {words!r}')
    between = [""] * sequences
    if gap:
        maker = ShapesMaker(World.from_seed(0))
        between = [maker.scene_sentences(random.Random(f"{seed}:gap:{i}"), gap) for i in range(sequences)]
    hits = total = 0
    nll = 0.0
    for start in range(0, sequences, batch_size):
        firsts = lists[start:start + batch_size]
        heads = [f"{first} {gap_text}".rstrip() for first, gap_text in zip(firsts, between[start:start + batch_size])]
        fulls = [f"{head} {first}" for head, first in zip(heads, firsts)]
        batch = pipe.encode(fulls)
        with torch.no_grad():
            logits = pipe.model(batch["input_ids"], batch["attention_mask"]).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, 1:]
        for row, (head, full) in enumerate(zip(heads, fulls)):
            n = len(pipe.tokenizer(full)["input_ids"]) - len(pipe.tokenizer(head)["input_ids"])
            picked = targets[row, -n:]  # left padding: the repeat is the row's last n tokens
            hits += int((logprobs[row, -n:].argmax(-1) == picked).sum())
            nll += float(-logprobs[row, -n:].gather(-1, picked[:, None]).sum())
            total += n
    return {"copy_accuracy": round(hits / total, 4), "copy_nll": round(nll / total, 4), "sequences": sequences}


# ------------------------------------------------------------------------------------ instruction tasks
def _chat(pipe, messages_images: list[tuple[str, list, list]], system: str | None, max_new_tokens: int) -> list[str]:
    prompts = [P.chat_prompt([m], system=system) for m, _, _ in messages_images]
    batch = pipe.encode(prompts, [im for _, ims, _ in messages_images for im in ims],
                        [fr for _, _, frs in messages_images for fr in frs])
    ids = pipe.model.generate_text(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.split("</s>")[0].strip() for t in pipe.tokenizer.batch_decode(ids, skip_special_tokens=False)]


def evaluate_instructions(pipe, data_dir: str | Path, items: int = 32, seed: int = 1234,
                          batch_size: int = 32) -> dict:
    """VQA, captioning, grounding and video QA of a chat model on ``items`` rendered held-out scenes each.

    Returns each task's score (a fraction) plus ``"ci95": {task: [low, high]}`` (95 % intervals: Wilson for
    the 0/1 scores, normal for the recalls)."""
    from ..data.shapes.render import render_scene
    from ..data.shapes.tasks import VQA_QUESTIONS, attribute_value, video_event, video_frames
    from ..data.shapes.world import COLOURS, SHAPES, World, describe

    manifest = json.loads((Path(data_dir) / "dataset.json").read_text())
    world = World.from_seed(manifest.get("seed", 0))
    size = manifest.get("image_size", pipe.model.config.vision_config.image_size)
    rng = random.Random(seed)
    short = P.SHORT_ANSWER_SYSTEM_MESSAGE
    vqa, captions, grounding, video = [], [], [], []
    for _ in range(items):
        scene = world.group_scene(rng, "heldout")
        image = render_scene(scene, size)
        question = rng.choice(sorted(VQA_QUESTIONS))
        ask = VQA_QUESTIONS[question][0].upper() + VQA_QUESTIONS[question][1:]
        vqa.append((f"{P.IMAGE_PLACEHOLDER}{ask}\nAnswer the question using a single word or phrase.", [image], [],
                    attribute_value(scene, question)))
        g = scene.groups[0]
        captions.append((f"{P.IMAGE_PLACEHOLDER}Describe the image in detail.", [image], [],
                         {g.shape, g.colour, scene.position(g), scene.background}))
        multi = world.multi_scene(rng, "heldout", objects=rng.randint(2, 3))
        target = rng.choice(multi.groups)
        grounding.append((f"{P.IMAGE_PLACEHOLDER}Where is the {describe(target, article='').strip()}? Give its box.",
                          [render_scene(multi, size)], [], target.box))
        (start, end), _event, predicate = video_event(world, scene, rng, "heldout")
        video.append((f"{P.VIDEO_TOKEN}{P.VIDEO_PLACEHOLDER * 8}What happens in the video?", [],
                      video_frames(start, end, 8, size), set(predicate.replace(",", "").split()) - {"the", "to", "from"}))

    def run(tasks, system, max_new_tokens):
        out = []
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start:start + batch_size]
            out += _chat(pipe, [(m, ims, frs) for m, ims, frs, _ in chunk], system, max_new_tokens)
        return out

    per_item = {}
    answers = run(vqa, short, 8)
    per_item["vqa_exact"] = [float(_normal(_cut_answer(a)) == _normal(t[3])) for a, t in zip(answers, vqa)]
    answers = run(captions, P.CHAT_SYSTEM_MESSAGE, 32)
    per_item["caption_attribute_recall"] = [len({w for w in t[3] if w in a.lower()}) / len(t[3])
                                            for a, t in zip(answers, captions)]
    answers = run(grounding, short, 8)
    boxes = [P.parse_box(a) for a in answers]
    per_item["grounding_acc_iou50"] = [float(b is not None and box_iou(b, t[3]) >= 0.5)
                                       for b, t in zip(boxes, grounding)]
    per_item["grounding_parsed"] = [float(b is not None) for b in boxes]
    answers = run(video, P.CHAT_SYSTEM_MESSAGE, 24)
    per_item["video_event_recall"] = [len({w for w in t[3] if w in a.lower()}) / max(1, len(t[3]))
                                      for a, t in zip(answers, video)]
    results = {}
    for name, scores in per_item.items():
        cell = with_interval(scores)
        results[name] = cell["value"]
        results.setdefault("ci95", {})[name] = cell["ci95"]
    # Chance levels, to read the numbers against: one shape of 8, one colour of 9.
    results["chance"] = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS)}
    results["items"] = items
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}


def _fewshot_cell(cell: dict) -> str:
    if "exact_ci95" not in cell:
        return f"{100 * cell['exact']:.1f} ({100 * cell['fields']:.1f})"
    return (f"{format_interval({'value': cell['exact'], 'ci95': cell['exact_ci95']})} "
            f"({format_interval({'value': cell['fields'], 'ci95': cell['fields_ci95']})})")


def fewshot_table(scores: dict) -> str:
    """Markdown: rows = shots, columns = held-out splits: exact match % [95 % interval], then field accuracy %
    [95 % interval] in brackets."""
    splits = [s for s in scores if s != "all"] + ["all"]
    shots = sorted({k for s in splits for k in scores[s]}, key=int)
    lines = ["| shots | " + " | ".join(splits) + " |", "|---:|" + "---:|" * len(splits)]
    for k in shots:
        cells = [_fewshot_cell(scores[s][k]) if k in scores[s] else "-" for s in splits]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if all("nll" in scores[s][k] for s in splits for k in scores[s]):
        lines += ["", "Gold-answer NLL (nats/token, lower is better):", "",
                  "| shots | " + " | ".join(splits) + " |", "|---:|" + "---:|" * len(splits)]
        for k in shots:
            cells = [f"{scores[s][k]['nll']:.2f}" if k in scores[s] else "-" for s in splits]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_shots(scores: dict, path: str | Path) -> None:
    """PNG of exact-match and field accuracy against the number of shots, one line per held-out split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in ("exact", "fields", "nll") if all(m in c for per in scores.values() for c in per.values())]
    labels = {"exact": "exact match (%)", "fields": "field accuracy (%)", "nll": "gold-answer NLL (nats/token)"}
    fig = Figure(figsize=(4 * len(metrics), 3.4))
    FigureCanvasAgg(fig)
    for index, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), index + 1)
        scale = 1 if metric == "nll" else 100
        for split, per_shot in scores.items():
            shots = sorted(per_shot, key=int)
            ax.plot(shots, [scale * per_shot[k][metric] for k in shots], marker="o", label=split,
                    linewidth=2.5 if split == "all" else 1.2)
        ax.set_xlabel("shots (in-context examples)")
        ax.set_ylabel(labels[metric])
        if metric != "nll":
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("shapes world: held-out few-shot accuracy vs shots")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


def instructions_table(results: dict) -> str:
    """Markdown: one row per chat task, score % [95 % interval]."""
    names = {"vqa_exact": "VQA exact match", "caption_attribute_recall": "caption attribute recall",
             "grounding_acc_iou50": "grounding accuracy (IoU >= 0.5)", "grounding_parsed": "grounding answers parsed",
             "video_event_recall": "video event-word recall"}
    lines = [f"| task ({results.get('items', '?')} items each) | score % [95 % interval] |", "|---|---:|"]
    for key, name in names.items():
        if key in results:
            cell = {"value": results[key], "ci95": results.get("ci95", {}).get(key, [results[key]] * 2)}
            lines.append(f"| {name} | {format_interval(cell)} |")
    return "\n".join(lines)
