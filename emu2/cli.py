"""The `emu2` command: one verb per job (`emu2 --help`, `emu2 VERB --help`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _inspect(args) -> int:
    import torch

    from .config import Emu2Config
    from .model import Emu2ForCausalLM

    config = Emu2Config.from_preset(args.preset)
    with torch.device("meta"):  # no memory: the 37B presets are counted without allocating them
        model = Emu2ForCausalLM(config)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    params = {"visual": count(model.visual), "lm": count(model.language_model),
              "projections": count(model.project_up) + count(model.project_down)}
    params["total"] = sum(params.values())
    report = {
        "preset": args.preset, "params": params, "n_query": config.n_query, "v_query": config.v_query,
        "vision": {k: getattr(config.vision_config, k) for k in ("image_size", "patch_size", "width", "layers")},
        "text": {k: getattr(config.text_config, k) for k in
                 ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in params.items():
            print(f"{k:>12}: {v:,}")
    return 0


def _convert(args) -> int:
    import torch

    if args.to != "emu2":
        from .convert.export import export_official

        files = export_official(args.checkpoint, args.out, args.to, max_shard_size=args.max_shard_size)
        print(f"wrote {len(files)} files ({args.to}) to {args.out}")
        return 0
    if args.preset is None:
        raise SystemExit("emu2 convert: --preset is required to read an official checkpoint (emu2, emu2-chat or "
                         "emu2-gen for the official releases)")

    from .config import Emu2Config
    from .convert.gen import is_official_gen, load_official_gen
    from .convert.official import load_official
    from .model.kind import PRESET_KINDS, record_model_kind
    from .pipelines.emu2 import Emu2Pipeline
    from .processing import load_tokenizer, preset_tokenizer

    config = Emu2Config.from_preset(args.preset)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}[args.dtype]
    tokenizer = None
    if args.tokenizer or not is_official_gen(args.checkpoint):
        tokenizer = load_tokenizer(args.tokenizer or preset_tokenizer(args.preset), instruct=config.instruct)
    if is_official_gen(args.checkpoint):  # encoder + decoder: an Emu2GenPipeline directory
        pipe = load_official_gen(args.checkpoint, config, tokenizer=tokenizer, decoder_config=args.decoder_config,
                                 dtype=dtype)
        model = pipe.encoder.model
    else:
        pipe = Emu2Pipeline(load_official(args.checkpoint, config, dtype=dtype), tokenizer)
        model = pipe.model
    if args.preset in PRESET_KINDS:
        record_model_kind(model.config, PRESET_KINDS[args.preset])
    pipe.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}")
    return 0


def _init(args) -> int:
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if (args.vision is None) != (args.llm is None):
        raise SystemExit("emu2 init: give --vision and --llm together (or neither, for a random model)")
    if args.vision is not None:  # the stage-1 start of Table 5: EVA-CLIP + LLaMA, random projections
        from .convert.assemble import assemble_init

        report = assemble_init(args.preset, args.vision, args.llm, args.out, dtype=dtypes[args.dtype or "bf16"],
                               seed=args.seed, max_shard_size=args.max_shard_size)
        print(report.summary())
        return 0

    from .pipelines.emu2 import Emu2Pipeline

    pipe = Emu2Pipeline.from_preset(args.preset, seed=args.seed)
    pipe.model.to(dtypes[args.dtype or "fp32"])
    pipe.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    print(f"wrote a randomly initialised {args.preset!r} model to {args.out}")
    return 0


def _bench(args) -> int:
    if args.what == "image-regression":
        from .bench.regression import run

        result = run(repeats=args.repeats or 2)
    elif args.what == "data":
        result = _bench_data(args)
    elif args.what == "generate":
        from .bench.generate import run as run_generate

        result = run_generate(repeats=args.repeats or 3)
    elif args.what == "train":
        from .train.bench import run_train_benchmark

        result = run_train_benchmark()
    elif args.what == "quantization":
        from .bench.quantization import run as run_quantization

        result = run_quantization(args.model or "shapes-large")
    elif args.what == "serve":
        from .serve.bench import run_fuzz, run_serve_scaling

        result = {"load": run_serve_scaling(clients=args.clients, seconds=args.seconds, torch_threads=1,
                                            max_batch_size=args.max_batch_size, model_dir=args.model)}
        if args.fuzz:
            result["fuzz"] = run_fuzz(max_examples=args.fuzz, seconds=max(args.seconds, 60), model_dir=args.model)
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown benchmark {args.what}")
    print(json.dumps(result, indent=2 if not args.json else None))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (1,8,32); got {text!r}")
    return values


def _bench_data(args) -> dict:
    """Samples/s through decode + preprocess + sequence build, with 1 and 2 loader workers, side by side."""
    import tempfile

    from .data.bench import benchmark_pipeline
    from .data.sequence import SequenceConfig
    from .data.shapes import write_shapes
    from .processing import load_tokenizer, preset_tokenizer

    tokenizer = load_tokenizer(preset_tokenizer("shapes"), instruct=True)
    config = SequenceConfig(n_query=16, v_query=4, image_size=64, max_length=1024)  # the `shapes` preset
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "shapes"
            write_shapes(data, seed=0, num_train=200, num_episodes=2)
        runs = {f"workers_{w}": benchmark_pipeline(data, workers=w, seconds=args.seconds, tokenizer=tokenizer,
                                                   config=config) for w in (1, 2)}
    runs["speedup_2_over_1"] = round(runs["workers_2"]["samples_per_s"] / runs["workers_1"]["samples_per_s"], 2)
    return runs


def _quickstart(args) -> int:
    from .train.quickstart import run_quickstart

    report = run_quickstart(args.out, budget_minutes=args.budget, seed=args.seed, num_train=args.num_train,
                            preset=args.preset, precision=args.precision, lm_stage=args.lm_stage)
    print(f"report: {args.out}/report/report.md ({report['total_seconds'] / 60:.1f} min)")
    return 0


def preset_name(name: str) -> str:
    """argparse ``type`` of ``--preset``: a name of `emu2.config.PRESETS`, checked only when one is given, since
    importing the config imports transformers and torch (seconds) that ``emu2 VERB --help`` must not wait for."""
    from .config import PRESETS

    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The ``emu2`` command line. Long because it declares every verb and option, one statement each; the verbs'
    logic is in the functions they dispatch to."""
    parser = argparse.ArgumentParser(prog="emu2", description="Emu2: generative multimodal in-context learner.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="parameter counts of a preset (built on the meta device, no memory)")
    p.add_argument("--preset", required=True, type=preset_name, metavar="PRESET",
                   help="named model preset (emu2, emu2-chat, emu2-gen, tiny, shapes, ...; a wrong name lists all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="official Emu2 / Emu2-Chat / Emu2-Gen checkpoint -> emu2 model directory, "
                       "or back with --to")
    p.add_argument("checkpoint", help="official file (.bin/.pth/.safetensors) or HF directory (sharded, with index "
                   "json; Emu2-Gen: the diffusers layout); with --to official-*: an emu2 model directory")
    p.add_argument("--to", default="emu2", choices=["emu2", "official-native", "official-hf"],
                   help="emu2 (default): read an official checkpoint; official-native / official-hf: write an emu2 "
                   "model directory (base, chat or Gen) in that official layout")
    p.add_argument("--preset", type=preset_name, metavar="PRESET",
                   help="sizes of the checkpoint: emu2, emu2-chat or emu2-gen for the official releases (reading only)")
    p.add_argument("--out", required=True, help="output directory (Emu2-Gen: encoder/ + decoder/)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the HF Gen folder's tokenizer/, else the LLaMA "
                   "tokenizer shipped with emu2)")
    p.add_argument("--decoder-config", help="native Emu2-Gen file: the official conf/diffusion_config folder (unet/, "
                   "vae/, scheduler/ configs) for what the weights do not fix (heads, norm groups); default: the "
                   "official values. Sizes are read from the file")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="weights dtype to write (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.set_defaults(func=_convert)

    p = sub.add_parser("init", help="write a model directory of a preset: random (smoke tests), or assembled from "
                       "EVA-CLIP + LLaMA weights with random projections (the stage-1 start, paper Table 5)")
    p.add_argument("--preset", required=True, type=preset_name, metavar="PRESET",
                   help="named model preset (a wrong name lists all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initialisation (projections when assembling)")
    p.add_argument("--vision", help="EVA-CLIP weights as released (open_clip state dict with visual.* keys; "
                   ".safetensors, or .pt/.bin read with weights_only): only the visual tower is kept")
    p.add_argument("--llm", help="local Hugging Face LLaMA folder (config.json + safetensors, sharded or not); "
                   "its sizes must equal the preset's")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="weights dtype to write (default: bf16 when assembling, fp32 for a random model)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.set_defaults(func=_init)

    p = sub.add_parser("bench", help="benchmarks printing JSON (side-by-side comparisons in one run)")
    p.add_argument("what", choices=["image-regression", "generate", "data", "train", "serve", "quantization"],
                   help="which benchmark")
    p.add_argument("--json", action="store_true", help="compact JSON on one line")
    p.add_argument("--repeats", type=int, default=None,
                   help="image-regression: timed repeats, best kept (default 2); generate: median kept (default 3)")
    p.add_argument("--data", help="data: a shards directory (default: a small shapes world made on the fly)")
    p.add_argument("--model", help="quantization: a model directory or a preset (default: shapes-large, random "
                                   "weights); serve: a chat model directory (default: a random tiny-chat)")
    p.add_argument("--seconds", type=float, default=10.0, help="data/serve: seconds timed per run")
    p.add_argument("--clients", type=_int_list, default=(1, 8, 32),
                   help="serve: concurrent clients on loopback, one run per count (default: 1,8,32)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="serve: the server's --max-batch-size (default: emu2 serve's; 1: one request at a time)")
    p.add_argument("--fuzz", type=int, default=50, help="serve: schemathesis examples per operation (0: no fuzz)")
    p.set_defaults(func=_bench)

    from .data.cli import add_parser as add_data_parser
    from .eval.cli import add_parser as add_eval_parser
    from .serve.cli import add_parsers as add_serve_parsers
    from .train.cli import add_parser as add_train_parser

    add_train_parser(sub)
    p = sub.add_parser("quickstart", help="the main job: shapes world -> every training stage -> evaluation -> "
                       "report, on a laptop CPU within a time budget")
    p.add_argument("--out", default="runs/quickstart", help="output directory (data, one folder per stage, report/)")
    p.add_argument("--budget", type=float, default=20.0, help="wall-clock budget in minutes (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes world and of training")
    p.add_argument("--num-train", type=int, default=1500, help="shapes training samples per kind")
    p.add_argument("--preset", default="shapes", choices=["shapes", "shapes-large"],
                   help="model size (shapes-large: ~130M parameters, for a GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the GPU or CPU (AVX512-BF16/AMX) runs bf16 natively, else fp32")
    p.add_argument("--no-lm-stage", dest="lm_stage", action="store_false",
                   help="skip the language model's pre-training on text before stage 1 (it teaches copying, which "
                        "in-context learning needs; up to 1,500 steps in 44 %% of the training time, ~6.5 minutes on "
                        "2 CPU cores)")
    p.set_defaults(func=_quickstart)
    add_data_parser(sub)
    add_eval_parser(sub)
    add_serve_parsers(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _reason(error: BaseException) -> str:
    """A user error -> the one line that says what was wrong."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"  # "[Errno 2] ..." tells a user less than this
    return _one_line(str(error) or type(error).__name__)


def _is_user_error(error: BaseException) -> bool:
    """Errors a person causes and fixes (a missing file, a wrong value, a checkpoint that does not fit).

    ValueError covers our own error classes (PromptError, ConfigError, DataError, CheckpointMismatchError, ...,
    all ValueErrors) and argument checks; OSError covers missing or unreadable files and model directories.
    """
    if isinstance(error, (OSError, ValueError)):
        return True
    checkpoint = sys.modules.get("emu2.train.checkpoint")  # imported only by the commands that can raise it
    return checkpoint is not None and isinstance(error, checkpoint.CheckpointError)


def _quiet_libraries() -> None:
    """Weight-loading progress bars and library advice on stderr hide what the command says; a user who wants
    them back sets these variables themselves. Only the `emu2` process is affected, not library users."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers and huggingface_hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    """Run one `emu2` command; returns its exit status (0 on success).

    A user error ends the command with ``emu2: error: <reason>`` on one line (`SystemExit`, status 1); any other
    exception is a bug and keeps its traceback. ``EMU2_DEBUG=1`` shows the traceback of user errors too.
    """
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        status = args.func(args)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # our commands' own one-line refusals
            message = _one_line(exit_.code).removeprefix("error: ")
            raise SystemExit(message if message.startswith("emu2") else f"emu2: error: {message}") from None
        raise
    except KeyboardInterrupt:
        print("emu2: interrupted", file=sys.stderr)
        raise SystemExit(130) from None  # the shell's status for a command ended by SIGINT
    except Exception as error:
        if not _is_user_error(error) or os.environ.get("EMU2_DEBUG"):
            raise
        raise SystemExit(f"emu2: error: {_reason(error)}") from None
    # Some commands return what they computed (a manifest, scores) for in-process callers: that is no failure.
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
