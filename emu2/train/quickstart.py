"""`emu2 quickstart`: the whole paper at shapes scale on a laptop CPU, within a wall-clock budget.

1. generate the shapes world (`emu2 data shapes`);
2. train the language model on text, then the vision side of that model on labelled renders (the stand-ins for
   the pre-trained LLaMA and EVA-CLIP the paper starts from; ``lm_stage=False`` skips the LM), then stage 1 ->
   stage 2 -> visual decoder -> Emu2-Chat -> Emu2-Gen with the packaged shapes recipes;
3. evaluate: held-out few-shot accuracy at 0/1/2/4/8 shots (base model), chat VQA / captioning / grounding /
   video QA (chat model), autoencoding and text-to-image samples (Gen model + decoder);
4. write a report directory (`emu2.train.quickstart_report`): metrics.json, report.md, accuracy_vs_shots.png,
   loss_curves.png, gallery.png;
5. assemble ``emu2-gen/`` (the Gen model's encoder + the visual decoder, the directory `emu2 generate` and
   `emu2 serve --gen-model` read) and print the commands that use the trained models.

Each stage gets a share of the budget that is left. It runs a few steps, measures its seconds per step, then
resumes with the number of steps that fills its share, so the learning-rate schedule always completes. The LM
stage stops at its recipe's steps if they take less than its share.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from .quickstart_report import EVAL_GUIDANCE, evaluate_quickstart, write_report_markdown

# (stage, recipe, init_from stage, share of the training budget)
# The LM stage (the stand-in for LLaMA) teaches copying, the induction in-context learning rests on; without it
# the model does not bind new label words. Copying comes with a phase change after about 1,000 LM steps in short
# rows, then 300 steps on long packed rows carry it across the length of a few-shot prompt (lm-long), so the two
# shares are large enough for their recipes' 1,200 + 300 steps on the 2-core dev machine (385 s of an 884-s
# training window) and their steps are capped there: on that machine the stages after them get what they got
# when the LM ran a fixed number of steps. On a CPU 1.7x slower (0.45 s a step, measured), a fixed 1,500 steps
# would take 11 of the 20 minutes; the shares keep time for every stage there, and the LM stops short of its
# recipe's steps (the run says so). It runs first, so the other shares are of what it leaves.
# The encoder stage (the stand-in for EVA-CLIP) trains only the vision side of the LM stage's output: a random
# ViT learns colours from stage-1 captioning alone far too slowly, and shape and count hardly at all; perception
# is upstream of every other stage (docs/quickstart-results.md).
# Generation follows the decoder's steps (measured, text-to-image / autoencoded background: 159 steps 5.5 / 40.5 %,
# 297 steps 32.5 / 89 %, 384 steps 71 / 100 %), while few-shot accuracy stayed at 4-8 % with 68 to 189 stage-2
# steps; so the decoder's share is larger than stage 2's share would suggest. Emu2-Gen's regression reads the
# caption only after a few hundred steps (before, it predicts the same first embedding whatever the prompt), so its
# share comes from stage 2's and chat's (docs/training-notes.md, "Emu2-Gen reads the caption late").
STAGES = (
    ("lm", "shapes-lm", None, 0.64),  # with lm-long, 0.80 / 1.80 of the training window: 44 %
    ("lm-long", "shapes-lm-long", "lm", 0.16),  # the LM on long packed rows: copying across a few-shot prompt
    ("encoder", "shapes-encoder", "lm-long", 0.20),
    ("stage1", "shapes-stage1", "encoder", 0.10),
    ("stage2", "shapes-stage2", "stage1", 0.18),
    ("decoder", "shapes-decoder", "stage1", 0.18),
    ("chat", "shapes-chat", "stage2", 0.10),
    ("gen", "shapes-gen", "stage2", 0.24),
)
# `--no-lm-stage`: the LM trained only by stages 1 and 2 (it then barely copies); the encoder starts from a random
# preset.
LM_STAGES = ("lm", "lm-long")
STAGES_WITHOUT_LM = tuple((name, recipe, None if init in LM_STAGES else init, share)
                          for name, recipe, init, share in STAGES if name not in LM_STAGES)
PROBE_STEPS = 5  # timed steps before the real run; the median of 5 resists the slow first step
EVAL_RESERVE_S = 285  # evaluation and report at the end: 193-258 s measured at 200 items per task (the slowest once
# the base model wrote captions that parse, each then drawn and read back)
# ... on the dev machine, whose LM stage took 0.26 s a step. Evaluation runs the same kind of model, so on a slower
# CPU the reserve grows with the LM's measured step time (at most 3x); the time comes out of the later stages.
REFERENCE_LM_STEP_S = 0.26
EVAL_EPISODES = 50  # few-shot episodes per held-out split; each holds 4 queries per shot count
LM_PER_TRAIN = 10  # LM-corpus documents per sample of each training kind: cheap, and the LM stage reads many


def _seconds_per_step(stage_dir: Path) -> float:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = sorted(r["step_seconds"] for r in rows if "step_seconds" in r)
    return times[len(times) // 2] if times else 1.0


def train_stage(name, recipe, init_from, seconds, out: Path, overrides: list[str],
                 capped: bool = False) -> dict:
    """Train one stage in about ``seconds`` of wall clock; ``capped``: at most its recipe's steps."""
    from .config import load_config
    from .stages import train

    stage_dir = out / name
    common = [f"output_dir={stage_dir}", f"data.root={out / 'data'}", "log.tensorboard=false", *overrides]
    if init_from:
        common.append(f"model.init_from={out / init_from}")
    started = time.perf_counter()
    if stage_dir.exists():  # unfinished (a finished stage is reused before this): what an interrupted run left
        print(f"[quickstart] {name}: {stage_dir} holds an unfinished run; training the stage again")
        shutil.rmtree(stage_dir)
    # Probe a few steps, measure seconds per step, then resume with the steps that fill the share.
    big = [*common, "steps=100000", f"checkpoint.every={PROBE_STEPS}", "log.every=1"]
    train(load_config(recipe, big), stop_after=PROBE_STEPS)
    per_step = _seconds_per_step(stage_dir)
    steps = max(PROBE_STEPS + 1, PROBE_STEPS + int((seconds - (time.perf_counter() - started)) / per_step))
    cap = load_config(recipe, common).steps if capped else None
    steps = min(steps, cap) if cap else steps
    result = train(load_config(recipe, [*common, f"steps={steps}", f"checkpoint.every={steps}"]), resume=True)
    result.update(seconds=round(time.perf_counter() - started, 1), seconds_per_step=round(per_step, 3),
                  budget_s=round(seconds, 1))
    return result


