"""Reading the official Emu2 checkpoint formats (native and Hugging Face layouts)."""

from .official import CheckpointMismatchError, load_official, read_official_state_dict

__all__ = ["CheckpointMismatchError", "load_official", "read_official_state_dict"]
