"""The language-model stages (paper 2.2, 2.3: stage 1, stage 2, Emu2-Chat, Emu2-Gen, the shapes LM): the step
function (`train_step`) and the distributed set-up they hand the runner (`emu2.train.runner`).

    config = load_config("shapes-stage1", ["steps=100"])
    summary = train(config)                 # or: emu2 train shapes-stage1 steps=100 [--resume]

Distribution is accelerate's: launch with ``accelerate launch --config_file ... -m emu2.train RECIPE`` for DDP,
FSDP or DeepSpeed ZeRO 1-3 (``configs/accelerate/``); a plain ``emu2 train`` is one process. These stages differ
only in their recipe YAML.

Loss normalisation (torchtune): an optimizer step sums cross-entropy over every supervised token and squared
error over every regressed visual slot of all its micro-batches, on all ranks, and divides each by its global
count, so the gradient is the same for any split into ranks x accumulation steps (not a mean of means).

Under DeepSpeed the engine owns what accelerate's optimizer wrapper does elsewhere; each piece maps as follows.
Accumulation: the loop still counts the step's targets first and marks the last micro-batch as the boundary
itself, and backward runs with ``scale_wrt_gas=False``, so the exact normalisation above is unchanged. Clipping:
DeepSpeed clips to the recipe's ``optim.grad_clip`` (its ``gradient_clipping``; the recipe overrides the DeepSpeed
config, with a warning when they differ). Optimizer: the AdamW built here with its per-group learning rates and
frozen groups is handed to DeepSpeed (ZeRO keeps its parameter groups) and the LR schedule stays ours. NaN/inf:
a non-finite loss stops before ``engine.step()``; ZeRO skips the update when the gradient norm is not finite
(checked by DeepSpeed before it clips), and the run stops. ZeRO stage 0 is refused (it is DDP without that check).
Checkpoints: see `emu2.train.checkpoint`.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import is_deepspeed
from ..config import TrainConfig
from ..data import build_data
from ..model import base_model, build_model, is_lora, merged_model
from ..optim import build_optimizer, build_scheduler
from ..runner import Stage, StepReport, TrainingDiverged, has_device, run_stage


@dataclass
class StepResult:
    """One optimizer step, reduced over ranks. Losses are per token / per slot means over the whole step."""

    loss: float
    text_loss: float
    regression_loss: float
    text_targets: int
    regression_targets: int
    tokens: int  # non-padding input tokens
    grad_norm: float


def count_targets(batch: dict, n_query: int, v_query: int) -> tuple[int, int]:
    """(supervised text tokens, regressed visual slots) of a collated batch, counted as the model counts them."""
    n_text = int((batch["labels"][:, 1:] != -100).sum())
    images, frames = batch.get("image_is_target"), batch.get("frame_is_target")
    n_reg = (int(images.sum()) * n_query if images is not None else 0) + \
            (int(frames.sum()) * v_query if frames is not None else 0)
    return n_text, n_reg


def diverged(result: StepResult, config: TrainConfig) -> bool:
    """A NaN/inf loss, or gradient norm (except under fp16, whose loss scaler skips such steps by design)."""
    return not math.isfinite(result.loss) or (not math.isfinite(result.grad_norm) and config.mixed_precision != "fp16")


def train_step(model, optimizer, window: list[dict], accelerator, config: TrainConfig) -> StepResult:
    """Forward/backward every micro-batch of ``window`` (gradients synchronised on the last), clip, update."""
    emu2_config = base_model(accelerator.unwrap_model(model)).config
    w_text, w_reg = emu2_config.text_loss_weight, emu2_config.regression_loss_weight
    counts = [count_targets(b, emu2_config.n_query, emu2_config.v_query) for b in window]
    local = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts),
                          sum(int(b["attention_mask"].sum()) for b in window)], dtype=torch.float64)
    n_text, n_reg, tokens = (int(x) for x in accelerator.reduce(local.to(accelerator.device), "sum").tolist())

    deepspeed = is_deepspeed(accelerator)
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # CE summed over tokens, MSE over slots
    for i, batch in enumerate(window):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(window) - 1
        if deepspeed:  # our window is the accumulation unit, whatever DeepSpeed's micro-step counter says
            model.set_gradient_accumulation_boundary(last)
        with nullcontext() if last or deepspeed else accelerator.no_sync(model):
            out = model(**batch)
            if (out.num_text_targets, out.num_regression_targets) != counts[i]:
                raise RuntimeError(f"the model counted {out.num_text_targets} text / {out.num_regression_targets} "
                                   f"regression targets, the batch {counts[i]}: data and model n_query disagree?")
            text_sum = out.text_loss * out.num_text_targets
            reg_sum = out.regression_loss * out.num_regression_targets
            loss = w_text * text_sum / max(n_text, 1) + w_reg * reg_sum / max(n_reg, 1)
            if not counts[i][0] and not counts[i][1]:
                # Nothing to learn in this micro-batch, but every rank must run the same backward passes (DDP).
                loss = loss + 0.0 * out.last_hidden_state.sum()
            # DDP/FSDP/ZeRO average gradients over ranks; the normalisation above is already global.
            if deepspeed:  # no division by the accumulation count either: the weights above already do it
                model.backward(loss * accelerator.num_processes, scale_wrt_gas=False)
            else:
                accelerator.backward(loss * accelerator.num_processes)
        sums += torch.stack([text_sum.detach(), reg_sum.detach()]).double()

    sums = accelerator.reduce(sums, "sum")
    text_loss = sums[0].item() / n_text if n_text else 0.0
    regression_loss = sums[1].item() / n_reg if n_reg else 0.0
    loss = w_text * text_loss + w_reg * regression_loss
    if deepspeed:
        return deepspeed_update(model, optimizer, StepResult(loss, text_loss, regression_loss, n_text, n_reg,
                                                              tokens, math.nan), config)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.optim.grad_clip if config.optim.grad_clip is not None else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
    result = StepResult(loss, text_loss, regression_loss, n_text, n_reg, tokens, grad_norm)
    if diverged(result, config):
        return result  # the caller stops the run, before any weight changes
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def deepspeed_update(engine, optimizer, result: StepResult, config: TrainConfig) -> StepResult:
    """Clip and update through the DeepSpeed engine, once the step's loss is known to be finite."""
    if not math.isfinite(result.loss):
        return result  # the caller stops the run; engine.step() was not called, so the weights are unchanged
    engine.step()  # ZeRO: gradient norm, skip if it is not finite, clip to gradient_clipping, AdamW, zero grads
    optimizer.step()  # accelerate's DeepSpeed wrapper: a no-op that tells our LR scheduler a step happened
    norm = engine.get_global_grad_norm()
    if norm is None:
        raise RuntimeError("DeepSpeed computed no gradient norm (is zero_optimization.compute_grad_norm off?); the "
                           "trainer needs it to stop on NaN/inf gradients: remove that setting from the config")
    result.grad_norm = float(norm)
    if not math.isfinite(result.grad_norm) and engine.was_step_applied() and config.mixed_precision != "fp16":
        raise TrainingDiverged(f"gradient norm {result.grad_norm} and DeepSpeed applied the update anyway (bf16 "
                               "without bf16.check_grad_overflow?): the weights are corrupted, resume from the last "
                               "checkpoint with bf16.check_grad_overflow: true in the DeepSpeed config")
    return result


