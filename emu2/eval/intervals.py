"""95 % confidence intervals for the evaluation's figures, so a reader can tell a change from noise.

- `wilson_interval`: a share of successes (exact match, VQA exact, accuracy at IoU >= 0.5, a detector-read
  attribute); the Wilson score interval keeps its bounds inside [0, 1] and stays sensible at 0 % and 100 %, where
  the normal approximation collapses to a zero-width interval.
- `mean_interval`: the mean of per-item scores in [0, 1] that are not all 0/1 (field accuracy, caption recall);
  the normal approximation of the mean, clipped to [0, 1].
Both return ``(low, high)`` as fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes`` out of ``n`` trials."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(scores: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of the mean of ``scores`` (each in [0, 1])."""
    n = len(scores)
    if n == 0:
        raise ValueError("an interval needs at least one score")
    mean = sum(scores) / n
    if n == 1:
        return 0.0, 1.0
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    half = z * math.sqrt(variance / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def with_interval(scores: Sequence[float], digits: int = 4) -> dict:
    """``{"value", "ci95": [low, high], "n"}`` for per-item scores: Wilson when every score is 0 or 1."""
    scores = [float(s) for s in scores]
    binary = all(s in (0.0, 1.0) for s in scores)
    low, high = wilson_interval(sum(scores), len(scores)) if binary else mean_interval(scores)
    return {"value": round(sum(scores) / len(scores), digits), "ci95": [round(low, digits), round(high, digits)],
            "n": len(scores)}


def format_interval(cell: dict, percent: bool = True) -> str:
    """"62.5 [55.6, 68.9]" from a `with_interval` cell."""
    scale = 100 if percent else 1
    low, high = cell["ci95"]
    return f"{scale * cell['value']:.1f} [{scale * low:.1f}, {scale * high:.1f}]"
