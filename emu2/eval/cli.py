"""`emu2 eval ...`: the paper's benchmarks (few-shot with RICES, chat protocol) and the shapes benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# benchmark -> (loader name in emu2.eval.datasets, scorer name in emu2.eval.scoring, few-shot prompt, chat prompt)
BENCHMARKS = {
    "vqav2": ("load_vqav2", "score_vqa", "vqa_prompt_for", "chat_vqa_prompt_for"),
    "okvqa": ("load_okvqa", "score_vqa", "vqa_prompt_for", "chat_vqa_prompt_for"),
    "vizwiz": ("load_vizwiz", "score_vqa", "vqa_prompt_for", "chat_vqa_prompt_for"),
    "textvqa": ("load_textvqa", "score_vqa", "vqa_prompt_for", "chat_vqa_prompt_for"),
    "gqa": ("load_gqa", "score_exact_match", "vqa_prompt_for", "chat_vqa_prompt_for"),
    "hateful_memes": ("load_hateful_memes", "score_hateful_memes", "hateful_memes_prompt_for", None),
    "seed_bench": ("load_seed_bench", "score_multiple_choice", None, "chat_multiple_choice_prompt_for"),
    "mmmu": ("load_mmmu", "score_multiple_choice", None, "chat_multiple_choice_prompt_for"),
}


PROTOCOLS = ("base", "chat")
DEFAULT_SHOTS = [0, 4, 8, 16]


def _shots(text: str) -> list[int]:
    return [int(k) for k in text.split(",") if k.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="evaluate a model: the paper's benchmarks or the shapes benchmark")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    p = sub.add_parser("shapes", help="shapes world: few-shot accuracy vs shots on held-out splits (+ chat tasks)")
    p.add_argument("--model", required=True, help="model directory (few-shot uses it; the paper evaluates base Emu2)")
    p.add_argument("--chat-model", help="instruction-tuned model for VQA / captioning / grounding / video QA")
    p.add_argument("--data", help="shapes dataset (default: <model>/../data, as the quickstart lays it out)")
    p.add_argument("--out", help="output directory for metrics.json, table.md and accuracy_vs_shots.png "
                   "(default: <model>/eval)")
    p.add_argument("--shots", type=_shots, default=[0, 1, 2, 4, 8], help="comma-separated shot counts")
    p.add_argument("--items", type=int, default=48,
                   help="rendered held-out items per chat task and for generation")
    p.add_argument("--gen", help="Emu2-Gen model for generation attribute accuracy (text-to-image, "
                   "autoencoding): a directory with encoder/ and decoder/, or an encoder directory (the "
                   "quickstart's gen/) with --decoder")
    p.add_argument("--decoder", help="visual decoder directory for --gen (default: <gen>/../decoder when "
                   "<gen> has no decoder/)")
    p.add_argument("--gen-steps", type=int, default=25, help="diffusion steps per generated image")
    p.set_defaults(func=run_shapes)

    for name in BENCHMARKS:
        p = sub.add_parser(name, help=f"{name}: the paper's protocol (few-shot with RICES, or the chat protocol)")
        p.add_argument("--model", required=True, help="model directory")
        p.add_argument("--data", required=True, help="the evaluation split's annotation file (see README)")
        p.add_argument("--images", help="image folder of the evaluation split")
        p.add_argument("--annotations", help="VQAv2/OK-VQA: the annotations json with the answers")
        p.add_argument("--support", help="annotation file of the split in-context examples come from (few-shot)")
        p.add_argument("--support-images", help="image folder of the support split")
        p.add_argument("--support-annotations", help="VQAv2/OK-VQA: the support split's annotations json")
        p.add_argument("--protocol", choices=PROTOCOLS,
                       help="base: few-shot prompts (the paper's Emu2 protocol); chat: zero-shot through the chat "
                            "template (Emu2-Chat's). Default: what the model directory records it is (base when "
                            "it records nothing)")
        p.add_argument("--shots", type=_shots, default=None,
                       help=f"comma-separated shot counts (base protocol; default {','.join(map(str, DEFAULT_SHOTS))})")
        p.add_argument("--rices", action="store_true", help="choose examples by RICES (base protocol; default: "
                       "random, seeded)")
        p.add_argument("--num-beams", type=int, default=5, help="beam size (official generate default 5)")
        p.add_argument("--max-new-tokens", type=int, default=10, help="answer length cap (official default 10)")
        p.add_argument("--limit", type=int, help="evaluate only the first N records (quick checks)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--out", default="eval-out", help="output directory (predictions JSONL is resumable)")
        p.set_defaults(func=run_benchmark)
    return parser


# ------------------------------------------------------------------------------------------------ shapes
def load_gen_pipeline(gen: str | Path, decoder: str | Path | None = None):
    """An `Emu2GenPipeline` from ``gen`` (encoder/ + decoder/), or from an encoder directory ``gen`` plus a
    decoder directory (``decoder``, else ``gen``'s sibling ``decoder/``, as the quickstart lays them out)."""
    from ..pipelines.emu2 import Emu2Pipeline
    from ..pipelines.gen import Emu2GenPipeline
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    gen = Path(gen)
    if decoder is None and (gen / "encoder").is_dir() and (gen / "decoder").is_dir():
        pipe = Emu2GenPipeline.from_pretrained(gen)
    else:
        if decoder is None and not (gen.parent / "decoder").is_dir():
            raise SystemExit(f"--gen {gen} has no decoder/ and there is no {gen.parent / 'decoder'}: "
                             "pass --decoder")
        decoder = Path(decoder) if decoder else gen.parent / "decoder"
        if not decoder.is_dir():
            raise SystemExit(f"--decoder {decoder} is not a directory")
        encoder = gen / "encoder" if (gen / "encoder").is_dir() else gen
        pipe = Emu2GenPipeline(Emu2Pipeline.from_pretrained(encoder),
                               Emu2VisualDecoderPipeline.from_pretrained(decoder))
    pipe.decoder.set_progress_bar_config(disable=True)
    return pipe


def run_shapes(args) -> dict:
    from ..pipelines.emu2 import Emu2Pipeline
    from .shapes import evaluate_fewshot, evaluate_instructions, fewshot_table, plot_accuracy_vs_shots
    from .shapes_generation import evaluate_generation, generation_table

    if args.decoder and not args.gen:
        raise SystemExit("--decoder needs --gen (the Emu2-Gen encoder it decodes for)")
    model_dir = Path(args.model)
    data = Path(args.data) if args.data else model_dir.parent / "data"
    out = Path(args.out) if args.out else model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": str(model_dir), "data": str(data)}
    results["fewshot"] = evaluate_fewshot(Emu2Pipeline.from_pretrained(model_dir), data, shots=args.shots)
    if args.chat_model:
        results["instructions"] = evaluate_instructions(Emu2Pipeline.from_pretrained(args.chat_model), data,
                                                        items=args.items)
    if args.gen:
        results["generation"] = evaluate_generation(load_gen_pipeline(args.gen, args.decoder), data,
                                                    items=args.items, num_inference_steps=args.gen_steps)
    table = fewshot_table(results["fewshot"])
    text = "Held-out few-shot accuracy: exact match % (field accuracy %)\n\n" + table + "\n"
    if "generation" in results:
        table += "\n\n" + generation_table(results["generation"])
        text += ("\nGeneration attribute accuracy % on held-out scenes (pixel detector; true renders = its "
                 "ceiling)\n\n" + generation_table(results["generation"]) + "\n")
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(text)
    plot_accuracy_vs_shots(results["fewshot"], out / "accuracy_vs_shots.png")
    print(table)
    if "instructions" in results:
        print(json.dumps(results["instructions"], indent=2))
    print(f"wrote {out}/metrics.json, table.md, accuracy_vs_shots.png")
    return results


# ------------------------------------------------------------------------------------- paper benchmarks
def _load(name: str, data, images, annotations):
    from . import datasets

    loader = getattr(datasets, BENCHMARKS[name][0])
    if name in ("vqav2", "okvqa"):
        return loader(data, images, annotations)
    if name == "hateful_memes":
        return loader(data, images)
    if name in ("mmmu",):
        return loader(data, images) if images else loader(data)
    return loader(data, images)


def make_answer_fn(pipe, num_beams: int, max_new_tokens: int):
    """The `run_fewshot` answer_fn over a pipeline (official generate defaults: beams 5, length_penalty -1)."""

    def answer(prompts, images):
        batch = pipe.encode(prompts, [im for ims in images for im in ims])
        kwargs = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "do_sample": False}
        if num_beams > 1:
            kwargs["length_penalty"] = -1.0
        ids = pipe.model.generate_text(**batch, **kwargs)
        return pipe.tokenizer.batch_decode(ids, skip_special_tokens=True)

    return answer


