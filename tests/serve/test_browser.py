"""The web page in a real browser: `emu2 serve --ui` in a subprocess, headless Chromium driven by Playwright.

Needs Debian's `chromium` package (/usr/bin/chromium) and the `playwright` Python package; Playwright's own
browser download is never used.
"""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import png_image, running, unet_calls

CHROMIUM = Path(os.environ.get("EMU2_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def served_ui(chat_model_dir, gen_model_dir):
    """`python -m emu2.serve.cli serve --ui` on a free loopback port; yields its URL."""
    command = [sys.executable, "-m", "emu2.serve.cli", "serve", "--model", str(chat_model_dir), "--gen-model",
               str(gen_model_dir), "--ui", "--host", "127.0.0.1", "--port", "0", "--max-inference-steps", "4",
               "--timeout", "60"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline, url, log = time.monotonic() + 90, None, []
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        url = match and match.group(1)
    try:
        assert url, "the server did not start:\n" + "".join(log[-30:])
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def page(served_ui):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.goto(served_ui)
        yield page
        browser.close()


def test_upload_an_image_ask_and_see_the_streamed_answer(page, tmp_path):
    png_image("red", (600, 500)).save(tmp_path / "red.png")  # both sides >= 448: the page resizes it
    page.wait_for_selector("#server-status:has-text('chat:')")
    page.set_input_files("#chat-images", str(tmp_path / "red.png"))
    page.wait_for_selector("#chat-attachments img")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "What is in the image?")
    page.click("#chat-send")
    answer = page.wait_for_selector(".message.assistant.done", timeout=60_000)
    assert page.inner_text(".message.user .text") == "What is in the image?"
    assert page.query_selector(".message.user img") is not None
    text = answer.inner_text()
    assert text.strip() and not text.startswith("error"), text
    # A second turn goes out with the first question and answer as history.
    page.fill("#chat-input", "And then?")
    page.click("#chat-send")
    page.locator(".message.assistant.done").nth(1).wait_for(timeout=60_000)
    assert "error" not in page.inner_text("#messages").split("And then?")[1][:6]
    assert page.problems == []


def test_type_a_prompt_and_see_the_generated_image(page, tmp_path):
    page.wait_for_selector("#server-status:has-text('images:')")
    page.fill("#image-prompt", "a red circle on a white background")
    page.fill("#image-steps", "2")
    page.fill("#image-seed", "0")
    page.click("#image-generate")
    image = page.wait_for_selector("#image-results img", timeout=60_000)
    assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") == 16
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert "16x16" in page.inner_text("#image-status")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert page.problems == []


def test_the_image_panel_shows_each_step_and_cancel_stops_the_servers_drawing(page, gen_pipeline):
    from emu2.serve.limits import ServeLimits

    steps = 500  # at 20 ms a step (below) the image would take 10 s or more
    with running(gen=gen_pipeline, ui=True, limits=ServeLimits(max_inference_steps=steps)) as server, \
            unet_calls(gen_pipeline.decoder.unet, delay=0.02) as calls:
        tab = page.context.browser.new_page()
        try:
            tab.goto(server.url)
            tab.wait_for_selector("#server-status:has-text('images:')")
            tab.fill("#image-prompt", "a slow picture")
            tab.fill("#image-steps", str(steps))
            tab.click("#image-generate")
            tab.wait_for_function("() => document.querySelector('#image-status progress')?.value >= 3",
                                  timeout=30_000)
            text, step, most = tab.evaluate("() => { const s = document.querySelector('#image-status'); "
                                            "const b = s.querySelector('progress'); "
                                            "return [s.textContent, b.value, b.max]; }")
            assert f"step {step} / {steps}" in text and most == steps and step < steps
            tab.click("#image-cancel")
            tab.wait_for_selector("#image-status:has-text('cancelled')")
            worker, deadline = server.app.state.server.worker, time.monotonic() + 5
            while worker.busy and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not worker.busy and len(calls) < steps // 4  # the server stopped drawing
            # and serves the next image
            tab.fill("#image-steps", "2")
            tab.click("#image-generate")
            tab.wait_for_selector("#image-status:has-text('16x16')", timeout=30_000)
            assert tab.locator("#image-results img").count() == 1
        finally:
            tab.close()


def test_server_errors_are_shown_on_the_page(page):
    page.fill("#image-prompt", "too many steps")
    page.fill("#image-steps", "99")
    page.click("#image-generate")
    page.wait_for_selector("#image-status.error")
    assert "--max-inference-steps" in page.inner_text("#image-status")


def test_an_answer_with_images_shows_text_and_framed_images_in_order(page, tmp_path):
    page.problems.clear()  # the error test before left its 400 in the console
    page.wait_for_selector("#chat-image-controls:not([hidden])")
    page.click("#chat-reset")
    page.check("#chat-draw")
    page.check("#chat-draw-first")  # a tiny random model rarely writes [IMG] by itself
    page.fill("#chat-steps", "2")
    page.fill("#chat-max-tokens", "6")
    page.fill("#chat-input", "Tell a story with a picture.")
    page.click("#chat-send")
    answer = page.wait_for_selector(".message.assistant.done", timeout=60_000)
    kinds = answer.eval_on_selector_all(".parts > *", "nodes => nodes.map(n => n.tagName + '.' + n.className)")
    assert kinds[0] == "FIGURE.generated" and "SPAN.text" in kinds[1:], kinds
    image = answer.query_selector("figure.generated img")
    assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") == 16
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert "Tell a story with a picture." in answer.query_selector("figure.generated figcaption").inner_text()
    border = image.evaluate("img => getComputedStyle(img.closest('figure')).borderTopStyle")
    assert border == "solid"
    page.uncheck("#chat-draw")
    page.uncheck("#chat-draw-first")
    page.screenshot(path=str(tmp_path / "interleaved.png"), full_page=True)
    assert page.problems == []


def test_attachments_are_added_and_removed_one_by_one_and_placed_at_their_markers(page, tmp_path):
    page.problems.clear()  # the error test before left its 400 in the console
    for colour in ("red", "blue", "green"):
        png_image(colour, (40, 30)).save(tmp_path / f"{colour}.png")
    page.click("#chat-reset")
    page.fill("#chat-input", "")
    page.set_input_files("#chat-images", str(tmp_path / "red.png"))
    page.wait_for_selector("#chat-attachments .thumb")
    page.type("#chat-input", " is red; ")
    page.set_input_files("#chat-images", [str(tmp_path / "blue.png"), str(tmp_path / "green.png")])
    page.locator("#chat-attachments .thumb").nth(2).wait_for()
    assert page.input_value("#chat-input") == "[image 1] is red; [image 2][image 3]"
    page.screenshot(path=str(tmp_path / "attachments.png"))
    page.click("#chat-attachments .thumb:nth-child(2) .remove")  # image 2 and its marker go
    assert page.locator("#chat-attachments .thumb").count() == 2
    assert page.input_value("#chat-input") == "[image 1] is red; [image 3]"
    page.focus("#chat-input")  # Playwright puts the caret first when it focuses a field: move it back
    page.keyboard.press("Control+End")
    page.keyboard.type(" is green?")

    sent = []

    def answer(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="application/json", body=_completion("They are shapes."))

    page.route("**/v1/chat/completions", answer)
    try:
        page.fill("#chat-beams", "2")  # beam search: not streamed
        page.click("#chat-send")
        page.wait_for_selector(".message.assistant.done")
    finally:
        page.unroute("**/v1/chat/completions")
        page.fill("#chat-beams", "1")
    content = sent[0]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["image_url", "text", "image_url", "text"]
    assert [p["text"] for p in content if p["type"] == "text"] == [" is red; ", " is green?"]
    assert sent[0]["num_beams"] == 2
    bubble = page.locator(".message.user").last
    assert bubble.evaluate("b => [...b.children].map(n => n.tagName).join()") == "IMG,SPAN,IMG,SPAN"
    assert page.locator("#chat-attachments .thumb").count() == 0
    assert page.problems == []


def test_a_grounded_answer_is_drawn_as_boxes_on_the_image(page, tmp_path):
    page.problems.clear()  # the error test before left its 400 in the console
    png_image("white", (200, 100)).save(tmp_path / "white.png")
    page.click("#chat-reset")
    page.fill("#chat-input", "Where is the square?")
    page.set_input_files("#chat-images", str(tmp_path / "white.png"))
    page.check("#chat-grounding")
    grounded = ("<phrase>the square</phrase><object><patch_index_0000><patch_index_0056>"
                "<patch_index_0112><patch_index_0224></object>")
    sent = []

    def answer(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="text/event-stream", body=_stream(["In ", grounded, "."]))

    page.route("**/v1/chat/completions", answer)
    try:
        page.click("#chat-send")
        page.wait_for_selector(".message.assistant.done")
    finally:
        page.unroute("**/v1/chat/completions")
        page.uncheck("#chat-grounding")
    assert sent[0]["grounding"] is True
    answer_bubble = page.locator(".message.assistant").last
    assert answer_bubble.locator(".text").inner_text() == "In the square."
    box = answer_bubble.locator(".box")
    assert box.count() == 1 and box.inner_text() == "the square"
    style = box.evaluate("b => [b.style.left, b.style.top, b.style.width, b.style.height]")
    assert style == ["0%", "25%", "50%", "75%"]
    page.screenshot(path=str(tmp_path / "grounded.png"), full_page=True)
    assert page.problems == []


def _completion(text: str) -> str:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]})


def _stream(deltas: list[str]) -> str:
    chunks = [{"choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]} for d in deltas]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
