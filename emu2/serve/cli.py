"""`emu2 chat`, `emu2 ask`, `emu2 generate` and `emu2 serve`: using a model from the command line.

`add_parsers(subparsers)` registers the four verbs on the `emu2` command; ``python -m emu2.serve.cli VERB``
runs them on their own.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .. import processing as P
from .video import DEFAULT_NUM_FRAMES, load_video_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (or write @PATH inside the message, @"a b.png" with spaces)
  /video PATH   attach a video to your next message: a folder of frames or an animated GIF (frames sampled)
  /system TEXT  replace the system message (and start over)
  /reset        forget the conversation
  /quit         leave (as does Ctrl-D)
Ctrl-C stops an answer being written (the conversation is kept) or clears the line being typed.
"""
# Official Emu2-Chat decoding (`EmuChatGeneration.__call__` defaults: num_beams=5, length_penalty=-1, no
# sampling). `emu2 chat` and `emu2 ask` use it unless a flag says otherwise; the answer length is the official
# demo's 512 tokens, since the class's own default of 10 is for benchmark answers.
# The CLI keeps the official demo's longer answers (max_new_tokens 512) and takes the official beam settings.
OFFICIAL_CHAT_DECODING = {k: P.OFFICIAL_DECODING[k] for k in ("num_beams", "length_penalty")}


# -------------------------------------------------------------------------------------------------- loading
def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32}[args.dtype]
    return device, dtype


def load_chat_pipeline(args):
    from ..pipelines.emu2 import Emu2Pipeline

    device, dtype = _device_and_dtype(args)
    return Emu2Pipeline.from_pretrained(args.model, dtype=dtype, device=device)


def load_gen_pipeline(path, args):
    """An Emu2-Gen directory (``encoder/`` + ``decoder/``) on ``--device`` in ``--dtype``."""
    from ..pipelines.gen import Emu2GenPipeline

    device, dtype = _device_and_dtype(args)
    return Emu2GenPipeline.from_pretrained(path, dtype=dtype).to(device)


def open_image(path: str | Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _add_model_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help=f"{what} directory (written by `emu2 convert`, `emu2 init` or save_pretrained)")
    p.add_argument("--device", help="torch device to run on (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype (default auto: bf16 on GPU, fp32 on CPU)")


def _add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest answer in tokens (default: %(default)s, the official demo's)")
    p.add_argument("--num-beams", type=int, default=None,
                   help=f"beam search width (default: {OFFICIAL_CHAT_DECODING['num_beams']}, the official Emu2-Chat's); "
                        "1 streams the answer as it is written, beam search shows it at the end")
    p.add_argument("--length-penalty", type=float, default=None,
                   help=f"beam search length penalty (default: {OFFICIAL_CHAT_DECODING['length_penalty']:g}, the "
                        "official Emu2-Chat's: favours short answers)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this temperature (default: deterministic decoding)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (implies sampling)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer where TEXT appears (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--system", default=P.CHAT_SYSTEM_MESSAGE,
                   help="system message of the chat template (default: the paper's chat system message; the "
                        "short-answer one is: " + repr(P.SHORT_ANSWER_SYSTEM_MESSAGE) + ")")
    p.add_argument("--grounding", action="store_true",
                   help="ask for grounded answers: boxes as <phrase>..</phrase><object><patch_index_k>..</object>")


def _add_frames_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=DEFAULT_NUM_FRAMES, metavar="N",
                   help="frames sampled uniformly from each video (default: %(default)s, the official demo's)")


def decoding_settings(args):
    """The `DecodingSettings` of `emu2 chat` / `emu2 ask`: the flags given, else the official Emu2-Chat decoding."""
    from .chat import DecodingSettings

    given = {"num_beams": args.num_beams, "length_penalty": args.length_penalty}
    official = {k: OFFICIAL_CHAT_DECODING[k] if v is None else v for k, v in given.items()}
    return DecodingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop=args.stop, seed=args.seed, **official)


# ----------------------------------------------------------------------------------------------------- chat
_INLINE_IMAGE = re.compile(r'(?<!\S)@(?:"([^"]+)"|(\S+))')