def train_lm_stage(config: TrainConfig, resume: bool = False, data=None, stop_after: int | None = None) -> dict:
    """Run (or resume) a language-model stage (stage 1, stage 2, chat, Gen, the shapes LM) through
    `emu2.train.runner.run_stage`; the output is an Emu2Pipeline at ``output_dir``.

    ``data``: an iterable of collated batches with ``state_dict``/``load_state_dict`` (and optionally
    ``micro_batches_per_step``, and ``stats``: the data layer's skip counters) instead of the recipe's data
    section. ``stop_after``: checkpoint and return once this step is done.
    """
    from accelerate.utils import set_seed

    accelerator = build_accelerator(config)
    set_seed(config.seed)
    with _full_model_on_every_rank(accelerator):
        model, tokenizer = build_model(config)
    emu2_config = base_model(model).config
    if data is None:
        data = build_data(config, emu2_config, tokenizer, accelerator.process_index, accelerator.num_processes)
    per_step = getattr(data, "micro_batches_per_step", config.gradient_accumulation_steps)
    if is_deepspeed(accelerator):
        recipe_into_deepspeed_config(accelerator, config, per_step)
    model, optimizer = prepare_model_and_optimizer(accelerator, model, config)
    batches = None

    def step() -> StepReport:
        nonlocal batches
        batches = batches or iter(data)  # opened on first use: after a resumed checkpoint restored the position
        window = [next(batches) for _ in range(per_step)]
        result = train_step(model, optimizer, window, accelerator, config)
        why = (f"loss {result.loss} (text {result.text_loss}, regression {result.regression_loss}), gradient norm "
               f"{result.grad_norm}") if diverged(result, config) else None
        return StepReport(result.loss, {"text_loss": result.text_loss, "regression_loss": result.regression_loss,
                                         "text_targets": result.text_targets,
                                         "regression_targets": result.regression_targets,
                                         "grad_norm": result.grad_norm}, why, result.tokens)

    stage = Stage(accelerator, model, optimizer, build_scheduler(optimizer, config), step,
                  lambda out: save_output(accelerator, model, tokenizer, out), state=data, data_stats=data,
                  counts_tokens=True)
    return run_stage(config, stage, resume=resume, stop_after=stop_after)


