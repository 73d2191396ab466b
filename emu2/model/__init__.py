"""Emu2 model parts: nn modules and the tensor-level code around them (paper 2.1). Loading and calling them
end to end is `emu2.pipelines`.

* `emu2`: `Emu2ForCausalLM`: vision encoder -> mean-pooled n x n embeddings -> ``project_up`` -> LLaMA ->
  ``lm_head`` (text, cross-entropy) and ``project_down`` (visual embeddings, regression), one loss (2.1, 2.2).
* `vision`: the EVA-CLIP vision encoder and `encode_image` (2.1).
* `interleaved`: one decoding loop over one KV cache that writes text and regresses images in turn.
* `decoder`, `decoder_configs`, `video_decoder`: diffusion-decoder parts (pixel space, spatial conditioning,
  official scheduler settings, small UNet configs, per-frame cross-attention) shared by the decoder pipelines and
  their training (2.2.3).
* `quantization`: 4/8-bit loading of the LM; `kind`: what a model directory holds; `errors`: weights that do
  not fit.

Shape legend used throughout: B batch, L sequence, N images, M video frames, Q visual embeddings per image
(n_query) or frame (v_query), S image side, D LM hidden, Dv vision width, V vocabulary.
"""

from .emu2 import Emu2ForCausalLM, Emu2Output, SlotCountError
from .errors import CheckpointMismatchError
from .vision import EVAVisionTransformer

__all__ = ["CheckpointMismatchError", "Emu2ForCausalLM", "Emu2Output", "EVAVisionTransformer", "SlotCountError"]
