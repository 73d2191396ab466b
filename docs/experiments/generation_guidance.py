"""Generation attribute accuracy (`emu2.eval.shapes_generation.evaluate_generation`, the quickstart report's table)
at several classifier-free guidance scales, for a Gen model and a decoder trained apart.

    python docs/experiments/generation_guidance.py GEN_MODEL_DIR DECODER_DIR DATA_DIR ITEMS GUIDANCE [GUIDANCE ...]

GEN_MODEL_DIR: e.g. runs/quickstart/gen; DECODER_DIR: runs/quickstart/emu2-gen/decoder; DATA_DIR: the dataset.
"""
# ruff: noqa
import sys

import torch

torch.set_num_threads(2)
from emu2.eval.shapes_generation import evaluate_generation
from emu2.pipelines.gen import Emu2GenPipeline
from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.train.quickstart_report import EVAL_DENOISING_STEPS

gen_dir, decoder_dir, data, items, *scales = sys.argv[1:]
gen = Emu2GenPipeline(Emu2Pipeline.from_pretrained(gen_dir), Emu2VisualDecoderPipeline.from_pretrained(decoder_dir))
gen.decoder.set_progress_bar_config(disable=True)
for scale in scales:
    result = evaluate_generation(gen, data, items=int(items), num_inference_steps=EVAL_DENOISING_STEPS,
                                 guidance_scale=float(scale))
    for kind in ("text_to_image", "autoencode"):
        row = result[kind]
        print(f"guidance {float(scale):g} {kind}: " + ", ".join(
            f"{a} {100 * row[a]:.1f} [{100 * row['ci95'][a][0]:.1f}, {100 * row['ci95'][a][1]:.1f}]"
            for a in ("shape", "colour", "count", "position", "background", "size")))