def save_output(accelerator, model, tokenizer, out: Path) -> None:
    """The stage output: an Emu2Pipeline directory (config, safetensors, tokenizer), LoRA merged."""
    from emu2.pipelines.emu2 import Emu2Pipeline

    from ..checkpoint import full_model_state

    unwrapped = accelerator.unwrap_model(model)
    if is_lora(unwrapped):
        if accelerator.is_main_process:
            Emu2Pipeline(merged_model(unwrapped), tokenizer).save_pretrained(out)
        return
    state = full_model_state(accelerator, model)  # a collective under FSDP: every rank calls it
    if accelerator.is_main_process:
        Emu2Pipeline(unwrapped, tokenizer).save_pretrained(out, state_dict=state)


# ------------------------------------------------------------------------------------------------ setup
def build_accelerator(config: TrainConfig):
    """The LM stages' `Accelerator`: the recipe's precision, DDP that tolerates unused parameters, and CPU
    ranks (gloo, or DeepSpeed's CPU backend) where no GPU is present."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # find_unused_parameters: stage 1 never uses project_down, text-only batches never use the vision tower.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not has_device():
        handlers.append(_deepspeed_cpu_backend())
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # cpu=True lets `accelerate launch --multi_gpu` run gloo ranks on a CPU-only machine; accelerate sets
        # DeepSpeed up only with cpu=False, and DeepSpeed then runs on its CPU accelerator.
        cpu=not has_device() and not deepspeed,
        kwargs_handlers=handlers,
    )
    kind = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        raise RuntimeError(
            f"the accelerate config asks for FSDP but accelerate set up {kind.value}: accelerate enables FSDP only "
            "on GPU/XPU/NPU/HPU devices, and on CPU it would silently train with plain DDP instead. Use a DDP "
            "config (distributed_type: MULTI_GPU) on CPU.")
    if deepspeed and kind != DistributedType.DEEPSPEED:
        raise RuntimeError(f"the accelerate config asks for DeepSpeed but accelerate set up {kind.value}")
    if kind == DistributedType.DEEPSPEED:
        check_deepspeed_config(accelerator.state.deepspeed_plugin, config)
    if kind == DistributedType.FSDP and config.lora.enabled:
        raise NotImplementedError("LoRA with FSDP: merging the adapters needs the full weights on one process; "
                                  "train LoRA with DDP or a single process")
    return accelerator


def _deepspeed_cpu_backend():
    """On a machine without GPUs accelerate finds no process-group backend for DeepSpeed, so name DeepSpeed's own
    choice for its CPU accelerator: oneCCL when its torch bindings are installed, else gloo."""
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    return InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())


def check_deepspeed_config(plugin, config: TrainConfig) -> None:
    """Refuse DeepSpeed settings that would take over what the recipe decides."""
    ds = plugin.deepspeed_config
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("remove the optimizer/scheduler sections from the DeepSpeed config: the recipe's optim and "
                         "schedule sections build them (AdamW with per-group learning rates, frozen groups)")
    stage = int(ds.get("zero_optimization", {}).get("stage", plugin.zero_stage))
    if stage == 0:
        raise ValueError("ZeRO stage 0 is plain data parallelism, without the non-finite gradient check the NaN stop "
                         "relies on: use DDP (distributed_type: MULTI_GPU), or ZeRO stage 1, 2 or 3")
    if stage == 3 and config.lora.enabled:
        raise NotImplementedError("LoRA with ZeRO-3: merging the adapters needs the full weights on one process; "
                                  "train LoRA with ZeRO stage 1/2, DDP or a single process")


def recipe_into_deepspeed_config(accelerator, config: TrainConfig, micro_batches_per_step: int) -> None:
    """The recipe decides clipping and how many micro-batches make a step; DeepSpeed's config follows it.

    A different clipping value in the accelerate/DeepSpeed config is overridden with a warning. The accumulation
    count is overridden quietly (accelerate writes 1 when none is given): the loop marks the step boundary and
    normalises the loss itself, so DeepSpeed's count only feeds its sample counter, as does the micro-batch size
    (streams may differ in batch size). ZeRO-3 gathers full weights for each checkpoint's model/ and the output.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = config.optim.grad_clip or 0.0  # 0: DeepSpeed does not clip
    given = ds.get("gradient_clipping", "auto")
    if given != "auto" and float(given) != clip:
        warnings.warn(f"the DeepSpeed config sets gradient_clipping={given}; using the recipe's {clip} "
                      "(optim.grad_clip, 0 for none)", stacklevel=3)
    ds["gradient_clipping"] = clip
    ds["gradient_accumulation_steps"] = micro_batches_per_step
    accelerator.gradient_accumulation_steps = micro_batches_per_step
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = max((s.batch_size for s in config.data.streams.values()), default=1)
    ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


@contextmanager
def _full_model_on_every_rank(accelerator):
    """Under ZeRO-3 accelerate registers its DeepSpeed config with transformers, whose constructors then partition
    parameters as they are created (zero.Init). `build_model` loads, resizes and freezes weights with plain torch
    calls, so every process builds the full fp32 model and DeepSpeed partitions it in ``prepare``: host memory for
    one full model per process is needed at start-up."""
    if not is_deepspeed(accelerator):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def prepare_model_and_optimizer(accelerator, model, config: TrainConfig):
    """``model`` wrapped by ``accelerator`` (DDP, FSDP or DeepSpeed) and its optimizer built from the recipe's
    parameter groups: FSDP1 wraps the model first and builds the optimizer on its flattened parameters; the other
    engines take both at once."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        if not accelerator.state.fsdp_plugin.use_orig_params:
            raise ValueError("FSDP (version 1) needs fsdp_use_orig_params: true in the accelerate config: the "
                             "per-group learning rates and freezing address the original parameters")
        model = accelerator.prepare(model)  # FSDP1 flattens parameters: build the optimizer on the wrapped model
        return model, accelerator.prepare(build_optimizer(model, config))
    return accelerator.prepare(model, build_optimizer(model, config))
