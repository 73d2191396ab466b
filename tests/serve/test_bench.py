"""The serving benchmarks run, stay within their bounds, and report what they promise."""

import time

import pytest


@pytest.mark.slow
def test_serve_benchmark_reports_throughput_latency_errors_and_memory(chat_pipeline):
    from emu2.serve.bench import run_serve_benchmark

    started = time.monotonic()
    result = run_serve_benchmark(clients=3, seconds=2, max_tokens=2, pipeline=chat_pipeline)
    assert time.monotonic() - started < 60
    assert result["requests"] > 0 and result["errors"] == 0 and result["requests_per_s"] > 0
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["healthz_under_load_ms"]["probes"] > 0 and result["server_rss_mb"]["peak_process"] > 0


@pytest.mark.slow
def test_serve_benchmark_loads_emu2_serve_in_a_child_process_given_a_model_directory(chat_model_dir):
    from emu2.serve.bench import run_serve_benchmark

    result = run_serve_benchmark(clients=2, seconds=1, max_tokens=2, model_dir=chat_model_dir, torch_threads=1)
    assert result["server"] == "a child process (emu2 serve)" and result["model"] == str(chat_model_dir)
    assert result["requests"] > 0 and result["errors"] == 0 and result["batching_factor"] >= 1
    assert result["server_rss_mb"]["peak_process"] > 0  # the child's memory, read from /proc


def test_a_server_that_cannot_start_is_reported_with_its_own_error(tmp_path):
    from emu2.serve.bench import run_serve_benchmark

    with pytest.raises(ChildProcessError, match=r"did not start serving(.|\n)*error"):
        run_serve_benchmark(clients=1, seconds=1, model_dir=tmp_path / "missing")


@pytest.mark.slow
def test_serve_scaling_reports_each_client_count_its_batching_factor_and_the_targets(chat_pipeline):
    from emu2.serve.bench import run_serve_scaling

    result = run_serve_scaling(clients=(1, 8), seconds=1, max_tokens=3, pipeline=chat_pipeline)
    one, eight = result["table"]
    assert (one["clients"], eight["clients"]) == (1, 8) and one["errors"] == eight["errors"] == 0
    assert one["batching_factor"] == 1 and eight["batching_factor"] > 1
    assert eight["completion_tokens_per_s"] > 0 and eight["p50_ms"] <= eight["p99_ms"]
    assert set(result["targets"]) == {"requests_per_s_8_over_1", "speedup_target_4x_met", "p99_8_over_p50_1",
                                      "latency_target_3x_met"}


@pytest.mark.slow
def test_fuzzing_the_openapi_schema_finds_no_server_errors(chat_pipeline, gen_pipeline):
    pytest.importorskip("schemathesis", reason="pip install schemathesis")
    from emu2.serve.bench import run_fuzz

    result = run_fuzz(max_examples=4, seconds=30, chat_pipeline=chat_pipeline, gen_pipeline=gen_pipeline)
    assert result["operations"] == 5 and result["requests"] > 15
    assert result["server_errors"] == 0, result["failures"]
    assert result["malformed_errors"] == 0, result["malformed"]
    assert result["connection_errors"] == 0 and result["server_alive_after"]
