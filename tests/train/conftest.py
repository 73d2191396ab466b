"""Shared pieces for the training tests: a small shapes-world dataset and recipes shrunk to the tiny preset."""

from __future__ import annotations

import pytest
import torch

from emu2.train.config import TrainConfig, load_config

_TOKENIZERS: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine two OpenMP threads per process mostly wait for each
    other (a tiny training step took 3 s with two threads, 0.13 s with one). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cached_tokenizer(monkeypatch):
    """Loading the LLaMA tokenizer takes seconds; the tests never change it, so load each variant once."""
    import emu2.processing as P

    original = P.load_tokenizer

    def load(path=P.DEFAULT_TOKENIZER, instruct=False):
        key = (str(path), instruct)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = original(path, instruct=instruct)
        return _TOKENIZERS[key]

    monkeypatch.setattr(P, "load_tokenizer", load)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """16 samples of every kind, 8 per shard (so two ranks get one shard each)."""
    from emu2.data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, seed=0, num_train=16, num_val=0, num_heldout=0, num_episodes=0, shard_size=8, processes=1)
    return out


def tiny_config(recipe: str, output_dir, shapes_dir=None, batch_size: int = 1, overrides=()) -> TrainConfig:
    """A packaged recipe on the tiny-chat preset (random init), fp32, batch ``batch_size`` per stream;
    ``overrides`` (``key=value``) apply last."""
    defaults = [
        f"output_dir={output_dir}", "model.init_from=null", "model.image_size=null",
        "model.preset=tiny-chat",  # the instruct vocabulary: every sample kind, chat included, fits it
        "model.activation_checkpointing=false", "mixed_precision=no", "gradient_accumulation_steps=1",
        "log.progress=false", "log.tensorboard=false", "log.every=1", "checkpoint.every=1000",
        "data.max_length=256", "data.shuffle_buffer=4", "data.num_workers=0",
        *([f"data.root={shapes_dir}"] if shapes_dir is not None else []),
    ]
    config = load_config(recipe, [*defaults, *overrides])
    config.model.config_overrides.pop("n_query", None)  # tiny's 4x4 patch grid is pooled to 2x2
    for stream in config.data.streams.values():
        stream.batch_size = batch_size
    return config


class FixedBatches:
    """The same micro-batches every step (the "reduce the loss on a fixed batch" checks)."""

    def __init__(self, window: list[dict]):
        self.window, self.micro_batches_per_step, self.steps = window, len(window), 0

    def __iter__(self):
        while True:
            yield from self.window
            self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
