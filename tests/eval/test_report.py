"""Results JSON, Table 1/Table 2 style markdown beside the paper's numbers, and the accuracy-vs-shots plot."""

import json

from emu2.eval.report import (
    PAPER_CHAT,
    PAPER_FEWSHOT,
    canonical_benchmark,
    chat_markdown_table,
    fewshot_markdown_table,
    plot_fewshot,
    save_results,
)

OURS = {"vqav2": {0: 0.301, 4: 0.655}, "ok-vqa": {0: 0.25, 4: 0.5}}


def test_paper_numbers_are_table_1_and_table_2():
    assert PAPER_FEWSHOT["VQAv2"] == {0: 33.3, 4: 67.0, 8: 67.8, 16: 68.8}
    assert PAPER_FEWSHOT["HatefulMemes"][16] == 66.0
    assert PAPER_CHAT["MSRVTT"] == 31.4 and PAPER_CHAT["MMMU"] == 34.1


def test_benchmark_names_map_to_the_paper_columns():
    assert [canonical_benchmark(n) for n in ["ok-vqa", "VQAv2", "seed_bench", "msvd-qa", "hateful_memes"]] == [
        "OKVQA", "VQAv2", "SEED", "MSVD", "HatefulMemes"]
    assert canonical_benchmark("my-new-bench") == "my-new-bench"


def test_fewshot_table_has_shots_as_rows_benchmarks_as_columns_and_paper_rows_first():
    table = fewshot_markdown_table(OURS)
    assert table.splitlines() == [
        "| Model | Shot | VQAv2 | OKVQA |",
        "|---|---|---|---|",
        "| Emu2 (paper) | 0 | 33.3 | 26.7 |",
        "|  | 4 | 67.0 | 53.2 |",
        "| ours | 0 | 30.1 | 25.0 |",
        "|  | 4 | 65.5 | 50.0 |",
    ]


def test_chat_table_puts_the_paper_row_above_ours():
    table = chat_markdown_table({"GQA": 0.6, "msrvtt_qa": 0.3})
    assert table.splitlines()[2:] == ["| Emu2-Chat (paper) | 65.1 | 31.4 |", "| ours | 60.0 | 30.0 |"]


def test_results_json_round_trips_into_the_table(tmp_path):
    path = save_results(tmp_path / "results.json", fewshot=OURS, chat={"GQA": 0.6}, meta={"model": "tiny"})
    saved = json.loads(path.read_text())
    assert saved["fewshot"]["VQAv2"] == {"0": 0.301, "4": 0.655}
    assert saved["chat"] == {"GQA": 0.6} and saved["meta"] == {"model": "tiny"}
    assert fewshot_markdown_table(saved["fewshot"]) == fewshot_markdown_table(OURS)


def test_plot_is_written_as_png(tmp_path):
    path = plot_fewshot(OURS, tmp_path / "plots" / "fewshot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
