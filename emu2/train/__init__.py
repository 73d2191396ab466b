"""Training every Emu2 stage on Hugging Face accelerate (paper 2.2, 2.3; appendices A-C).

    from emu2.train import load_config, train
    train(load_config("shapes-stage1", ["steps=20"]))

Parts: `config` (recipes, overrides), `model` (load/adjust/freeze/LoRA), `optim` (groups, schedule), `data`
(recipe -> batches), `runner` (the one training runner), `stages` (what each stage hands it: `stages.lm`,
`stages.encoder`, `stages.decoder` with its step `stages.diffusion`), `checkpoint` (atomic, verified, exact resume), `metrics`, `quickstart`,
`bench`, `cli` (``emu2 train``). Recipes: ``emu2/recipes/*.yaml`` (`recipe_names()`).

The names below are imported on first use, so ``import emu2.train.cli`` does not load torch.
"""

from importlib import import_module

_EXPORTS = {"ConfigError": "config", "TrainConfig": "config", "load_config": "config", "recipe_names": "config",
            "TrainingDiverged": "runner", "train": "stages", "run_train_benchmark": "bench"}
__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "load_config", "recipe_names", "run_train_benchmark", "train"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"emu2.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'emu2.train' has no attribute {name!r}")
