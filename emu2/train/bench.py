"""Training throughput: tokens/s, model FLOP/s and its fraction of this machine's matmul FLOP/s, peak memory.

    from emu2.train.bench import run_train_benchmark
    run_train_benchmark(presets=("shapes", "shapes-large"), steps=5, batch_size=4, seq_len=256)

Each preset trains (every group, AdamW, the loop's own `train_step`) on synthetic batches of ``batch_size``
sequences of up to ``seq_len`` tokens with one regressed image each; bf16 autocast on GPU, fp32 on CPU.

Model FLOPs per step (`training_flops`) count multiply-adds as 2 FLOPs and a backward as 2x the forward, so
6 x parameters x tokens for every weight matrix, plus the attention scores/values term 12 x layers x width x
sequence length per token (PaLM appendix B), over: the LM's decoder layers on the non-padding tokens, the LM
head on the supervised tokens only (the model computes logits only there), the ViT on every patch + CLS token
of every image, patch embedding, and both projections on the visual slots. Embedding lookups, norms and
softmax are not counted. The reference is a timed square matmul in the same dtype in the same process.
"""

from __future__ import annotations

import resource
import time

import torch

from .config import (
    GROUPS,
    DataSection,
    LogSection,
    ModelSection,
    OptimSection,
    StreamSection,
    SyntheticSection,
    TrainConfig,
)


def training_flops(model_config, batch: dict) -> float:
    """Model FLOPs of one forward + backward over ``batch`` (a collated batch), as the module docstring says."""
    t, v = model_config.text_config, model_config.vision_config
    D, I, layers, V = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    head_dim = D // t.num_attention_heads
    kv = (t.num_key_value_heads or t.num_attention_heads) * head_dim
    lm_layer = 2 * D * D + 2 * D * kv + 3 * D * I  # q, o, k, v, gate/up/down
    lengths = batch["attention_mask"].sum(dim=1).double()
    tokens = float(lengths.sum())
    supervised = float((batch["labels"][:, 1:] != -100).sum())
    flops = 6 * layers * lm_layer * tokens + 12 * layers * D * float((lengths * lengths).sum())
    flops += 6 * D * V * supervised

    images = int(batch["images"].shape[0]) + int(batch["frames"].shape[0])
    patches = (v.image_size // v.patch_size) ** 2
    vit_tokens = images * (patches + 1)
    vit_layer = 4 * v.width * v.width + 2 * v.width * v.mlp_hidden_size
    flops += 6 * v.layers * vit_layer * vit_tokens + 12 * v.layers * v.width * (patches + 1) * vit_tokens
    flops += 6 * 3 * v.patch_size ** 2 * v.width * images * patches
    slots = int(batch["images"].shape[0]) * model_config.n_query + int(batch["frames"].shape[0]) * model_config.v_query
    regressed = (int(batch["image_is_target"].sum()) * model_config.n_query
                 + int(batch["frame_is_target"].sum()) * model_config.v_query)
    flops += 6 * v.width * D * (slots + regressed)
    return flops


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timed ``size`` x ``size`` matmuls: 2 size^3 FLOPs each."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _sync(device)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_config(preset: str, steps: int, batch_size: int, seq_len: int, precision: str) -> TrainConfig:
    """A stage-1 run of ``preset`` on synthetic rows of ``seq_len`` tokens with one regressed image each."""
    return TrainConfig(
        stage="stage1", output_dir="bench", steps=steps, mixed_precision=precision,
        model=ModelSection(preset=preset), log=LogSection(progress=False, tensorboard=False),
        optim=OptimSection(lr={g: 1e-5 for g in GROUPS}),
        data=DataSection(streams={"synthetic": StreamSection(batch_size, [])},
                         synthetic=SyntheticSection(seq_len=seq_len, images=1, regress=True)),
    )


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process peak RSS so far (includes earlier presets)"}


def run_train_benchmark(presets=("shapes", "shapes-large"), steps: int = 5, batch_size: int = 4,
                        seq_len: int = 256, warmup_steps: int = 1) -> dict:
    """Time ``steps`` optimizer steps (after ``warmup_steps``) per preset; returns a JSON-ready dict."""
    from .data import build_data
    from .model import build_model
    from .stages.lm import build_accelerator, prepare_model_and_optimizer, train_step

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "no"
    report: dict = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "presets": {},
                    "mixed_precision": precision, "torch_threads": torch.get_num_threads()}
    accelerator = None
    for preset in presets:
        config = _bench_config(preset, steps + warmup_steps, batch_size, seq_len, precision)
        accelerator = accelerator or build_accelerator(config)
        device = accelerator.device
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model, tokenizer = build_model(config)
        emu2_config = model.config
        params = sum(p.numel() for p in model.parameters())
        model, optimizer = prepare_model_and_optimizer(accelerator, model, config)
        batches = iter(build_data(config, emu2_config, tokenizer))
        windows = [[next(batches)] for _ in range(steps + warmup_steps)]  # made before timing
        for window in windows[:warmup_steps]:
            train_step(model, optimizer, window, accelerator, config)
        _sync(device)
        start = time.perf_counter()
        tokens = 0
        for window in windows[warmup_steps:]:
            tokens += train_step(model, optimizer, window, accelerator, config).tokens
        _sync(device)
        seconds = time.perf_counter() - start
        flops = sum(training_flops(emu2_config, b) for w in windows[warmup_steps:] for b in w)
        entry = {"params": params, "tokens_per_s": tokens / seconds, "step_seconds": seconds / steps,
                 "model_flops_per_step": flops / steps, "achieved_flops_per_s": flops / seconds,
                 **_peak_memory(device)}
        report["presets"][preset] = entry
        del model, optimizer, batches, windows
        accelerator.free_memory()

    device = accelerator.device if accelerator else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    size = 8192 if cuda else 2048
    matmul = matmul_flops_per_second(device, dtype, size)
    report.update(device=torch.cuda.get_device_name(device) if cuda else "cpu", matmul_dtype=str(dtype),
                  matmul_size=size, matmul_flops_per_s=matmul,
                  flops_formula="6 x params x tokens per weight matrix (LM layers on non-pad tokens, LM head on "
                                "supervised tokens, ViT on patches+CLS, projections on visual slots) + 12 x layers "
                                "x width x seq_len per token for attention; fwd+bwd")
    for entry in report["presets"].values():
        entry["fraction_of_matmul"] = entry["achieved_flops_per_s"] / matmul
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m emu2.train.bench", description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["shapes", "shapes-large"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="one line")
    args = parser.parse_args(argv)
    report = run_train_benchmark(tuple(args.presets), args.steps, args.batch_size, args.seq_len)
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
