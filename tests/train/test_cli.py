"""`emu2 train RECIPE [key=value ...] [--resume] [--stop-after N]` (through `python -m emu2.train`'s main)."""

import json

import yaml

from emu2.train.cli import main
from emu2.train.metrics import read_metrics

from .test_distributed import RECIPE


def test_train_stops_after_a_step_and_resumes_from_the_command_line(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "run")}))
    assert main([str(recipe), "steps=2", "--stop-after", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 1 and not first["finished"]
    assert main([str(recipe), "steps=2", "--resume"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["step"] == 2 and second["finished"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "tokenizer_config.json").is_file()
