"""`emu2 generate --interleaved`: one model writes text and draws images; the answer becomes a Markdown file.

The document holds the prompt (as a quote) and then the answer's parts in order: text as written, each image
as a PNG beside the file (``NAME-1.png``, ``NAME-2.png``, ...) linked where it was generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from .. import processing as P


def write_markdown(parts: Sequence, path: str | Path, prompt: str = "") -> Path:
    """Ordered parts (str, `InterleavedImage` with a decoded ``image``) -> ``path`` and its PNGs; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [f"> {prompt.strip()}\n\n"] if prompt.strip() else []
    count = 0
    for part in parts:
        if isinstance(part, str):
            chunks.append(part)
            continue
        if part.image is None:
            raise ValueError("an image part has no decoded image: generate with a visual decoder")
        count += 1
        name = f"{path.stem}-{count}.png"
        part.image.save(path.parent / name)
        chunks.append(f"\n\n![image {count}]({quote(name)})\n\n")
    path.write_text("".join(chunks).strip() + "\n", encoding="utf-8")
    return path


def add_arguments(p) -> None:
    """The `emu2 generate` options of interleaved generation."""
    group = p.add_argument_group("interleaved generation (--interleaved)")
    group.add_argument("--interleaved", action="store_true",
                       help="continue the prompt with text and images from one model; -o is then a Markdown "
                            "file (NAME.md), the images are written beside it (NAME-1.png, ...)")
    group.add_argument("--decoder", metavar="DIR",
                       help="a visual decoder directory (diffusers layout); --model is then an Emu2 model "
                            "directory instead of an Emu2-Gen one")
    group.add_argument("--max-new-tokens", type=int, default=256, help="text tokens at most (default: %(default)s)")
    group.add_argument("--max-images", type=int, default=4, help="images at most (default: %(default)s)")
    group.add_argument("--image-at", type=int, action="append", default=[], metavar="N",
                       help="start an image after N generated text tokens (0: right after the prompt; repeatable)")
    group.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (implies sampling)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="end the answer where TEXT appears (repeatable)")


def _load(args):
    """(the pipeline that writes, the visual decoder): an Emu2-Gen directory, or an Emu2 model + --decoder."""
    from .cli import _device_and_dtype, load_chat_pipeline, load_gen_pipeline

    if args.decoder is None:
        gen = load_gen_pipeline(args.model, args)
        return gen.encoder, gen.decoder
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    device, dtype = _device_and_dtype(args)
    decoder = Emu2VisualDecoderPipeline.from_pretrained(args.decoder, dtype=dtype).to(device)
    return load_chat_pipeline(args), decoder


def generate_interleaved_command(args) -> int:
    """The `emu2 generate --interleaved` job (arguments of `emu2 generate`)."""
    import torch

    from .cli import open_image

    if args.box or args.phrase or args.subject or args.n != 1:
        raise SystemExit("error: --interleaved writes one document; --box/--phrase/--subject and -n > 1 are for "
                         "single-image generation")
    if Path(args.output).suffix.lower() not in (".md", ".markdown"):
        raise SystemExit(f"error: with --interleaved, -o is a Markdown file (NAME.md); got {args.output}")
    images = [open_image(p) for p in args.image]
    pieces = args.prompt.split(P.IMAGE_PLACEHOLDER)
    if len(pieces) - 1 not in (0, len(images)):
        raise SystemExit(f"error: the prompt has {len(pieces) - 1} {P.IMAGE_PLACEHOLDER} placeholder(s) but "
                         f"{len(images)} --image given; give one --image per placeholder, in order")
    if len(pieces) > 1:
        items = [pieces[0]]
        for image, text in zip(images, pieces[1:]):
            items += [image, text]
    else:
        items = [*images, args.prompt]
    items = [item for item in items if not (isinstance(item, str) and item == "")] or [""]

    try:
        pipe, decoder = _load(args)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    sampling = args.temperature is not None or args.top_p is not None
    def seeded():  # one generator for the text sampling, another for the decoder noise
        return torch.Generator(pipe.device).manual_seed(args.seed) if args.seed is not None else None

    generator, decoder_generator = seeded(), seeded()
    try:
        [parts] = pipe.generate_interleaved(
            [items], decoder=decoder, max_images=args.max_images, max_new_tokens=args.max_new_tokens,
            do_sample=sampling, temperature=args.temperature, top_p=args.top_p, stop=args.stop,
            force_image_at=args.image_at, generator=generator,
            decoder_kwargs={"num_inference_steps": args.steps, "guidance_scale": args.guidance,
                            "generator": decoder_generator},
        )
    except (ValueError, P.PromptError) as error:
        raise SystemExit(f"error: {error}") from None
    print(write_markdown(parts, args.output, prompt=args.prompt))
    return 0
