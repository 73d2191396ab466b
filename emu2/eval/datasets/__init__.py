"""Benchmark readers: the public files, from local paths only, into one record type (`EvalRecord`).

One module per family: ``image_qa`` (VQAv2, OK-VQA, VizWiz, TextVQA, GQA, Hateful Memes), ``video_qa``
(MSVD-QA, MSRVTT-QA), ``multiple_choice`` (SEED-Bench, MMMU), ``grounding`` (RefCOCO/+/g), ``generation``
(COCO captions 30k, DreamBench). A missing file raises FileNotFoundError naming the path expected.
"""

from .generation import load_coco_captions, load_dreambench, parse_dreambench_prompts
from .grounding import load_refcoco
from .image_qa import load_gqa, load_hateful_memes, load_okvqa, load_textvqa, load_vizwiz, load_vqav2
from .multiple_choice import load_mmmu, load_seed_bench
from .record import EvalRecord, load_frames, load_images, uniform_frame_indices
from .video_qa import load_msrvtt_qa, load_msvd_qa

__all__ = [
    "EvalRecord",
    "load_coco_captions",
    "load_dreambench",
    "load_frames",
    "load_gqa",
    "load_hateful_memes",
    "load_images",
    "load_mmmu",
    "load_msrvtt_qa",
    "load_msvd_qa",
    "load_okvqa",
    "load_refcoco",
    "load_seed_bench",
    "load_textvqa",
    "load_vizwiz",
    "load_vqav2",
    "parse_dreambench_prompts",
    "uniform_frame_indices",
]