def image_embedding_fn(pipe):
    """RICES features: the model's pooled visual embeddings, averaged over the n_query slots -> (N, Dv)."""
    import torch

    from ..processing import preprocess_images

    @torch.no_grad()
    def encode(images):
        size = pipe.model.config.vision_config.image_size
        pixels = preprocess_images(images, size).to(pipe.device, pipe.model.dtype)
        return pipe.model.encode_image(pixels).mean(dim=1).float()

    return encode


def resolve_protocol(args, model_config) -> tuple[str, list[int]]:
    """-> (protocol, shot counts) for a paper benchmark, refusing any argument the protocol would not use.

    The protocol is ``--protocol``, else the model's recorded kind (`emu2.model.kind`): base Emu2 is evaluated
    few-shot (paper 3.1), Emu2-Chat zero-shot through its template (paper 3.2). The vocabulary is no guide: every
    shapes-world model has the chat tokens.
    """
    import sys

    from ..model.kind import model_kind

    name = args.benchmark
    _, _, fewshot_prompt, chat_prompt = BENCHMARKS[name]
    protocol, kind = args.protocol, model_kind(model_config)
    if protocol is None:
        if kind == "gen":
            raise SystemExit(f"{args.model} is an Emu2-Gen encoder, which the paper does not evaluate on "
                             f"{name}; pass --protocol base or --protocol chat to evaluate it anyway")
        if kind is None and fewshot_prompt is not None and chat_prompt is not None:
            print(f"note: {args.model} does not record whether it is a base or a chat model (written before "
                  "model kinds were recorded, or by `emu2 init`): evaluating with the base protocol; pass "
                  "--protocol chat for a chat model", file=sys.stderr)
        protocol = kind if kind in PROTOCOLS else ("base" if fewshot_prompt is not None else "chat")
    if protocol == "base" and fewshot_prompt is None:
        raise SystemExit(f"{name} has only the chat protocol (the paper evaluates it zero-shot on Emu2-Chat); "
                         "pass --protocol chat with a chat model")
    if protocol == "chat" and chat_prompt is None:
        raise SystemExit(f"{name} has only the base protocol (few-shot prompts); pass --protocol base")
    if protocol == "chat":
        unused = [flag for flag, value in (("--shots", args.shots not in (None, [0])), ("--rices", args.rices),
                                           ("--support", args.support), ("--support-images", args.support_images),
                                           ("--support-annotations", args.support_annotations)) if value]
        if unused:
            why = "the model records it is a chat model" if args.protocol is None else "--protocol chat"
            raise SystemExit(f"the chat protocol is zero-shot ({why}), so {', '.join(unused)} would be ignored; "
                             "drop them, or pass --protocol base for few-shot evaluation")
        return protocol, [0]
    shots = DEFAULT_SHOTS if args.shots is None else args.shots
    if not shots:
        raise SystemExit("--shots needs at least one shot count, e.g. --shots 0,4")
    return protocol, shots


