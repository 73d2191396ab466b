"""Training data: the multimodal sequence layout, WebDataset shards, converters and the shapes world.

* `sequence`: `SequenceConfig`, `Sample`, `collate`, `SequenceBuilder`, `draw_box_image` (the one layout).
* `kinds`: the sample kinds of the paper (records) and `build_sample(record, tokenizer, config, rng)`.
* `records`: the shard layout of each kind; `read_shard`, `decode_record`, `encode_record`.
* `shards` / `mixing`: `ShardDataset`, `Augmentation`, `make_dataloader`, `Source`, weighted mixing, resume.
* `convert`: LAION/CapsFusion, MMC4, GRIT, LLaVA and InstructPix2Pix to shards.
* `boxes`: the official box-mask images of grounded generation (`draw_box_image` in pixels).
* `decoder_shards`: the visual decoder's random crops with SDXL's size conditions (A.3.1), from memory or shards.
* `shapes`: the procedural shapes world (``python -m emu2.data.shapes --out DIR``).
* `bench`: `benchmark_pipeline` (samples/s through the whole pipeline).
* `cli`: ``emu2 data shapes|convert`` argument parsers (importing it stays light).

The names below are imported on first use, so ``import emu2.data.cli`` does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "IGNORE_INDEX": "sequence", "Sample": "sequence", "SequenceConfig": "sequence", "SequenceError": "sequence",
    "collate": "sequence", "draw_box_image": "sequence", "KINDS": "kinds", "build_sample": "kinds",
}
__all__ = ["IGNORE_INDEX", "KINDS", "Sample", "SequenceConfig", "SequenceError", "build_sample", "collate",
           "draw_box_image"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"emu2.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'emu2.data' has no attribute {name!r}")
