"""The procedural shapes world: tiny rendered scenes that exercise every Emu2 sample kind and in-context tasks.

`write_shapes(out, seed)` (or ``python -m emu2.data.shapes --out DIR --seed 0``) writes training shards of every
kind, held-out splits and few-shot evaluation episodes; `fewshot_prompt` turns an episode into a k-shot prompt.
Modules: `world` (attributes, scenes, held-out combinations), `render` (PIL drawing), `tasks` (sample kinds,
hidden in-context tasks, episodes), `write` (shards), `cli`.
"""

from importlib import import_module

_EXPORTS = {"ShapesMaker": "tasks", "fewshot_prompt": "tasks", "make_episode": "tasks", "World": "world",
            "write_shapes": "write"}
__all__ = ["ShapesMaker", "World", "fewshot_prompt", "make_episode", "write_shapes"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"emu2.data.shapes.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'emu2.data.shapes' has no attribute {name!r}")
