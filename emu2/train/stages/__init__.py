"""The training stages, each a step function and its set-up handed to the one runner (`emu2.train.runner`):

- `lm`: every stage that trains the Emu2 model through its autoregressive objective (paper 2.2.1-2.2.2 and 2.3:
  stage 1 on image-text pairs, stage 2 on interleaved data, Emu2-Chat and Emu2-Gen instruction tuning);
- `encoder` (``stage: encoder``): pre-training of a random vision encoder, the stand-in for EVA-CLIP (2.1);
- `decoder` (``stage: decoder`` / ``video-decoder``): the visual decoders learn to turn the frozen encoder's
  embeddings back into images and clips (2.2.3).

`train` picks the stage a recipe names.
"""

from __future__ import annotations


def train(config, *, resume: bool = False, data=None, stop_after: int | None = None) -> dict:
    """Run (or resume) the stage of ``config`` (a `emu2.train.config.TrainConfig`); returns the runner's summary.

    ``resume``: continue from the newest valid checkpoint in ``output_dir``; ``stop_after``: checkpoint and return
    once this step is done; ``data`` (language-model stages only): an iterable of collated batches instead of the
    recipe's data section (see `emu2.train.stages.lm.train_lm_stage`).
    """
    if config.stage in ("decoder", "video-decoder", "encoder") and data is not None:
        raise ValueError(f"stage: {config.stage} reads its recipe's data section; data= is for the LM stages")
    if config.stage == "decoder":
        from .decoder import train_decoder_stage as entry
    elif config.stage == "video-decoder":
        from .decoder import train_video_decoder_stage as entry
    elif config.stage == "encoder":
        from .encoder import train_encoder_stage as entry
    else:
        from .lm import train_lm_stage

        return train_lm_stage(config, resume=resume, data=data, stop_after=stop_after)
    return entry(config, resume=resume, stop_after=stop_after)