def slow_cpu_note(slower: float, budget_minutes: float) -> str | None:
    """What to tell the user when this machine runs the LM stage ``slower`` times slower than the dev machine:
    each stage then gets that much fewer steps than in docs/quickstart-results.md."""
    if slower < 1.2:
        return None
    return (f"[quickstart] note: this machine runs the LM stage {slower:.1f}x slower than the one the figures in "
            f"docs/quickstart-results.md come from, so every stage gets about {slower:.1f}x fewer steps. "
            f"--budget {math.ceil(budget_minutes * slower)} would give them about the steps they got there.")


def scale_eval_reserve(report: dict, lm_seconds_per_step: float, started: float, budget_minutes: float) -> float:
    """After the LM stage: how much slower than the dev machine its steps ran (its timing probe's median when it
    just trained, its metrics log's when a resumed run reuses it) sets the evaluation reserve
    (`REFERENCE_LM_STEP_S`) and the note to the user. Returns the new training deadline."""
    slower = lm_seconds_per_step / REFERENCE_LM_STEP_S
    report["eval_reserve_s"] = round(EVAL_RESERVE_S * min(3.0, max(1.0, slower)))
    if note := slow_cpu_note(slower, budget_minutes):
        print(note)
    return started + budget_minutes * 60 - report["eval_reserve_s"]


