"""Data-pipeline throughput: samples per second through read + decode + preprocess + sequence build + collate."""

from __future__ import annotations

import time
from pathlib import Path

from emu2.data.mixing import Source, sources_from_manifest
from emu2.data.sequence import SequenceConfig
from emu2.data.shards import ShardDataset, make_dataloader


def benchmark_pipeline(shards: str | Path | list[Source], workers: int = 1, seconds: float = 10.0, *,
                       tokenizer=None, config: SequenceConfig | None = None, batch_size: int = 8,
                       warmup_batches: int = 2) -> dict:
    """Measure samples/s of the full training data pipeline for ``seconds`` with ``workers`` loader workers.

    ``shards``: a dataset folder/manifest (its train split, every kind weighted equally) or a list of sources.
    ``tokenizer``: a tokenizer or a path for `processing.load_tokenizer(path, instruct=True)`.
    ``config``: the sequence layout (default: the paper's, n_query 64 at 448 px, which dominates the cost;
    pass the tiny recipe's to measure that). The first ``warmup_batches`` (worker start-up) are not timed.
    """
    from emu2.processing import load_tokenizer

    if tokenizer is None:
        raise ValueError("benchmark_pipeline needs a tokenizer (object or path)")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer, instruct=True)
    sources = shards if isinstance(shards, list) else sources_from_manifest(shards, "train")
    config = config or SequenceConfig()
    dataset = ShardDataset(sources, tokenizer, config, seed=0, shuffle_buffer=100, repeat=True)
    loader = make_dataloader(dataset, batch_size, tokenizer.pad_token_id, num_workers=workers)
    samples = tokens = batches = 0
    start = None
    for batch in loader:
        batches += 1
        if batches == warmup_batches:
            start = time.perf_counter()
            continue
        if start is None:
            continue
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start if start else 0.0
    stats = loader.stats
    return {
        "workers": workers, "seconds": round(elapsed, 2), "samples": samples, "batches": batches - warmup_batches,
        "samples_per_s": round(samples / elapsed, 1) if elapsed else 0.0,
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else 0.0,
        "image_size": config.image_size, "n_query": config.n_query, "batch_size": batch_size,
        "skipped": {k: v for k, v in stats.items() if k.startswith("skipped.")},
    }