def run_benchmark(args) -> dict:
    from ..pipelines.emu2 import Emu2Pipeline
    from . import fewshot as F
    from . import scoring
    from .report import fewshot_markdown_table, save_results
    from .rices import RICES, RandomSelector

    name = args.benchmark
    _, scorer, fewshot_prompt, chat_prompt = BENCHMARKS[name]
    pipe = Emu2Pipeline.from_pretrained(args.model)
    protocol, shots = resolve_protocol(args, pipe.model.config)
    prompt_fn = getattr(F, chat_prompt if protocol == "chat" else fewshot_prompt)
    records = _load(name, args.data, args.images, args.annotations)[: args.limit]
    support = records
    if max(shots) > 0:
        if not args.support:
            raise SystemExit("few-shot evaluation needs --support (the split in-context examples come from)")
        support = _load(name, args.support, args.support_images, args.support_annotations)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selector = None
    if args.rices and max(shots) > 0:
        selector = RICES.from_records(support, image_embedding_fn(pipe), cache_dir=out,
                                      cache_name=f"rices-{name}-{Path(args.model).name}")
    elif max(shots) > 0:
        selector = RandomSelector([r.id for r in support], seed=0)
    scores = F.run_fewshot(records, support, make_answer_fn(pipe, args.num_beams, args.max_new_tokens), shots=shots,
                           selector=selector, out_jsonl=out / f"{name}-predictions.jsonl", batch_size=args.batch_size,
                           metric=getattr(scoring, scorer), prompt_fn=prompt_fn)
    save_results(out / f"{name}-results.json", fewshot={name: scores},
                 meta={"model": args.model, "protocol": protocol, "shots": shots})
    table = fewshot_markdown_table({name: scores})
    (out / f"{name}-table.md").write_text(table + "\n")
    print(table)
    return scores
