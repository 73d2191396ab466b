"""`run_train_benchmark`: tokens/s, model FLOP/s against a measured matmul, peak memory."""

import torch

from emu2.config import Emu2Config
from emu2.train.bench import run_train_benchmark, training_flops


def test_benchmark_reports_throughput_flops_and_memory_per_preset():
    report = run_train_benchmark(presets=("tiny",), steps=1, batch_size=1, seq_len=24)
    entry = report["presets"]["tiny"]
    assert entry["tokens_per_s"] > 0 and entry["achieved_flops_per_s"] > 0 and entry["peak_memory_bytes"] > 0
    assert 0 < entry["fraction_of_matmul"] < 1.5
    assert report["matmul_flops_per_s"] > 0 and report["device"] == ("cpu" if not torch.cuda.is_available()
                                                                     else torch.cuda.get_device_name())


def test_model_flops_are_six_per_parameter_per_token_plus_attention():
    config = Emu2Config.from_preset("tiny")
    ids = torch.ones(1, 10, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100),
             "images": torch.zeros(0, 3, 56, 56), "frames": torch.zeros(0, 3, 56, 56),
             "image_is_target": torch.zeros(0, dtype=torch.bool), "frame_is_target": torch.zeros(0, dtype=torch.bool)}
    t = config.text_config
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    expected = 6 * t.num_hidden_layers * per_layer * 10 + 12 * t.num_hidden_layers * 64 * 10 * 10
    assert training_flops(config, batch) == expected
    batch["labels"][0, 5:] = 1  # 5 supervised tokens; the head runs only on them
    assert training_flops(config, batch) == expected + 6 * 64 * t.vocab_size * 5
