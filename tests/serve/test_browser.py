"""The web page in a real browser: `emu2 serve --ui` in a subprocess, headless Chromium driven by Playwright.

Needs Debian's `chromium` package (/usr/bin/chromium) and the `playwright` Python package; Playwright's own
browser download is never used.
"""

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import png_image

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


def test_server_errors_are_shown_on_the_page(page):
    page.fill("#image-prompt", "too many steps")
    page.fill("#image-steps", "99")
    page.click("#image-generate")
    page.wait_for_selector("#image-status.error")
    assert "--max-inference-steps" in page.inner_text("#image-status")
