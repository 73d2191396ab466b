"""Pipelines: the one way to load and run each Emu2 model, in diffusers' conventions (``from_pretrained``,
``save_pretrained``, ``to``, a call that returns an output object).

- `Emu2Pipeline` (`emu2.pipelines.emu2`): Emu2 and Emu2-Chat, the LM over interleaved text, images and video
  (paper 2.1-2.2): answers, captions, grounding boxes, few-shot prompts, and answers with images in them.
- `Emu2GenPipeline` (`emu2.pipelines.gen`): Emu2-Gen (paper 2.2.3, 3.4): the LM regresses the visual embeddings
  of a prompt and the image decoder draws them.
- `Emu2VisualDecoderPipeline` (`emu2.pipelines.visual_decoder`): the image decoder alone, visual embeddings ->
  images (the SDXL-style UNet).
- `Emu2VideoDecoderPipeline` (`emu2.pipelines.video_decoder`): the video decoder, per-frame embeddings -> clip.

The names are imported on first use, so that ``from emu2.pipelines import Emu2Pipeline`` does not load diffusers.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Emu2Pipeline": "emu2",
    "Emu2GenPipeline": "gen",
    "Emu2VisualDecoderPipeline": "visual_decoder",
    "Emu2VideoDecoderPipeline": "video_decoder",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
