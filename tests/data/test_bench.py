"""The data-throughput benchmark runs the whole pipeline and reports samples per second."""

from emu2.data.bench import benchmark_pipeline


def test_benchmark_pipeline_reports_throughput(shapes_dir, tokenizer, config):
    result = benchmark_pipeline(shapes_dir, workers=1, seconds=0.5, tokenizer=tokenizer, config=config, batch_size=4)
    assert result["workers"] == 1 and result["samples"] > 0 and result["samples_per_s"] > 0
    assert result["skipped"] == {} and result["image_size"] == config.image_size