def parse_message(line: str, load: Callable = open_image) -> list:
    """A typed message -> interleaved items: ``@path.png`` (or ``@"a b.png"``) becomes the image at that place.

    A ``@word`` that is neither an existing file nor named like an image stays text (``@alice``).
    """
    items, last = [], 0
    for match in _INLINE_IMAGE.finditer(line):
        quoted, name = match.group(1), match.group(1) or match.group(2)
        if not quoted:  # "look at @cat.png?": punctuation after a path is text
            name = name.rstrip(".,;:!?)]}'\"") or name
        path = Path(name)
        if not path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                raise FileNotFoundError(f"no image at {path}")
            continue
        end = match.end() if quoted else match.start() + 1 + len(name)
        items += [line[last:match.start()], load(path)]
        last = end
    items.append(line[last:])
    return [item for item in items if not (isinstance(item, str) and item == "")]


def chat_loop(engine, settings, system: str | None, grounding: bool, read: Callable[[], str],
              out: TextIO, num_frames: int = DEFAULT_NUM_FRAMES) -> None:
    """The `emu2 chat` conversation: reads lines with ``read`` (EOFError ends), writes answers to ``out``.

    KeyboardInterrupt (Ctrl-C) while reading drops the line; while answering it stops the answer, and the
    conversation goes on with the answer as far as it was shown (or without the question, when none was).
    """
    turns, pending = [], []
    stream = settings.num_beams == 1 and settings.n == 1
    while True:
        try:
            line = read().strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            out.write(CHAT_HELP)
            continue
        if command == "/reset":
            turns, pending = [], []
            out.write("(conversation cleared)\n")
            continue
        if command == "/system":
            system, turns, pending = rest.strip() or None, [], []
            out.write("(system message set; conversation cleared)\n")
            continue
        try:
            if command in ("/image", "/video"):
                path = rest.strip().strip('"')
                pending.append(open_image(path) if command == "/image" else load_video_frames(path, num_frames))
                out.write(f"({command[1:]} attached: {len(pending)} waiting for your next message)\n")
                continue
            message = pending + parse_message(line)
            prompt = engine.build_prompt([*turns, message], system=system, grounding=grounding)
        except (OSError, ValueError) as error:  # a missing or unreadable file, a prompt the template refuses
            out.write(f"error: {error}\n")
            continue
        out.write("emu2> ")
        out.flush()
        shown: list[str] = []
        try:
            if stream:
                answer = engine.stream(prompt, settings, lambda text: (shown.append(text), out.write(text),
                                                                        out.flush())).text
            else:
                answer = engine.answer(prompt, settings)[0].text
                out.write(answer)
        except KeyboardInterrupt:
            answer = "".join(shown).strip()
            out.write(" (stopped)" if answer else "(stopped; the question is dropped)")
            if not answer:
                out.write("\n")
                pending = []
                continue
        out.write("\n")
        turns += [message, answer]
        pending = []


