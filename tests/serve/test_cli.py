"""`emu2 chat | ask | generate | serve` (registered by `emu2.serve.cli.add_parsers`)."""

import argparse
import io
import sys

import httpx
import pytest
from PIL import Image

from emu2.serve import cli
from emu2.serve.chat import ChatEngine, DecodingSettings

from .conftest import data_url, png_image


def parser():
    p = argparse.ArgumentParser(prog="emu2")
    cli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture
def images(tmp_path):
    paths = []
    for colour in ("red", "blue"):
        path = tmp_path / f"{colour}.png"
        png_image(colour).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def loaded(monkeypatch, chat_pipeline):
    """Skip reloading the chat model from disk in tests that are about the command, not the loading."""
    monkeypatch.setattr(cli, "load_chat_pipeline", lambda args: chat_pipeline)


def test_every_option_of_every_verb_explains_itself():
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"chat", "ask", "generate", "serve"}
    for name, verb in sub.choices.items():
        for action in verb._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.dest} has no help"
        assert verb.format_help()


def test_inline_images_are_placed_where_they_are_written(images):
    items = cli.parse_message(f"compare @{images[0]} with @\"{images[1]}\" please, @alice")
    assert [type(i).__name__ for i in items] == ["str", "Image", "str", "Image", "str"]
    assert items[0] == "compare " and items[-1] == " please, @alice"


def test_a_missing_image_file_is_an_error_not_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image"):
        cli.parse_message(f"look at @{tmp_path / 'missing.png'}")


def test_chat_loop_streams_keeps_history_and_handles_commands(chat_pipeline, images):
    engine = ChatEngine(chat_pipeline)
    seen = []
    build = engine.build_prompt
    engine.build_prompt = lambda turns, **kw: seen.append(list(turns)) or build(turns, **kw)
    lines = iter([f"/image {images[0]}", "what is this?", f"and @{images[1]}?", "/help", "/reset", "again",
                  f"@{images[0].parent / 'nope.png'}", "/quit", "never read"])
    out = io.StringIO()
    cli.chat_loop(engine, DecodingSettings(max_new_tokens=3), None, False, lambda: next(lines), out)
    text = out.getvalue()
    assert text.count("emu2> ") == 3 and "/reset" in text and "error: no image" in text
    first, second, after_reset = seen
    assert isinstance(first[0][0], Image.Image) and len(second) == 3  # user, assistant, user
    assert isinstance(second[2][1], Image.Image) and len(after_reset) == 1


def test_chat_command_reads_stdin_until_eof(monkeypatch, capsys, loaded, chat_model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you?\n"))
    assert cli.main(["chat", "--model", str(chat_model_dir), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("emu2> ") == 2


def test_ask_answers_once_about_images(capsys, images, chat_model_dir):
    argv = ["ask", "--model", str(chat_model_dir), "--image", str(images[0]), "What is it?",
            "--max-new-tokens", "3", "--num-beams", "2"]
    assert cli.main(argv) == 0  # loads the model from its directory
    assert capsys.readouterr().out.strip()


def test_ask_few_shot_puts_images_at_their_placeholders(capsys, loaded, images, chat_model_dir, monkeypatch):
    seen = {}
    build = ChatEngine.build_prompt
    monkeypatch.setattr(ChatEngine, "build_prompt", lambda self, turns, **kw: seen.update(turns=turns, **kw)
                        or build(self, turns, **kw))
    argv = ["ask", "--model", str(chat_model_dir), "--image", str(images[0]), "--image", str(images[1]),
            "[<IMG_PLH>]red. [<IMG_PLH>]", "--raw", "--max-new-tokens", "2", "--num-beams", "1"]
    assert cli.main(argv) == 0
    [items] = seen["turns"]
    assert [type(i).__name__ for i in items] == ["str", "Image", "str", "Image", "str"] and seen["template"] is False
    with pytest.raises(SystemExit, match="placeholder"):
        cli.main(["ask", "--model", str(chat_model_dir), "--image", str(images[0]), "[<IMG_PLH>][<IMG_PLH>]"])


def test_generate_writes_pngs_with_boxes_and_subjects(tmp_path, capsys, images, gen_model_dir):
    out = tmp_path / "out" / "cat.png"
    argv = ["generate", "--model", str(gen_model_dir), "a dog and a cat", "--box", "0,200,100,400", "--phrase",
            "a dog", "--subject", str(images[0]), "--box", "100,150,300,350", "--phrase", "a cat", "--steps", "2",
            "--seed", "0", "-n", "2", "--size", "16x24", "-o", str(out)]
    assert cli.main(argv) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["cat-0.png", "cat-1.png"] and Image.open(out.parent / "cat-0.png").size == (16, 24)
    with pytest.raises(SystemExit, match="--phrase"):
        cli.main(["generate", "--model", str(gen_model_dir), "x", "--box", "0,0,1,1", "-o", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(gen_model_dir), "x", "--box", "0,0,1", "--phrase", "a", "-o", str(out)])


def test_serve_builds_the_app_with_its_limits_and_page(loaded, chat_model_dir, tmp_path):
    from emu2.serve.app import ServerThread

    args = parser().parse_args(["serve", "--model", str(chat_model_dir), "--ui", "--max-images", "1",
                                "--allowed-dir", str(tmp_path), "--port", "0", "--timeout", "30"])
    with ServerThread(cli.app_from_args(args)) as server:
        assert httpx.get(server.url + "/").status_code == 200
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={"messages": [{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}] * 2}]})
        assert reply.status_code == 400 and "--max-images" in reply.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == chat_model_dir.name


def test_serve_needs_a_model():
    with pytest.raises(SystemExit, match="--model"):
        cli.app_from_args(parser().parse_args(["serve"]))


def test_serve_with_a_decoder_answers_with_images(loaded, chat_model_dir, gen_model_dir):
    from emu2.serve.app import ServerThread

    args = parser().parse_args(["serve", "--model", str(chat_model_dir), "--decoder", str(gen_model_dir / "decoder"),
                                "--port", "0", "--max-answer-images", "1", "--max-inference-steps", "2"])
    with ServerThread(cli.app_from_args(args)) as server:
        assert httpx.get(server.url + "/healthz").json()["chat_images"] is True
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "draw"}], "max_tokens": 2, "modalities": ["text", "image"],
            "image_at": [0]})
        assert [p["type"] for p in reply.json()["choices"][0]["message"]["content"]][0] == "image_url"


def test_serve_decoder_needs_a_chat_model(gen_model_dir):
    with pytest.raises(SystemExit, match="--decoder .* needs --model"):
        cli.app_from_args(parser().parse_args(["serve", "--gen-model", str(gen_model_dir), "--decoder",
                                               str(gen_model_dir / "decoder")]))
