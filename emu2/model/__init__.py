"""Emu2 model parts.

Shape legend used throughout: B batch, L sequence, N images, M video frames, Q visual embeddings per image
(n_query) or frame (v_query), S image side, D LM hidden, Dv vision width, V vocabulary.
"""

from .emu2 import Emu2ForCausalLM, Emu2Output, SlotCountError
from .errors import CheckpointMismatchError
from .vision import EVAVisionTransformer

__all__ = ["CheckpointMismatchError", "Emu2ForCausalLM", "Emu2Output", "EVAVisionTransformer", "SlotCountError"]
