"""The one training runner every stage uses: language-model stages, encoder pre-training, image and video decoders.

    stage = Stage(accelerator, module, optimizer, scheduler, step=one_optimizer_step, save_output=save, ...)
    summary = run_stage(config, stage, resume=False, stop_after=None)

A stage is what differs: the weights it trains (``module``, what checkpoints hold), its optimizer and schedule,
``step()`` (one optimizer step: every micro-batch, clipping, the update) and what it saves at the end. The runner
owns everything else, the same way for every stage:

- refuse-or-resume: a fresh run refuses an ``output_dir`` that holds checkpoints; ``resume=True`` restores the
  newest valid one (`emu2.train.checkpoint`: weights, optimizer, schedule, RNG states and ``stage.state``, the data
  position and sampling generators), so a resumed run is bit-equal to an uninterrupted one;
- the schedule: one `scheduler.step()` after each applied update (`emu2.lr_schedule`, the only schedule);
- NaN/inf: a step whose loss (or gradient norm) is not finite reports why in `StepReport.diverged` and must leave
  the weights as they were; the runner then stops with `TrainingDiverged`, naming the last good checkpoint;
- logging: a progress bar, ``metrics.jsonl`` and TensorBoard at ``log.every`` (and the first and last steps);
- skipped samples: the data layer's counters (`emu2.train.data.SkippedSampleReport`, summed over ranks) in the bar,
  the metrics and the summary; past ``data.max_skipped_fraction`` the run stops (`TooManySkippedSamples`);
- checkpoints at ``checkpoint.every``, at the last step and at ``stop_after`` (time-sliced jobs);
- once finished, ``stage.save_output(output_dir)``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .data import SkippedSampleReport
from .metrics import MetricsWriter, progress_bar, progress_text


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before updating the weights."""


@dataclass
class StepReport:
    """One optimizer step as a stage reports it to the runner.

    ``loss``: the step's loss (what the bar and metrics show first). ``values``: further metrics.jsonl fields
    (per-objective losses, target counts, gradient norm). ``diverged``: None when the update was applied, else why
    it was not (the weights are unchanged and the run stops). ``tokens``: input tokens read (stages with
    ``counts_tokens``).
    """

    loss: float
    values: dict = field(default_factory=dict)
    diverged: str | None = None
    tokens: int | None = None


@dataclass
class Stage:
    """What one training stage hands the runner (see the module docstring)."""

    accelerator: object
    module: torch.nn.Module  # the trained weights, as checkpoints save and restore them
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: Callable[[], StepReport]
    save_output: Callable[[Path], None]
    state: object = None  # state_dict/load_state_dict: data position, sampling generators (saved per rank)
    data_stats: object = None  # the data layer's counters, for SkippedSampleReport
    summary: dict = field(default_factory=dict)  # extra fields of the run's summary
    counts_tokens: bool = False  # its steps report the input tokens read (logged as tokens, tokens_per_s)


class StageSampling:
    """What a stage draws at random or reads next outside the global RNGs, in one place so checkpoints resume it
    exactly: ``rng`` (Python) picks in-memory samples and crops, ``generator`` (torch) noise, timesteps, guidance
    dropout and rendered scenes, and ``data`` (anything with ``state_dict``) the position in the shards."""

    def __init__(self, seed: int, data=None):
        self.rng, self.generator, self.data = random.Random(seed), torch.Generator().manual_seed(seed), data

    def state_dict(self) -> dict:
        state = {"rng": self.rng.getstate(), "generator": self.generator.get_state()}
        return state if self.data is None else {**state, "data": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        if self.data is not None:
            if "data" not in state:
                raise ValueError("the checkpoint has no data position: it was written by a run that read no shards "
                                 "(e.g. decoder.streaming: false); resume it with the same settings")
            self.data.load_state_dict(state["data"])


def has_device() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...)."""
    api = getattr(torch, "accelerator", None)  # torch >= 2.6
    return api.is_available() if api is not None else torch.cuda.is_available()


class SingleProcess:
    """What the runner and checkpoints use of accelerate's `Accelerator`, for the stages that run in one process
    (encoder, image and video decoder), each in its own recipe's mixed precision.

    Not an `Accelerator` because accelerate keeps one `AcceleratorState` per process with one mixed-precision
    setting: creating an fp32 Accelerator after a bf16 one (the quickstart's fp32 encoder stage after its bf16 LM
    stage) raises, and it would fix the setting for the stages after it. The device is accelerate's choice
    (`PartialState`); autocast is torch's, as accelerate sets it up in one process."""

    is_main_process, num_processes, process_index = True, 1, 0

    def __init__(self, config, stage_name: str):
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        state = PartialState(cpu=not has_device())
        if state.num_processes > 1:
            raise NotImplementedError(f"the {stage_name} stage runs in one process (launch it without accelerate)")
        self.device, self.distributed_type = state.device, DistributedType.NO
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def wait_for_everyone(self) -> None:
        pass

    @staticmethod
    def unwrap_model(model):
        return model


