"""Training metrics: one JSON line per logged step (``metrics.jsonl``), TensorBoard scalars, a tqdm bar.

A resumed run truncates the lines after the step it resumes from, so the file always holds one curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Writes on the main process only; other ranks get a writer that does nothing."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: JSONL is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (for tests, plots and reports)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool, description: str):
    """tqdm over optimizer steps (its own ETA); `progress_text` fills the postfix."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step",
                dynamic_ncols=True)


def progress_text(values: dict) -> str:
    parts = [f"loss {values['loss']:.4f}"]
    if values.get("text_targets"):
        parts.append(f"text {values['text_loss']:.4f}")
    if values.get("regression_targets"):
        parts.append(f"reg {values['regression_loss']:.4f}")
    parts.append(f"lr {values['lr']:.2e}")
    if "tokens_per_s" in values:
        parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    return " | ".join(parts)
