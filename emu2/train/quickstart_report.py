"""The quickstart's report: every evaluation of the trained stages, the generation gallery, the loss curves and
``report.md`` (`evaluate_quickstart`, `write_report_markdown`); `emu2.train.quickstart` trains what they read."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

EVAL_ITEMS = 200  # per chat task and generation task
# Denoising steps of every generated image in the evaluation: DPM-Solver++ (the Gen default sampler) at 10 steps
# lands within about 0.6 grey levels of the official 50 Euler steps (docs/benchmarks.md), plenty for the pixel
# detector, and the evaluation draws 600 images.
EVAL_DENOISING_STEPS = 10
# Classifier-free guidance of every generated image in the evaluation: none (1.0; the official default is 3.0). The
# small Gen model's regressed embeddings lie near the mean of the scenes a caption allows, and guidance pushes them
# off what the decoder was trained on: measured on 100 held-out captions (docs/training-notes.md, "Guidance"),
# text-to-image background 93 % at 1.0, 68 % at 1.5 and 33 % at 3.0. Autoencoding is within noise at 1.0 and 3.0.
EVAL_GUIDANCE = 1.0


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_quickstart(out: Path, stage_names: list[str], items: int = EVAL_ITEMS) -> dict:
    """Every figure of the report, from the trained stages in ``out`` (``stage_names``: in training order)."""
    from ..data.shapes.world import World
    from ..eval.probe import linear_probe
    from ..eval.shapes import copy_accuracy, evaluate_fewshot, evaluate_instructions, plot_accuracy_vs_shots
    from ..pipelines.emu2 import Emu2Pipeline

    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    results = {}
    manifest = json.loads((out / "data" / "dataset.json").read_text())
    world = World.from_seed(manifest.get("seed", 0))
    # What the encoder's pooled embeddings carry, before and after stage 1 trains it through the LM.
    results["linear_probe"] = {}
    for name in ("encoder", "stage1"):
        if (out / name / "config.json").is_file():
            model = Emu2Pipeline.from_pretrained(out / name).model
            results["linear_probe"][name] = {
                split_name: linear_probe(model, world, manifest.get("image_size", 64), test_split=split)
                for split_name, split in (("unseen_renders", "train"), ("heldout_combos", "heldout"))}
    base = Emu2Pipeline.from_pretrained(out / "stage2")
    results["fewshot"] = evaluate_fewshot(base, out / "data")
    plot_accuracy_vs_shots(results["fewshot"], report_dir / "accuracy_vs_shots.png")
    from ..eval.shapes_interleaved import evaluate_interleaved_consistency
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    decoder = Emu2VisualDecoderPipeline.from_pretrained(out / "emu2-gen" / "decoder")
    decoder.set_progress_bar_config(disable=True)
    # The base model continues a story of captioned scenes and draws the scene it wrote (one model, text + image).
    results["interleaved_consistency"] = evaluate_interleaved_consistency(base, decoder, out / "data",
                                                                          documents=items,
                                                                          num_inference_steps=EVAL_DENOISING_STEPS,
                                                                          guidance_scale=EVAL_GUIDANCE)
    def copying(pipe) -> dict:  # the induction that binding new label words needs, on both kinds of words, and
        # across ten scene sentences (about as far as an 8-shot query is from the example it copies from)
        return {**copy_accuracy(pipe), "heldout_words": copy_accuracy(pipe, words="held-out"),
                "across_10_sentences": copy_accuracy(pipe, gap=10)}

    results["copying"] = copying(base)
    # ... and where it comes from: the LM stage teaches it; stage 1 (captions only) may wear it down
    results["copying_by_stage"] = {name: copying(Emu2Pipeline.from_pretrained(out / name))
                                   for name in ("lm", "lm-long", "stage1") if (out / name / "config.json").is_file()}
    results["copying_by_stage"]["stage2"] = results["copying"]
    results["instructions"] = evaluate_instructions(Emu2Pipeline.from_pretrained(out / "chat"), out / "data",
                                                    items=items)
    results["generation"] = generation_gallery(out, report_dir / "gallery.png")
    from ..eval.shapes_generation import evaluate_generation
    from ..pipelines.gen import Emu2GenPipeline

    # Attribute accuracy read back from the pixels by the shapes detector (held-out scenes).
    gen = Emu2GenPipeline.from_pretrained(out / "emu2-gen")
    gen.decoder.set_progress_bar_config(disable=True)
    results["generation_attributes"] = evaluate_generation(gen, out / "data", items=items,
                                                           num_inference_steps=EVAL_DENOISING_STEPS,
                                                           guidance_scale=EVAL_GUIDANCE)
    plot_loss_curves(out, stage_names, report_dir / "loss_curves.png")
    return results


def generation_gallery(out: Path, path: Path, rows: int = 6) -> dict:
    """Held-out prompts -> images with the Gen model + decoder, beside the true renders; CLIP-I-style scores
    under the model's own encoder for text-to-image and autoencoding."""
    import random

    import torch
    from PIL import Image, ImageDraw

    from ..data.shapes.render import render_scene
    from ..data.shapes.tasks import caption
    from ..data.shapes.world import World
    from ..pipelines.gen import Emu2GenPipeline

    gen = Emu2GenPipeline.from_pretrained(out / "emu2-gen")
    gen.decoder.set_progress_bar_config(disable=True)
    manifest = json.loads((out / "data" / "dataset.json").read_text())
    world, rng = World.from_seed(manifest.get("seed", 0)), random.Random(7)
    size = manifest.get("image_size", 64)
    model = gen.encoder.model
    cells, sims = [], {"text_to_image": [], "autoencode": []}

    def embed(image):
        from ..processing import preprocess_image

        with torch.no_grad():
            return model.encode_image(preprocess_image(image, model.config.vision_config.image_size)[None]).flatten()

    for row in range(rows):
        scene = world.group_scene(rng, "heldout")
        truth, prompt = render_scene(scene, size), caption(scene, rng)
        generator = torch.Generator().manual_seed(row)
        draw_kwargs = dict(num_inference_steps=EVAL_DENOISING_STEPS, guidance_scale=EVAL_GUIDANCE, generator=generator)
        made, recon = gen([prompt], **draw_kwargs).image, gen([truth], **draw_kwargs).image
        for key, image in (("text_to_image", made), ("autoencode", recon)):
            sims[key].append(float(torch.nn.functional.cosine_similarity(embed(image), embed(truth), dim=0)))
        cells.append((prompt, truth, made, recon))
    tile, text_w = 96, 330
    sheet = Image.new("RGB", (text_w + 3 * tile, rows * tile + 20), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "prompt (held-out combination)", fill="black")
    for i, name in enumerate(("true render", "text-to-image", "autoencoded")):
        draw.text((text_w + i * tile + 4, 4), name, fill="black")
    for r, (prompt, *images) in enumerate(cells):
        y = 20 + r * tile
        # The whole prompt, wrapped to the text column (PIL's default font is about 6 px a character).
        lines = textwrap.wrap(prompt, width=(text_w - 8) // 6)
        for i, line in enumerate(lines):
            draw.text((4, y + tile // 2 - 6 * len(lines) + 12 * i), line, fill="black")
        for i, image in enumerate(images):
            sheet.paste(image.resize((tile - 4, tile - 4)), (text_w + i * tile, y))
    sheet.save(path)
    return {f"clip_i_own_encoder_{k}": round(sum(v) / len(v), 4) for k, v in sims.items()} | {"rows": rows}


def plot_loss_curves(out: Path, stage_names: list[str], path: Path) -> None:
    """The training loss of each stage in ``stage_names`` that wrote metrics, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2))
    FigureCanvasAgg(fig)
    trained = [name for name in stage_names if (out / name / "metrics.jsonl").is_file()]
    for index, name in enumerate(trained):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ax = fig.add_subplot(1, len(trained), index + 1)
        for key in ("text_loss", "regression_loss", "loss"):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points and (key != "loss" or name in ("decoder", "encoder")):
                ax.plot(*zip(*points), label=key.replace("_loss", ""))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def probe_table(probes: dict) -> str:
    """Markdown: rows = the encoder after each stage, columns = linear-probe accuracy % [95 % interval]."""
    from ..eval.intervals import format_interval
    from ..eval.probe import PROBE_ATTRIBUTES

    lines = ["| encoder after | test renders | " + " | ".join(PROBE_ATTRIBUTES) + " |",
             "|---|---|" + "---:|" * len(PROBE_ATTRIBUTES)]
    for name, splits in probes.items():
        for split, result in splits.items():
            cells = " | ".join(format_interval(result[a]) for a in PROBE_ATTRIBUTES)
            lines.append(f"| {name} | {split.replace('_', ' ')} | {cells} |")
    return "\n".join(lines)


def _copying(scores: dict) -> str:
    """made-up / held-out words / made-up across 10 sentences; the last two are absent from older reports."""
    held, far = scores.get("heldout_words"), scores.get("across_10_sentences")
    return " / ".join([f"{scores['copy_accuracy']:.1%}", f"{held['copy_accuracy']:.1%}" if held else "not measured",
                       f"{far['copy_accuracy']:.1%}" if far else "not measured"])


def write_report_markdown(out: Path, report: dict) -> None:
    from ..eval.shapes import fewshot_table, instructions_table
    from ..eval.shapes_generation import generation_table
    from ..eval.shapes_interleaved import interleaved_table

    lines = ["# emu2 quickstart report", "",
             f"Budget {report['budget_minutes']} min; total {report['total_seconds'] / 60:.1f} min. Every figure "
             "has its 95 % confidence interval in brackets.", "",
             "## What the encoder sees", "",
             "Linear probe (ridge classifier) of the pooled visual embeddings, fitted on 3,000 training renders "
             "and scored on 600 new renders of the training combinations (unseen renders) and 600 of the held-out "
             "(shape, colour) combinations (`emu2.eval.probe`):", "",
             probe_table(report.get("linear_probe", {})), "",
             "## Held-out few-shot accuracy (base model after stage 2)", "",
             "Exact match % [95 % interval] (field accuracy % [95 % interval]) by number of in-context examples.",
             "",
             fewshot_table(report["fewshot"]), "", "![accuracy vs shots](accuracy_vs_shots.png)", "",
             "Copying (a word list, then its repeat; next-token accuracy on the repeat, `copy_accuracy`), made-up "
             "words / the held-out label words / made-up words with ten scene sentences between list and repeat: "
             + ", ".join(f"{name} {_copying(r)}"
                         for name, r in report.get("copying_by_stage", {"stage2": report["copying"]}).items())
             + ".", "",
             "## Interleaved generation (base model after stage 2)", "",
             "The model continues a story of captioned held-out scenes: it writes the next caption, then the image "
             "after it (forced at the caption's end) is decoded and read back by the pixel detector; the score is "
             "agreement with the model's own caption. True renders of the caption are the ceiling, images scored "
             "against another document's caption the floor.", "",
             interleaved_table(report["interleaved_consistency"]) if "interleaved_consistency" in report else "-", "",
             "## Chat model (held-out scenes)", "", instructions_table(report["instructions"]), "",
             "## Generation", "", ("Attribute accuracy of generated images, read back by the pixel detector "
                                   f"(`emu2.data.shapes.detect`); {EVAL_DENOISING_STEPS} DPM-Solver++ steps, "
                                   f"guidance {EVAL_GUIDANCE:g}; the true renders are its ceiling:"), "",
             generation_table(report["generation_attributes"]), "", "```", json.dumps(report["generation"], indent=2),
             "```", "",
             "![gallery](gallery.png)", "", "## Training", "", "![loss curves](loss_curves.png)", "", "```",
             json.dumps(report["stages"], indent=2), "```", ""]
    (out / "report" / "report.md").write_text("\n".join(lines))
