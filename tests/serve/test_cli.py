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


def test_ask_and_chat_decode_alike_by_default_with_the_official_chat_settings():
    """Official `EmuChatGeneration.__call__`: num_beams=5, length_penalty=-1, no sampling, for every caller."""
    ask = cli.decoding_settings(parser().parse_args(["ask", "--model", "m", "what?"]))
    chat = cli.decoding_settings(parser().parse_args(["chat", "--model", "m"]))
    assert ask == chat
    assert (ask.num_beams, ask.length_penalty, ask.sampling) == (5, -1.0, False)
    assert ask.generate_kwargs()["length_penalty"] == -1.0


def test_decoding_flags_override_the_official_settings():
    settings = cli.decoding_settings(parser().parse_args(["chat", "--model", "m", "--num-beams", "1",
                                                          "--length-penalty", "0.5"]))
    assert (settings.num_beams, settings.length_penalty) == (1, 0.5)
    assert "length_penalty" not in settings.generate_kwargs()  # a beam-search knob, unused by greedy decoding


class ScriptedEngine:
    """A chat engine whose answers are scripted: each is text chunks, or KeyboardInterrupt after some chunks."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def build_prompt(self, turns, **kwargs):
        self.prompts.append([list(t) if isinstance(t, list) else t for t in turns])
        return turns

    def stream(self, prompt, settings, on_text):
        chunks = self.answers.pop(0)
        for chunk in chunks:
            if chunk is KeyboardInterrupt:
                raise KeyboardInterrupt
            on_text(chunk)
        from emu2.serve.chat import Answer

        return Answer("".join(chunks), "stop", len(chunks))


def reader(lines):
    """A fake `input`: each item is a line, or an exception to raise (Ctrl-C is KeyboardInterrupt)."""
    items = iter(lines)

    def read():
        item = next(items, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


def test_ctrl_c_while_an_answer_streams_stops_it_and_keeps_the_conversation():
    engine = ScriptedEngine([["a red ", "cir", KeyboardInterrupt], ["yes"]])
    out = io.StringIO()
    cli.chat_loop(engine, DecodingSettings(num_beams=1), None, False, reader(["what is it?", "sure?"]), out)
    assert "(stopped)" in out.getvalue()
    # the next question sees the first one and the answer as far as it was shown
    assert engine.prompts[1] == [["what is it?"], "a red cir", ["sure?"]]


def test_ctrl_c_before_any_answer_text_drops_the_question_only():
    engine = ScriptedEngine([[KeyboardInterrupt], ["fine"], ["again"]])
    read = reader(["first", "second", "third"])
    cli.chat_loop(engine, DecodingSettings(num_beams=1), None, False, read, io.StringIO())
    assert engine.prompts[1] == [["second"]]
    assert engine.prompts[2] == [["second"], "fine", ["third"]]


def test_ctrl_c_at_the_prompt_clears_the_line_and_chat_goes_on():
    engine = ScriptedEngine([["hi"]])
    cli.chat_loop(engine, DecodingSettings(num_beams=1), None, False, reader([KeyboardInterrupt, "hello"]),
                  io.StringIO())
    assert engine.prompts == [[["hello"]]]


def test_chat_attaches_a_folder_of_frames_as_one_video(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(12):
        Image.new("RGB", (8, 8), (20 * k, 0, 0)).save(frames / f"{k:05d}.png")
    engine = ScriptedEngine([["ok"]])
    cli.chat_loop(engine, DecodingSettings(num_beams=1), None, False, reader([f"/video {frames}", "what happens?"]),
                  io.StringIO(), num_frames=4)
    [[message]] = engine.prompts
    video, text = message
    assert text == "what happens?" and len(video) == 4 and all(isinstance(f, Image.Image) for f in video)


def test_ask_with_a_video_puts_its_frames_in_the_prompt(loaded, chat_model_dir, tmp_path, monkeypatch):
    gif = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (16, 16), (40 * k, 100, 0)) for k in range(6)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    seen = []
    answer = ChatEngine.answer
    monkeypatch.setattr(ChatEngine, "answer", lambda self, prompt, settings: seen.append(prompt)
                        or answer(self, prompt, settings))
    argv = ["ask", "--model", str(chat_model_dir), "--video", str(gif), "--frames", "3", "what happens?",
            "--max-new-tokens", "2", "--num-beams", "1"]
    assert cli.main(argv) == 0  # the model ran on the frames
    [prompt] = seen
    assert len(prompt.frames) == 3 and prompt.text.count("[<VID_PLH>]") == 3 and "[VIDEO]" in prompt.text


def test_ask_refuses_a_video_file_it_cannot_decode_and_says_how(tmp_path, chat_model_dir):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="extract its frames"):
        cli.main(["ask", "--model", str(chat_model_dir), "--video", str(clip), "what happens?"])


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
