"""Per-frame cross-attention for the video decoder's 3D UNet (paper 2.2.3).

The paper adapts a 2D UNet to 3D by adding a temporal convolution after each spatial one and extending
spatial attention to spatio-temporal attention, initialised from Stable Diffusion 2.1, and conditions it on
Emu2's visual embeddings. diffusers' `UNet3DConditionModel` is that architecture (temporal convolutions and
temporal attention after every spatial layer); the pipeline that samples it is
`emu2.pipelines.video_decoder.Emu2VideoDecoderPipeline`.

Conditioning choice: **per-frame cross-attention**. Frame f's spatial cross-attention attends only to
frame f's Q embeddings. The alternative, every frame attending to all F x Q embeddings at once, gives a
frame no way to tell its own embeddings from the others': cross-attention is permutation-invariant over its
keys and the UNet has no frame-position code. The temporal layers still mix information across frames. diffusers' 3D UNet
repeats one context per frame, so the pipeline passes the concatenated (B, F*Q, Dv) embeddings and
`PerFrameCrossAttnProcessor` gives each (batch, frame) row its own Q-slice.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


class PerFrameCrossAttnProcessor(AttnProcessor2_0):
    """Cross-attention of frame f to its own embeddings only.

    The 3D UNet flattens (B, F) into rows b * F + f and repeats the context per row; given ``num_frames`` (via
    ``cross_attention_kwargs``) this picks slice f of each row's (F*Q, Dv) context. Self-attention (no
    context) is unchanged.
    """

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        num_frames: int | None = None,
    ):
        if encoder_hidden_states is not None and num_frames:
            rows = encoder_hidden_states.shape[0]
            if encoder_hidden_states.shape[1] % num_frames:
                raise ValueError(
                    f"context length {encoder_hidden_states.shape[1]} is not num_frames ({num_frames}) x Q"
                )
            per_frame = encoder_hidden_states.unflatten(1, (num_frames, -1))  # (B*F, F, Q, Dv)
            index = torch.arange(rows, device=per_frame.device)
            encoder_hidden_states = per_frame[index, index % num_frames]  # (B*F, Q, Dv)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
