"""DeepSpeed through `accelerate launch`: ZeRO-2/3 on two CPU processes (DeepSpeed's CPU accelerator, gloo) match
one plain process with the same global batch and resume exactly; the recipe, not the DeepSpeed config, decides
clipping and accumulation; settings that would take over the recipe are refused; the NaN stop holds.

The launched tests need deepspeed (`pip install --no-build-isolation deepspeed`) and are skipped without it."""

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emu2.train import TrainingDiverged, train
from emu2.train.checkpoint import CheckpointError, verify
from emu2.train.config import load_config
from emu2.train.metrics import read_metrics
from emu2.train.stages.lm import (
    StepResult,
    check_deepspeed_config,
    deepspeed_update,
    recipe_into_deepspeed_config,
)

from .test_distributed import RECIPE, _free_port

ACCELERATE = Path(sys.executable).parent / "accelerate"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def _launch(tmp_path: Path, config_file: Path, output: Path, *arguments: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(ACCELERATE), "launch", "--config_file", str(config_file), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", "emu2.train", str(recipe),
         f"output_dir={output}", *arguments],
        check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def _single_process(tmp_path: Path, name: str, accumulation: int) -> Path:
    out = tmp_path / name
    train(load_config(dict(RECIPE), [f"output_dir={out}", f"gradient_accumulation_steps={accumulation}"]))
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    assert [r["loss"] for r in read_metrics(a)] == pytest.approx([r["loss"] for r in read_metrics(b)], rel=1e-5)
    assert [r["tokens"] for r in read_metrics(a)] == [r["tokens"] for r in read_metrics(b)]
    # AdamW after clipping hardly sees a constant factor on the gradient, the logged norm (before clipping) does.
    assert [r["grad_norm"] for r in read_metrics(a)] == pytest.approx([r["grad_norm"] for r in read_metrics(b)],
                                                                      rel=1e-4)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


def _plugin(ds_config: dict):
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, **ds_config})


def test_the_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {f.name: load_config_from_file(str(f)).distributed_type.value for f in CONFIGS.glob("*.yaml")}
    assert kinds == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed-zero3.yaml": "DEEPSPEED"}
    zero3 = load_config_from_file(str(CONFIGS / "deepspeed-zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3
    assert "gradient_accumulation_steps" not in zero3 and "gradient_clipping" not in zero3  # the recipe's


def test_the_recipe_decides_clipping_and_accumulation_in_the_deepspeed_config():
    config = load_config(dict(RECIPE), ["optim.grad_clip=0.5"])
    plugin = _plugin({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto"})
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)
    with pytest.warns(UserWarning, match="gradient_clipping=1.0; using the recipe's 0.5"):
        recipe_into_deepspeed_config(accelerator, config, micro_batches_per_step=3)
    ds = plugin.deepspeed_config
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 3
    assert accelerator.gradient_accumulation_steps == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4  # the stream's batch size: DeepSpeed's sample counter only
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    no_clip = load_config(dict(RECIPE), ["optim.grad_clip=null"])
    plugin = _plugin({})
    recipe_into_deepspeed_config(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), no_clip, 1)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"


def test_deepspeed_settings_that_would_replace_the_recipe_are_refused():
    config = load_config(dict(RECIPE), [])
    with pytest.raises(ValueError, match="optim and schedule sections build them"):
        check_deepspeed_config(_plugin({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}), config)
    stage0 = _plugin({"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="ZeRO stage 0 is plain data parallelism"):
        check_deepspeed_config(stage0, config)
    stage3 = _plugin({"zero_optimization": {"stage": 3}})
    lora = load_config(dict(RECIPE), ["lora.enabled=true"])
    with pytest.raises(NotImplementedError, match="LoRA with ZeRO-3"):
        check_deepspeed_config(stage3, lora)
    check_deepspeed_config(stage3, config)


class _Engine:
    """What `deepspeed_update` needs of a DeepSpeed engine: step, the gradient norm, whether the step applied."""

    def __init__(self, norm: float | None, applies: bool):
        self.norm, self.applies, self.steps = norm, applies, 0

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm

    def was_step_applied(self):
        return self.applies


def _result(loss: float) -> StepResult:
    return StepResult(loss, loss, 0.0, 10, 0, 20, math.nan)


def test_a_nan_loss_stops_before_the_deepspeed_engine_steps():
    config = load_config(dict(RECIPE), [])
    engine = _Engine(norm=1.0, applies=True)
    result = deepspeed_update(engine, SimpleNamespace(step=lambda: None), _result(float("nan")), config)
    assert engine.steps == 0 and math.isnan(result.loss)

    result = deepspeed_update(engine, SimpleNamespace(step=lambda: None), _result(2.0), config)
    assert engine.steps == 1 and result.grad_norm == 1.0


def test_a_non_finite_gradient_norm_is_divergence_and_an_applied_one_is_reported_as_corruption():
    config = load_config(dict(RECIPE), [])
    skipped = deepspeed_update(_Engine(float("inf"), applies=False), SimpleNamespace(step=lambda: None),
                                _result(2.0), config)
    assert math.isinf(skipped.grad_norm)  # ZeRO skipped the update; the loop raises TrainingDiverged
    with pytest.raises(TrainingDiverged, match="applied the update anyway"):
        deepspeed_update(_Engine(float("nan"), applies=True), SimpleNamespace(step=lambda: None), _result(2.0), config)
    with pytest.raises(RuntimeError, match="computed no gradient norm"):
        deepspeed_update(_Engine(None, applies=True), SimpleNamespace(step=lambda: None), _result(2.0), config)


@pytest.mark.slow
def test_zero2_on_two_cpu_processes_with_accumulation_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    # 2 ranks x 2 accumulated micro-batches of 1 sample vs one process accumulating 4 micro-batches of 1.
    config_file = tmp_path / "zero2.yaml"
    config_file.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                           "num_machines": 1, "deepspeed_config": {"zero_stage": 2}}))
    zero2 = _launch(tmp_path, config_file, tmp_path / "zero2", "gradient_accumulation_steps=2")
    assert zero2.returncode == 0, zero2.stderr[-3000:]
    _assert_same_training(tmp_path / "zero2", _single_process(tmp_path, "single", accumulation=4))


@pytest.mark.slow
def test_zero3_from_the_example_config_matches_one_process_and_resumes_from_its_own_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    config_file = CONFIGS / "deepspeed-zero3.yaml"
    zero3 = _launch(tmp_path, config_file, tmp_path / "zero3", "--stop-after", "2")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    checkpoint = tmp_path / "zero3" / "checkpoints" / "step-00000002"
    assert verify(checkpoint) is None  # the manifest covers DeepSpeed's partitions too
    assert (checkpoint / "model" / "model.safetensors").is_file() and not (checkpoint / "optimizer.pt").exists()
    assert len(list((checkpoint / "deepspeed").rglob("zero_pp_rank_*_optim_states.pt"))) == 2

    zero3 = _launch(tmp_path, config_file, tmp_path / "zero3", "--resume")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    _assert_same_training(tmp_path / "zero3", _single_process(tmp_path, "single", accumulation=2))

    # A DeepSpeed checkpoint holds DeepSpeed's optimizer partitions: resuming it without DeepSpeed is refused.
    config = load_config(dict(RECIPE), [f"output_dir={tmp_path / 'zero3'}", "steps=4"])
    with pytest.raises(CheckpointError, match="deepspeed-zero3 optimizer state and this run is torch"):
        train(config, resume=True)