def summed_over_ranks(stats: dict) -> Counter:
    """One rank's data counters summed with every other rank's (a collective)."""
    from accelerate.utils import gather_object

    total: Counter = Counter()
    for rank_stats in gather_object([stats]):
        total.update(rank_stats)
    return total


def _learning_rates(optimizer) -> dict[str, float]:
    """The current learning rate of each parameter group, by its ``group`` name."""
    return {g.get("group", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)}


def _refuse_or_resume(checkpoints: Path, stage: Stage, resume: bool) -> tuple[int, int]:
    """(first step, tokens read so far): 0 for a fresh run, which refuses a directory that holds checkpoints;
    the newest valid checkpoint's, restored into ``stage``, for a resumed one."""
    if resume:
        trainer = load_checkpoint(checkpoints, stage.accelerator, stage.module, stage.optimizer, stage.scheduler,
                                  stage.state)
        return trainer["step"], trainer.get("tokens", 0)
    if list_checkpoints(checkpoints):
        raise FileExistsError(f"{checkpoints} already holds checkpoints: pass --resume to continue that run, or "
                              "set output_dir to a new directory")
    return 0, 0


def _step_values(report: StepReport, lrs: dict[str, float], seconds: float, tokens: int | None) -> dict:
    """One step's metrics.jsonl fields: the loss and the stage's values, the learning rate the step used (``lr``:
    the LM group's, or the only group's; ``lr/<group>``: every group's), its time, and the tokens read so far."""
    values = {"loss": report.loss, **report.values, "lr": lrs.get("lm", next(iter(lrs.values()))),
              **{f"lr/{g}": v for g, v in lrs.items()}, "step_seconds": seconds}
    if tokens is not None:
        values.update(tokens=tokens, tokens_per_s=report.tokens / seconds)
    return values


def run_stage(config, stage: Stage, *, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) ``stage`` for ``config.steps`` optimizer steps; returns the summary: ``step``, ``finished``,
    ``output_dir``, ``loss`` (the last step's; None when no step ran), ``first_loss`` (this call's first step),
    ``seconds``, ``tokens`` (stages that count them), the skipped samples, and ``stage.summary``.

    ``stop_after``: checkpoint and return once this step is done (time-sliced jobs; tests of resumption).
    """
    accelerator = stage.accelerator
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    start, tokens = _refuse_or_resume(checkpoints, stage, resume)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(config.to_yaml())
    metrics = MetricsWriter(out, enabled=main, tensorboard=config.log.tensorboard,
                            resume_step=start if resume else None)
    bar = progress_bar(config.steps, start, main and config.log.progress, config.stage)
    skipped = SkippedSampleReport(stage.data_stats, config.data.max_skipped_fraction, gather=summed_over_ranks)
    step, first, report = start, None, None
    started = time.perf_counter()
    try:
        while step < config.steps and (stop_after is None or step < stop_after):
            began = time.perf_counter()
            lrs = _learning_rates(stage.optimizer)
            report = stage.step()
            if report.diverged is not None:
                last = list_checkpoints(checkpoints)
                raise TrainingDiverged(
                    f"step {step + 1}: {report.diverged}; stopped before updating the weights. Last good "
                    f"checkpoint: {last[0][1] if last else 'none'} (resume from it with a lower learning rate, more "
                    "warm-up or a smaller grad_clip, or check the data of this step)")
            stage.scheduler.step()
            step += 1
            first = report.loss if first is None else first
            tokens += report.tokens if stage.counts_tokens else 0
            values = _step_values(report, lrs, time.perf_counter() - began, tokens if stage.counts_tokens else None)
            logged = step % config.log.every == 0 or step == config.steps or step == start + 1
            if logged:
                skipped.update(check=False)  # a collective: every rank reads at the same steps
            values.update(skipped.metrics())
            bar.set_postfix_str(progress_text(values) + skipped.postfix(), refresh=False)
            bar.update(1)
            if logged:
                metrics.log(step, values)
                skipped.check()  # after logging: the counts that stop a run are in metrics.jsonl
            if step % config.checkpoint.every == 0 or step == config.steps or step == stop_after:
                save_checkpoint(checkpoints, step, accelerator, stage.module, stage.optimizer, stage.scheduler,
                                stage.state, {"tokens": tokens}, config.checkpoint.keep_last)
    finally:
        bar.close()
        metrics.close()

    finished = step >= config.steps
    if finished:
        stage.save_output(out)
    accelerator.wait_for_everyone()
    return {"step": step, "finished": finished, "output_dir": str(out),
            "loss": report.loss if step > start else None, "first_loss": first,
            "seconds": round(time.perf_counter() - started, 1), **({"tokens": tokens} if stage.counts_tokens else {}),
            **stage.summary, **skipped.summary()}
