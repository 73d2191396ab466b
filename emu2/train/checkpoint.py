"""Atomic, verified, exactly-resumable checkpoints.

Layout of ``<output_dir>/checkpoints/step-00001000/``::

    model/            save_pretrained safetensors (LoRA runs: the peft adapter, adapter_model.safetensors)
    optimizer.pt      AdamW state (rank 0; FSDP: the full, gathered state keyed by parameter name)
    deepspeed/        instead of optimizer.pt under DeepSpeed (see below)
    scheduler.pt      LambdaLR state
    trainer.pt        step, tokens seen
    rank-<r>.pt       per rank: RNG states (python, numpy, torch, cuda) and the data stream position
    manifest.json     written last: sha256 and size of every file above

Everything is written into ``.tmp-step-...`` and renamed into place, so a crash mid-write leaves the last good
checkpoint untouched; the oldest are removed only after the rename. Loading verifies the manifest and falls back
to the previous checkpoint (with a warning) when the newest is incomplete or corrupted. Files are plain
tensors/dicts saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: nothing is unpickled.

DeepSpeed runs differ in one place: ``optimizer.pt`` is replaced by ``deepspeed/``, the engine's own checkpoint
(``engine.save_checkpoint``: every rank writes its ZeRO partition of the fp32 master weights and AdamW moments,
plus ``zero_to_fp32.py`` to consolidate them). Resuming restores weights and optimizer from it (exact, also under
bf16, where ``model/`` holds the engine's bf16 weights), needs the same process count and ZeRO stage, and
cannot cross between DeepSpeed and the other backends. The same atomic rename and manifest cover it, but
DeepSpeed reads its files with ``torch.load(weights_only=False)``: resume only from checkpoints you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .model import is_lora

log = logging.getLogger(__name__)
FORMAT = 1
_DEEPSPEED_TAG = "state"  # the subdirectory of deepspeed/ that engine.save_checkpoint writes
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint directory, newest first (not verified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def verify(path: str | Path) -> str | None:
    """None when every file of the manifest is present with its size and sha256; else what is wrong."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exn:
        return f"unreadable manifest.json ({exn})"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) generator states as plain tensors/tuples."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                    "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- model/optimizer
def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _backend(accelerator) -> str:
    """What a checkpoint's optimizer state is tied to: ``deepspeed-zero<stage>`` or ``torch``."""
    if is_deepspeed(accelerator):
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.deepspeed_config['zero_optimization']['stage']}"
    return "torch"


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(accelerator, model) -> dict:
    """Full state dict on the main process (FSDP and ZeRO-3 gather it; other ranks may get an empty dict or None)."""
    if is_deepspeed(accelerator):
        return accelerator.get_state_dict(model)
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return accelerator.unwrap_model(model).state_dict()


def _optimizer_state(accelerator, model, optimizer) -> dict:
    inner = getattr(optimizer, "optimizer", optimizer)
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, inner, options=_full_options())
    return inner.state_dict()


def _save_model(accelerator, model, path: Path) -> None:
    state = full_model_state(accelerator, model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if is_lora(unwrapped):
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            adapter = get_peft_model_state_dict(unwrapped, state_dict=state)
            save_file({k: v.contiguous() for k, v in adapter.items()}, path / "adapter_model.safetensors")
        elif hasattr(unwrapped, "save_pretrained"):  # transformers/diffusers models: their own layout
            unwrapped.save_pretrained(path, state_dict=state, safe_serialization=True)
        else:  # a plain module (the encoder stage's encoder + objective heads)
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")


def _load_model(accelerator, model, path: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no safetensors weights")
    state = {k: v for f in files for k, v in load_file(f).items()}
    unwrapped = accelerator.unwrap_model(model)
    if is_lora(unwrapped):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unwrapped, state)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{path}: adapter tensors not in the model: {result.unexpected_keys[:5]}")
    elif _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_options(strict=True))
    else:
        unwrapped.load_state_dict(state, strict=True)


def _load_optimizer(accelerator, model, optimizer, state: dict) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, inner, state, options=_full_options())
    else:
        inner.load_state_dict(state)


# ------------------------------------------------------------------------------------------- save/load
def save_checkpoint(directory: str | Path, step: int, accelerator, model, optimizer, scheduler, data,
                    trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (every rank calls this); returns its final path."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-step-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    _save_model(accelerator, model, tmp / "model")
    if is_deepspeed(accelerator):
        model.save_checkpoint(tmp / "deepspeed", tag=_DEEPSPEED_TAG, save_latest=False)
    else:
        optimizer_state = _optimizer_state(accelerator, model, optimizer)
        if accelerator.is_main_process:
            torch.save(optimizer_state, tmp / "optimizer.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"format": FORMAT, "step": step, **trainer_state}, tmp / "trainer.pt")
    data_state = data.state_dict() if hasattr(data, "state_dict") else None
    torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "step": step, "world_size": accelerator.num_processes,
                    "backend": _backend(accelerator),
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it only once the new one is whole
            old = directory / f".tmp-old-{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for _, path in list_checkpoints(directory)[keep_last:]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_valid_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; warns about each newer one that does not."""
    for step, path in list_checkpoints(directory):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({problem}); falling back to the previous one",
                      RuntimeWarning, stacklevel=2)
    return None


def load_checkpoint(directory: str | Path, accelerator, model, optimizer, scheduler, data) -> dict:
    """Restore the newest valid checkpoint into the prepared objects; returns trainer state (``step``, ...)."""
    from accelerate.utils import broadcast_object_list

    choice = [None]
    if accelerator.is_main_process:
        found = latest_valid_checkpoint(directory)
        choice = [str(found) if found else None]
    broadcast_object_list(choice)  # one rank verifies; all load the same checkpoint
    if choice[0] is None:
        raise CheckpointError(f"--resume: no valid checkpoint in {directory}")
    path = Path(choice[0])
    manifest = json.loads((path / "manifest.json").read_text())
    saved_by = manifest.get("backend", "torch")  # checkpoints older than DeepSpeed support have no "backend"
    if saved_by != _backend(accelerator):
        raise CheckpointError(f"{path} holds {saved_by} optimizer state and this run is {_backend(accelerator)}: resume "
                              "with the accelerate config that wrote it (its model/ directory can start a new run "
                              "as model.init_from)")
    if manifest["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"{path} was saved by {manifest['world_size']} processes, this run has "
                              f"{accelerator.num_processes}; the data position is per rank, resume with the same count")

    if is_deepspeed(accelerator):  # weights and optimizer from the engine's own partitions
        loaded, _ = model.load_checkpoint(path / "deepspeed", tag=_DEEPSPEED_TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path / 'deepspeed'}")
    else:
        _load_model(accelerator, model, path / "model")
        _load_optimizer(accelerator, model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    rank = torch.load(path / f"rank-{accelerator.process_index}.pt", weights_only=True)
    if rank["data"] is not None and hasattr(data, "load_state_dict"):
        data.load_state_dict(rank["data"])
    set_rng_state(rank["rng"])
    log.info("resumed from %s (step %d)", path, trainer["step"])
    return {**trainer, "path": str(path)}
