"""`accelerate launch` with two CPU processes (gloo): DDP matches one process with the same global batch;
FSDP, which accelerate enables only on GPU-like devices, is refused instead of silently running as DDP."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emu2.train import train
from emu2.train.config import load_config
from emu2.train.metrics import read_metrics

ACCELERATE = Path(sys.executable).parent / "accelerate"

RECIPE = {
    "stage": "stage2", "output_dir": "OUT", "steps": 3, "seed": 0, "mixed_precision": "no",
    "model": {"preset": "tiny"},
    "data": {"synthetic": {"seq_len": 40, "images": 1, "regress": True},
             "streams": {"synthetic": {"batch_size": 4, "sources": []}}},
    "optim": {"lr": {"project": 1e-3, "lm": 1e-3}, "freeze": ["visual"], "grad_clip": 1.0},
    "schedule": {"warmup_steps": 1, "decay": "cosine"},
    "checkpoint": {"every": 1000, "keep_last": 1},
    "log": {"every": 1, "tensorboard": False, "progress": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, accelerate_config: dict, output: Path, *arguments: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    config_file = tmp_path / f"accelerate-{accelerate_config['distributed_type']}.yaml"
    config_file.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "num_machines": 1,
                                           "num_processes": 2, "mixed_precision": "no",
                                           "main_process_port": _free_port(), **accelerate_config}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(ACCELERATE), "launch", "--config_file", str(config_file), "-m", "emu2.train", str(recipe),
         f"output_dir={output}", *arguments],
        check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch_and_resumes(tmp_path):
    # Two ranks x 2 samples vs one process accumulating 2 x 2 samples: the same 4 samples per step. The DDP run
    # is also cut after step 2 and resumed by a second launch.
    ddp = _launch(tmp_path, {"distributed_type": "MULTI_GPU"}, tmp_path / "ddp", "--stop-after", "2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp = _launch(tmp_path, {"distributed_type": "MULTI_GPU"}, tmp_path / "ddp", "--resume")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    single = load_config(dict(RECIPE), [f"output_dir={tmp_path / 'single'}", "gradient_accumulation_steps=2"])
    train(single)

    ddp_curve = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    single_curve = [r["loss"] for r in read_metrics(tmp_path / "single")]
    assert len(ddp_curve) == 3 and ddp_curve == pytest.approx(single_curve, rel=1e-5)
    assert [r["tokens"] for r in read_metrics(tmp_path / "ddp")] == [r["tokens"] for r in read_metrics(tmp_path / "single")]
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    # Each rank saved its own data position and RNG state.
    ranks = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-00000003").glob("rank-*.pt"))
    assert ranks == ["rank-0.pt", "rank-1.pt"]


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_with_an_explanation(tmp_path):
    fsdp = {"distributed_type": "FSDP",
            "fsdp_config": {"fsdp_version": 2, "fsdp_sync_module_states": False,
                            "fsdp_cpu_ram_efficient_loading": False, "fsdp_state_dict_type": "FULL_STATE_DICT",
                            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer,Block"}}
    result = _launch(tmp_path, fsdp, tmp_path / "fsdp")
    if torch.accelerator.is_available():  # pragma: no cover - a GPU machine runs FSDP for real
        assert result.returncode == 0, result.stderr[-3000:]
        return
    assert result.returncode != 0
    assert "asks for FSDP but accelerate set up MULTI_CPU" in result.stderr
    assert not (tmp_path / "fsdp" / "checkpoints").exists()
