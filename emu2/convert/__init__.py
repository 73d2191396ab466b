"""Formats in and out: official Emu2 checkpoints (native and Hugging Face layouts) and third-party parts.

* `official`: official LM checkpoints -> `Emu2ForCausalLM`; `gen`: official Emu2-Gen -> an `Emu2GenPipeline`
  directory; `export`: our directories -> the official layouts.
* `assemble`: the stage-1 starting point (Table 5, "init."): EVA-CLIP's visual tower + a LLaMA + projections.
* `sdxl`: SDXL-base's UNet and VAE from a local folder, resized for visual-embedding conditioning (2.2.3)."""

from .official import CheckpointMismatchError, load_official, read_official_state_dict

__all__ = ["CheckpointMismatchError", "load_official", "read_official_state_dict"]