def _chat(args) -> int:
    from .chat import ChatEngine

    engine = ChatEngine(load_chat_pipeline(args))
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:  # not on every platform (Windows)
            pass
        print(f"emu2 chat with {args.model}; /help for commands, /quit to leave")

    def read() -> str:
        if interactive:
            return input("you> ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    chat_loop(engine, decoding_settings(args), args.system, args.grounding, read, sys.stdout, args.frames)
    return 0


# ------------------------------------------------------------------------------------------------------ ask
def _ask(args) -> int:
    images = [open_image(path) for path in args.image]  # before the model's imports: a wrong path is told at once
    videos = [load_video_frames(path, args.frames) for path in args.video]
    pieces = args.prompt.split(P.IMAGE_PLACEHOLDER)
    if len(pieces) > 1:  # few-shot: the placeholders say where each image goes
        if len(pieces) - 1 != len(images):
            raise SystemExit(f"error: the prompt has {len(pieces) - 1} {P.IMAGE_PLACEHOLDER} placeholder(s) but "
                             f"{len(images)} --image given; give one --image per placeholder, in order")
        items = [*videos, pieces[0]]
        for image, text in zip(images, pieces[1:]):
            items += [image, text]
    else:
        items = [*images, *videos, args.prompt]
    from .chat import ChatEngine

    engine = ChatEngine(load_chat_pipeline(args))
    try:
        prompt = engine.build_prompt([items], system=args.system, grounding=args.grounding,
                                     template=False if args.raw else None)
    except P.PromptError as error:
        raise SystemExit(f"error: {error}") from None
    for answer in engine.answer(prompt, decoding_settings(args)):
        print(answer.text)
    return 0


# ------------------------------------------------------------------------------------------------- generate
def _parse_box(text: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"a box is x1,y1,x2,y2 (four numbers); got {text!r}")
    return box


def _generate(args) -> int:
    from .generation import GroundedObject, ImageGenerator, build_generation_inputs

    if args.interleaved:
        from .interleaved import generate_interleaved_command

        return generate_interleaved_command(args)
    if len(args.phrase) != len(args.box) or len(args.subject) > len(args.box):
        raise SystemExit(f"error: give one --phrase per --box ({len(args.box)} box(es), {len(args.phrase)} "
                         f"phrase(s)) and at most one --subject per box ({len(args.subject)} given)")
    subjects = [open_image(p) for p in args.subject] + [None] * (len(args.box) - len(args.subject))
    objects = [GroundedObject(phrase, box, subject) for phrase, box, subject in zip(args.phrase, args.box, subjects)]
    try:
        inputs = build_generation_inputs(args.prompt, [open_image(p) for p in args.image], objects)
    except P.PromptError as error:
        raise SystemExit(f"error: {error}") from None
    generator = ImageGenerator(load_gen_pipeline(args.model, args))
    try:
        width, height = generator.parse_size(args.size, max_side=1 << 15)
    except P.PromptError as error:
        raise SystemExit(f"error: {error}") from None
    images = generator.generate(inputs, n=args.n, width=width, height=height, num_inference_steps=args.steps,
                                guidance_scale=args.guidance, seed=args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        image.save(path)
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- serve
def app_from_args(args):
    """The FastAPI app `emu2 serve` runs, built from its parsed arguments."""
    from .app import create_app
    from .limits import ServeLimits

    if args.model is None and args.gen_model is None:
        raise SystemExit("error: give --model DIR (chat), --gen-model DIR (images), or both")
    if args.allowed_dir is not None and not Path(args.allowed_dir).is_dir():
        raise SystemExit(f"error: --allowed-dir {args.allowed_dir} is not a directory")
    if args.decoder is not None and args.model is None:
        raise SystemExit("error: --decoder draws the images of chat answers: it needs --model DIR")
    chat = load_chat_pipeline(args) if args.model else None
    gen = load_gen_pipeline(args.gen_model, args) if args.gen_model else None
    decoder = None
    if args.decoder is not None:
        from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

        device, dtype = _device_and_dtype(args)
        try:
            decoder = Emu2VisualDecoderPipeline.from_pretrained(args.decoder, dtype=dtype).to(device)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: --decoder {args.decoder}: {error}") from None
    try:
        return create_app(chat, gen, limits=ServeLimits.from_args(args), allowed_dir=args.allowed_dir, ui=args.ui,
                          decoder=decoder,
                          chat_model_name=args.model_name or (Path(args.model).name if args.model else "emu2"),
                          gen_model_name=args.gen_model_name
                          or (Path(args.gen_model).name if args.gen_model else "emu2-gen"))
    except ValueError as error:  # a decoder that does not fit the chat model
        raise SystemExit(f"error: {error}") from None


def _serve(args) -> int:
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: the server has no authentication; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    app = app_from_args(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


# ------------------------------------------------------------------------------------------------- parsers
def add_parsers(subparsers) -> None:
    """Register chat, ask, generate and serve on an argparse subparsers object (the `emu2` command's).

    Long because it declares every option of four commands, one statement each; it holds no logic."""
    from .limits import ServeLimits

    p = subparsers.add_parser("chat", help="interactive multi-turn chat with images, answers streamed",
                              description="Chat with an Emu2 model. " + CHAT_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(p, "model")
    _add_decoding_arguments(p)
    _add_frames_argument(p)
    p.set_defaults(func=_chat)

    p = subparsers.add_parser("ask", help="one question about one or more images, answered once",
                              description="Ask once. Without placeholders the images come before the prompt; "
                                          f"with {P.IMAGE_PLACEHOLDER} in the prompt each --image goes at its "
                                          "placeholder, in order (few-shot prompts).")
    _add_model_arguments(p, "model")
    p.add_argument("prompt", help=f"the question; may hold {P.IMAGE_PLACEHOLDER} placeholders, one per --image")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file (repeatable, in order)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video, as a folder of frame images (sorted by name) or an animated GIF; it comes "
                        "before the prompt, after the images (repeatable; extract an mp4's frames first)")
    _add_frames_argument(p)
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is, without the chat template (few-shot prompting of a chat model; "
                        "base models never use the template)")
    _add_decoding_arguments(p)
    p.set_defaults(func=_ask)

    p = subparsers.add_parser("generate", help="generate or edit an image with Emu2-Gen",
                              description="Generate an image. Input images come before the prompt (editing: "
                                          f"'wearing a red hat') unless the prompt places them with "
                                          f"{P.IMAGE_PLACEHOLDER}. Grounded generation: one --box and --phrase "
                                          "per object, optionally a --subject image showing it.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Emu2-Gen directory (encoder/ and decoder/, written by Emu2GenPipeline.save_pretrained)")
    p.add_argument("prompt", help="what to draw (may be empty with one --image: autoencoding)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an input image (repeatable)")
    p.add_argument("--box", action="append", default=[], type=_parse_box, metavar="X1,Y1,X2,Y2",
                   help="where an object goes, in pixels of a 448x448 layout canvas (repeatable)")
    p.add_argument("--phrase", action="append", default=[], metavar="TEXT",
                   help="the words naming the object of the --box at the same position (repeatable)")
    p.add_argument("--subject", action="append", default=[], metavar="PATH",
                   help="an image of the object of the --box at the same position (repeatable, optional)")
    p.add_argument("-o", "--output", required=True, metavar="PNG",
                   help="output file; with -n > 1, NAME-0.png, NAME-1.png, ...")
    p.add_argument("-n", type=int, default=1, help="how many images (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (official: %(default)s)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (official: %(default)s)")
    p.add_argument("--size", default=None, metavar="WxH", help="output size (default: the decoder's native size)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the initial noise")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype (default auto: bf16 on GPU, fp32 on CPU)")
    from .interleaved import add_arguments as add_interleaved_arguments

    add_interleaved_arguments(p)
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, images) and optional web page",
                              description="Serve /v1/chat/completions, /v1/images/generations, /v1/images/edits, "
                                          "/v1/models and /healthz; API docs at /docs.")
    p.add_argument("--model", metavar="DIR", help="chat model directory (Emu2-Chat, or a base Emu2 model)")
    p.add_argument("--gen-model", metavar="DIR", help="Emu2-Gen directory for the image endpoints")
    p.add_argument("--decoder", metavar="DIR",
                   help='visual decoder directory (diffusers layout) drawing the images of chat answers with '
                        'modalities ["text", "image"] (default: the --gen-model decoder, if any)')
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--gen-model-name", help="image model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; there is no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port) (default: %(default)s)")
    p.add_argument("--ui", action="store_true", help="serve the web page (chat and image generation) at /")
    p.add_argument("--allowed-dir", metavar="DIR",
                   help="allow file:// image URLs for files under DIR (symlinks resolved; default: refuse them)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype (default auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="CPU threads per model call (default: torch's choice; on a CPU shared with other work a "
                        "small number avoids threads spinning for cores)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: %(default)s)")
    ServeLimits.add_arguments(p)
    p.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu2.serve.cli", description="Emu2 chat, ask, generate, serve")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
