"""The `emu2` command: one verb per job (`emu2 --help`, `emu2 VERB --help`)."""

from __future__ import annotations

import argparse
import json
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

    from .config import Emu2Config
    from .convert.official import load_official
    from .pipeline import Emu2Pipeline
    from .processing import load_tokenizer, preset_tokenizer

    config = Emu2Config.from_preset(args.preset)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}[args.dtype]
    model = load_official(args.checkpoint, config, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or preset_tokenizer(args.preset), instruct=config.instruct)
    Emu2Pipeline(model, tokenizer).save_pretrained(args.out, max_shard_size=args.max_shard_size)
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

    from .pipeline import Emu2Pipeline

    pipe = Emu2Pipeline.from_preset(args.preset, seed=args.seed)
    pipe.model.to(dtypes[args.dtype or "fp32"])
    pipe.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    print(f"wrote a randomly initialised {args.preset!r} model to {args.out}")
    return 0


def _bench(args) -> int:
    if args.what == "image-regression":
        from .bench.regression import run

        result = run(repeats=args.repeats)
    elif args.what == "data":
        result = _bench_data(args)
    elif args.what == "generate":
        from .bench.generate import run as run_generate

        result = run_generate()
    elif args.what == "train":
        from .train.bench import run_train_benchmark

        result = run_train_benchmark()
    elif args.what == "serve":
        from .serve.bench import run_fuzz, run_serve_scaling

        result = {"load": run_serve_scaling(clients=args.clients, seconds=args.seconds, torch_threads=1,
                                            max_batch_size=args.max_batch_size)}
        if args.fuzz:
            result["fuzz"] = run_fuzz(max_examples=args.fuzz, seconds=max(args.seconds, 60))
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


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="emu2", description="Emu2: generative multimodal in-context learner.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="parameter counts of a preset (built on the meta device, no memory)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="named model preset")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="official Emu2 / Emu2-Chat / Emu2-Gen checkpoint -> emu2 model directory")
    p.add_argument("checkpoint", help="official file (.bin/.pth/.safetensors) or HF directory (sharded, with index json)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="sizes of the checkpoint: emu2, emu2-chat or emu2-gen for the official releases")
    p.add_argument("--out", required=True, help="output directory (config.json + safetensors + tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the LLaMA tokenizer shipped with emu2)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="weights dtype to write (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.set_defaults(func=_convert)

    p = sub.add_parser("init", help="write a model directory of a preset: random (smoke tests), or assembled from "
                       "EVA-CLIP + LLaMA weights with random projections (the stage-1 start, paper Table 5)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
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
    p.add_argument("what", choices=["image-regression", "generate", "data", "train", "serve"], help="which benchmark")
    p.add_argument("--json", action="store_true", help="compact JSON on one line")
    p.add_argument("--repeats", type=int, default=2, help="image-regression: timed repeats (best is kept)")
    p.add_argument("--data", help="data: a shards directory (default: a small shapes world made on the fly)")
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
                        "in-context learning needs; its 1,500 steps take ~5 of the budget's minutes on 2 CPU cores, "
                        "whatever the budget)")
    p.set_defaults(func=_quickstart)
    add_data_parser(sub)
    add_eval_parser(sub)
    add_serve_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
