"""Results: a JSON file, markdown tables in the paper's layout (Table 1, Table 2) next to the paper's Emu2
numbers, and a plot of score against number of shots.

Scores come in as fractions in [0, 1] (what `emu2.eval.fewshot.run_fewshot` returns) and are shown as
percentages with one decimal, like the paper.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Table 1: Emu2 (37B), zero-shot and few-shot with RICES.
PAPER_FEWSHOT: dict[str, dict[int, float]] = {
    "VQAv2": {0: 33.3, 4: 67.0, 8: 67.8, 16: 68.8},
    "OKVQA": {0: 26.7, 4: 53.2, 8: 54.1, 16: 57.1},
    "VizWiz": {0: 40.4, 4: 54.6, 8: 54.7, 16: 57.0},
    "TextVQA": {0: 26.2, 4: 48.2, 8: 49.3, 16: 50.3},
    "HatefulMemes": {0: 52.2, 4: 62.4, 8: 65.8, 16: 66.0},
}
# Table 2: Emu2-Chat (MM-Vet and TouchStone are GPT-4 scored and not reproduced here).
PAPER_CHAT: dict[str, float] = {
    "VQAv2": 84.9, "OKVQA": 64.8, "GQA": 65.1, "VizWiz": 54.9, "TextVQA": 66.6,
    "MSVD": 49.0, "MSRVTT": 31.4, "SEED": 62.8, "MMMU": 34.1,
}
_ALIASES = {"msvdqa": "MSVD", "msrvttqa": "MSRVTT", "seedbench": "SEED", "hm": "HatefulMemes"}
_KNOWN = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in [*PAPER_FEWSHOT, *PAPER_CHAT]}


def canonical_benchmark(name: str) -> str:
    """The paper's column name for a benchmark name ("ok-vqa" -> "OKVQA", "seed_bench" -> "SEED"); unknown
    names come back unchanged."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(key) or _KNOWN.get(key) or name


def _fewshot_by_shot(results: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """Canonical benchmark names and integer shots (JSON gives them back as strings)."""
    return {canonical_benchmark(b): {int(k): v for k, v in s.items()} for b, s in results.items()}


def _percent(score: float | None) -> str:
    return "-" if score is None else f"{100.0 * score:.1f}"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def save_results(
    path: str | Path,
    fewshot: Mapping[str, Mapping[int, float]] | None = None,
    chat: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"fewshot": {benchmark: {shot: score}}, "chat": {benchmark: score}, "paper": ..., "meta": ...}``.

    Scores stay fractions in [0, 1]; the paper's numbers (percent) are stored beside them for comparison.
    """
    path = Path(path)
    payload = {
        "fewshot": {b: {str(k): v for k, v in sorted(s.items())} for b, s in _fewshot_by_shot(fewshot or {}).items()},
        "chat": {canonical_benchmark(b): v for b, v in (chat or {}).items()},
        "paper": {"fewshot_percent": {b: {str(k): v for k, v in s.items()} for b, s in PAPER_FEWSHOT.items()},
                  "chat_percent": PAPER_CHAT},
        "meta": dict(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def fewshot_markdown_table(
    results: Mapping[str, Mapping[int, float]], include_paper: bool = True, model_name: str = "ours"
) -> str:
    """Table 1 layout: columns are benchmarks, rows are shots, first the paper's Emu2 block, then ours."""
    results = _fewshot_by_shot(results)
    benchmarks = [b for b in PAPER_FEWSHOT if b in results] + [b for b in results if b not in PAPER_FEWSHOT]
    shots = sorted({k for scores in results.values() for k in scores})
    rows = []
    if include_paper:
        for i, k in enumerate(shots):
            rows.append(["Emu2 (paper)" if i == 0 else "", str(k)]
                        + [_paper(PAPER_FEWSHOT.get(b, {}).get(k)) for b in benchmarks])
    for i, k in enumerate(shots):
        rows.append([model_name if i == 0 else "", str(k)] + [_percent(results[b].get(k)) for b in benchmarks])
    return _markdown(["Model", "Shot", *benchmarks], rows)


def chat_markdown_table(results: Mapping[str, float], include_paper: bool = True, model_name: str = "ours") -> str:
    """Table 2 layout: one row per model, one column per benchmark."""
    results = {canonical_benchmark(b): s for b, s in results.items()}
    benchmarks = [b for b in PAPER_CHAT if b in results] + [b for b in results if b not in PAPER_CHAT]
    rows = []
    if include_paper:
        rows.append(["Emu2-Chat (paper)"] + [_paper(PAPER_CHAT.get(b)) for b in benchmarks])
    rows.append([model_name] + [_percent(results[b]) for b in benchmarks])
    return _markdown(["Model", *benchmarks], rows)


def plot_fewshot(
    results: Mapping[str, Mapping[int, float]], path: str | Path, include_paper: bool = True
) -> Path:
    """PNG of score (%) against number of shots, one colour per benchmark; the paper's Emu2 dashed."""
    # The Agg canvas on a bare Figure: no pyplot, so no global backend switch and no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = _fewshot_by_shot(results)
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for index, (benchmark, scores) in enumerate(results.items()):
        color = f"C{index % 10}"
        shots = sorted(scores)
        axes.plot(shots, [100.0 * scores[k] for k in shots], marker="o", color=color, label=benchmark)
        paper = PAPER_FEWSHOT.get(benchmark) if include_paper else None
        if paper:
            axes.plot(sorted(paper), [paper[k] for k in sorted(paper)], linestyle="--", marker="x", color=color,
                      alpha=0.7, label=f"{benchmark} (paper)")
    axes.set_xlabel("number of in-context examples")
    axes.set_ylabel("score (%)")
    axes.set_title("Few-shot evaluation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