def short_lm_note(steps: int, recipe_steps: int) -> str | None:
    """What to tell the user when the LM stage's share did not reach its recipe's steps (a slow CPU)."""
    if steps >= recipe_steps:
        return None
    return (f"[quickstart] note: the LM stage reached {steps} of its recipe's {recipe_steps:,} steps in its share "
            f"of the budget; copying, which in-context learning rests on, comes between steps 1,000 and 1,500. A "
            f"larger --budget gives it more.")


def check_reused_chain(out: Path, stages, todo) -> None:
    """Refuse to continue a run whose finished stages were chained otherwise than ``stages`` (a run started by an
    earlier emu2, whose LM stage started from the encoder's output): a later stage would start from a directory
    that lacks what it should hold. Stages record where they started in ``train_config.yaml``."""
    import yaml

    left = {stage[0] for stage in todo}
    for name, _recipe, init_from, _share in stages:
        recorded = out / name / "train_config.yaml"
        if name in left or not recorded.is_file():
            continue
        started = (yaml.safe_load(recorded.read_text()).get("model") or {}).get("init_from")
        expected = str(out / init_from) if init_from else None
        if (Path(started).name if started else None) != (Path(expected).name if expected else None):
            raise ValueError(
                f"{out / name} was trained from {started or 'a random preset'}, but this quickstart chains it from "
                f"{expected or 'a random preset'} (an earlier emu2 ran the stages in another order). Start again "
                f"with another --out, or remove the stage directories after the first that differs.")


def stage_seconds(share: float, shares_left: list[float], seconds_left: float) -> float:
    """A stage's time: its share of the training time still left, among the stages still to train (itself
    included). Recomputed before every stage, so one stage's overrun is absorbed by the later ones instead of
    pushing the whole run past its budget."""
    return max(0.0, seconds_left) * share / sum(shares_left)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_precision(precision: str = "auto") -> str:
    """accelerate's ``mixed_precision`` for the stages: "bf16" or "no" (fp32).

    "auto" picks bf16 on a CUDA GPU that has it. On a CPU it picks bf16 only where it is measured to be faster:
    a CPU that advertises bf16 kernels (AVX512-BF16 / AMX) can still run bf16 matmuls slower than fp32 (one
    dev machine ran the LM stage at 0.46 s a step in bf16 and 0.26 s in fp32), so a short timing decides.
    """
    if precision in ("fp32", "no"):
        return "no"
    if precision == "bf16":
        return "bf16"
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not (torch.backends.mkldnn.is_available() and supported is not None and supported()):
        return "no"
    return "bf16" if cpu_bf16_speedup() > 1.1 else "no"


def cpu_bf16_speedup(size: int = 384, repeats: int = 5) -> float:
    """fp32 time over bf16-autocast time of a linear layer's forward and backward, ``(size, size)`` weights on
    ``4 * size`` rows, best of 3 (about a second)."""
    import torch

    layer = torch.nn.Linear(size, size)
    x = torch.randn(4 * size, size, requires_grad=True)

    def seconds(bf16: bool) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = layer(x)
                out.float().sum().backward()
            best = min(best, time.perf_counter() - started)
        return best

    seconds(True)  # warm-up: oneDNN builds its bf16 kernels on first use
    return seconds(False) / seconds(True)


