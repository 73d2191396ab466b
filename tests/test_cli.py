"""The `emu2` command line."""

import json

import pytest

from emu2.cli import main


@pytest.mark.parametrize("preset,total,visual", [("emu2", 36906513152, 4350093568),
                                                 ("emu2-chat", 36906539776, 4350093568)])
def test_inspect_counts_official_presets_without_memory(capsys, preset, total, visual):
    main(["inspect", "--preset", preset, "--json"])
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["total"] == total and params["visual"] == visual
    assert params["total"] == params["visual"] + params["lm"] + params["projections"]


def test_init_writes_model_and_tokenizer(tmp_path):
    from emu2.pipeline import Emu2Pipeline

    main(["init", "--preset", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert Emu2Pipeline.from_pretrained(tmp_path).model.config.n_query == 4


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("inspect", "convert", "init", "bench"):
        assert verb in out
