"""What a model directory holds, recorded in its config.json: a base Emu2, an Emu2-Chat, or an Emu2-Gen encoder.

Nothing else tells them apart (every shapes-world model has the chat tokens [USER]/[ASSISTANT] in its vocabulary),
and evaluation depends on it: the paper evaluates base Emu2 few-shot with RICES (section 3.1) and Emu2-Chat
zero-shot through its chat template (section 3.2). The trainer records the kind from the recipe's stage, and
`emu2 convert` from the official release converted.
"""

from __future__ import annotations

MODEL_KINDS = ("base", "chat", "gen")
# Recipe stage -> the kind of model it writes (the encoder and decoder stages write no Emu2 language model).
STAGE_KINDS = {"lm": "base", "stage1": "base", "stage2": "base", "chat": "chat", "gen": "gen"}
# Official releases (`emu2 convert --preset ...`) -> kind.
PRESET_KINDS = {"emu2": "base", "emu2-chat": "chat", "emu2-gen": "gen"}


def record_model_kind(config, kind: str) -> None:
    """Write ``kind`` into an `Emu2Config` (saved with it as ``model_kind`` in config.json)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    config.model_kind = kind


def model_kind(config) -> str | None:
    """The recorded kind, or None for a directory written before kinds were recorded (or by `emu2 init`)."""
    return getattr(config, "model_kind", None)