def run_quickstart(out: str | Path = "runs/quickstart", budget_minutes: float = 20.0, seed: int = 0,
                   num_train: int = 1500, preset: str = "shapes", extra: tuple[str, ...] = (),
                   precision: str = "auto", lm_stage: bool = True) -> dict:
    """Everything above; returns the metrics written to ``out/report/metrics.json``."""
    from ..data.shapes import write_shapes
    from .config import load_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mixed_precision = resolve_precision(precision)
    stages = STAGES if lm_stage else STAGES_WITHOUT_LM
    report = {"budget_minutes": budget_minutes, "seed": seed, "preset": preset, "mixed_precision": mixed_precision,
              "lm_stage": lm_stage, "stages": {}, "eval_reserve_s": EVAL_RESERVE_S}
    if not (out / "data" / "dataset.json").is_file():
        write_shapes(out / "data", seed=seed, num_train=num_train, num_episodes=EVAL_EPISODES,
                     num_lm=LM_PER_TRAIN * num_train)
    report["data_seconds"] = round(time.perf_counter() - started, 1)
    deadline = started + budget_minutes * 60 - EVAL_RESERVE_S  # when training must be done
    todo = [stage for stage in stages
            if not ((out / stage[0] / "config.json").is_file() or (out / stage[0] / "model_index.json").is_file())]
    check_reused_chain(out, stages, todo)
    for name, recipe, init_from, share in stages:
        if all(stage[0] != name for stage in todo):
            print(f"[quickstart] {name}: already trained, reusing {out / name}")
            if name == "lm" and (out / name / "metrics.jsonl").is_file():
                deadline = scale_eval_reserve(report, _seconds_per_step(out / name), started, budget_minutes)
            continue
        # The encoder's convolutions run about 2x slower under bf16 autocast on a CPU than in fp32 (measured on
        # the dev machine's AVX512-BF16 CPU), unlike the transformer stages' matmuls.
        precision = "no" if name == "encoder" and not _has_cuda() else mixed_precision
        overrides = [f"seed={seed}", f"mixed_precision={precision}", *extra] + (
            [f"model.preset={preset}"] if init_from is None else [])
        todo = [stage for stage in todo if stage[0] != name]
        seconds = stage_seconds(share, [share, *(s[3] for s in todo)], deadline - time.perf_counter())
        print(f"[quickstart] {name}: {recipe}, about {seconds / 60:.1f} min")
        report["stages"][name] = train_stage(name, recipe, init_from, seconds, out, overrides,
                                             capped=name in LM_STAGES)
        if name == "lm" and (note := short_lm_note(report["stages"][name]["step"], load_config(recipe, []).steps)):
            print(note)
        if name == "lm":
            deadline = scale_eval_reserve(report, report["stages"][name]["seconds_per_step"], started, budget_minutes)
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    assemble_gen_directory(out)
    report.update(evaluate_quickstart(out, [stage[0] for stage in stages]))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "report" / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report_markdown(out, report)
    print(usage_commands(out))
    return report


def assemble_gen_directory(out: Path) -> Path:
    """``out/emu2-gen``: the Gen stage's model as ``encoder/`` and the decoder stage's UNet as ``decoder/``, the
    layout of `Emu2GenPipeline.from_pretrained`. The decoder records the size its images were trained at as its
    SDXL ``original_size`` condition (official checkpoints have none and keep the official 1024)."""
    from ..pipelines.emu2 import Emu2Pipeline
    from ..pipelines.gen import Emu2GenPipeline
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    decoder = Emu2VisualDecoderPipeline.from_pretrained(out / "decoder")
    size = json.loads((out / "data" / "dataset.json").read_text()).get("image_size", 64)
    decoder.register_to_config(original_size=[size, size])
    target = out / "emu2-gen"
    Emu2GenPipeline(Emu2Pipeline.from_pretrained(out / "gen"), decoder).save_pretrained(target)
    return target


def usage_commands(out: Path) -> str:
    """What to run next with the trained models (printed at the end of the quickstart)."""
    image = out / "data" / "eval" / "images"
    example = next(iter(sorted(image.glob("*.png"))), None) if image.is_dir() else None
    example = example or "IMAGE.png"
    return "\n".join([
        "", "[quickstart] done. Try the trained models:",
        f'  emu2 ask --model {out / "chat"} --image {example} "What shape is it?"',
        f'  emu2 generate --model {out / "emu2-gen"} "a large red circle in the top left on a white background." '
        f"--guidance {EVAL_GUIDANCE:g} -o circle.png",
        f"  emu2 serve --ui --model {out / 'chat'} --gen-model {out / 'emu2-gen'}    # then open http://127.0.0.1:8000",
        f"  report: {out / 'report' / 'report.md'}",
    ])
