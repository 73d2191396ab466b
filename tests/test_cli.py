"""The `emu2` command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from emu2.cli import main


@pytest.mark.parametrize("preset,total,visual", [("emu2", 36906513152, 4350093568),
                                                 ("emu2-chat", 36906539776, 4350093568)])
def test_inspect_counts_official_presets_without_memory(capsys, preset, total, visual):
    main(["inspect", "--preset", preset, "--json"])
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["total"] == total and params["visual"] == visual
    assert params["total"] == params["visual"] + params["lm"] + params["projections"]


def test_init_writes_model_and_tokenizer(tmp_path):
    from emu2.pipelines.emu2 import Emu2Pipeline

    main(["init", "--preset", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert Emu2Pipeline.from_pretrained(tmp_path).model.config.n_query == 4


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("inspect", "convert", "init", "bench"):
        assert verb in out


# ------------------------------------------------------------------------------ exit status, errors, start-up
REPO = Path(__file__).resolve().parents[1]
VERBS = ["inspect", "convert", "init", "bench", "train", "quickstart", "data", "data shapes", "data convert", "eval",
         "eval shapes", "eval vqav2", "chat", "ask", "generate", "serve"]


def emu2(*args, env=None):
    """Run the `emu2` command as a user does (its own process), stdout thrown away as with ``> /dev/null``."""
    return subprocess.run([sys.executable, "-m", "emu2.cli", *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    from emu2.pipelines.emu2 import Emu2Pipeline

    Emu2Pipeline.from_preset("tiny").save_pretrained(path)
    return path


def test_data_shapes_exits_0_with_stdout_redirected(tmp_path):
    """The bug: `run` returns the manifest dict, which sys.exit printed to stderr with status 1."""
    done = emu2("data", "shapes", "--out", tmp_path / "d", "--seed", 0, "--num-train", 2, "--num-val", 1,
                "--num-heldout", 1, "--num-episodes", 1, "--num-lm", 1, "--processes", 1)
    assert done.returncode == 0, done.stderr
    assert "splits" not in done.stderr  # no manifest dumped as an error message
    assert (tmp_path / "d" / "dataset.json").is_file()


def test_train_list_exits_0_with_stdout_redirected():
    done = emu2("train", "--list")
    assert done.returncode == 0, done.stderr


def test_ask_exits_0_without_progress_bars_on_stderr(tiny_dir, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    done = emu2("ask", "--model", tiny_dir, "--image", tmp_path / "red.png", "--max-new-tokens", 2, "--num-beams", 1,
                "what?")
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr


@pytest.mark.parametrize("case", ["missing image", "missing model", "not a model directory"])
def test_a_user_mistake_is_one_line_with_status_1_not_a_traceback(tiny_dir, tmp_path, case):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    argv = {"missing image": ["ask", "--model", tiny_dir, "--image", tmp_path / "missing.png", "hi"],
            "missing model": ["ask", "--model", tmp_path / "nowhere", "hi"],
            "not a model directory": ["ask", "--model", tmp_path / "bad", "hi"]}[case]
    done = emu2(*argv)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emu2: error: "), done.stderr
    assert "Traceback" not in done.stderr
    if case == "missing image":
        assert "missing.png" in lines[0]


def test_emu2_debug_shows_the_traceback_of_a_user_error(tmp_path):
    done = emu2("ask", "--model", tmp_path / "nowhere", "hi", env={"EMU2_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    """Only user errors become one line: a bug (here a TypeError) must stay debuggable."""
    import emu2.cli as cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_inspect", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["inspect", "--preset", "tiny"])


def test_a_command_returning_a_result_exits_0(monkeypatch):
    """A command's return value that is not an int (a manifest, scores) is no exit status."""
    import emu2.cli as cli

    monkeypatch.setattr(cli, "_inspect", lambda args: {"splits": {}})
    assert cli.main(["inspect", "--preset", "tiny"]) == 0


def test_every_verb_answers_help_with_status_0(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            main([*verb.split(), "--help"])
        assert exit_.value.code == 0, verb
        assert "usage: emu2" in capsys.readouterr().out


def test_help_of_emu2_and_of_every_verb_does_not_import_torch():
    """`--help` must answer at once: torch, transformers, diffusers and fastapi load only when a command runs."""
    script = ("import sys\nfrom emu2.cli import main\n"
              f"for verb in [[]] + [v.split() for v in {VERBS!r}]:\n"
              "    try:\n        main([*verb, '--help'])\n    except SystemExit:\n        pass\n"
              "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'fastapi') if m in sys.modules]\n"
              "print(','.join(heavy), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


def test_an_unknown_preset_is_refused_with_the_list_of_presets(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--preset", "nope"])
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "emu2-chat" in err
