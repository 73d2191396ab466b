"""Shared fixtures: one tiny random chat model and one tiny Emu2-Gen pipeline per session, real servers on
loopback ports, and the official `openai` client pointed at them."""

import base64
import io
import json
import time
from contextlib import contextmanager

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def chat_pipeline():
    from emu2.pipelines.emu2 import Emu2Pipeline

    return Emu2Pipeline.from_preset("tiny-chat")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, chat_pipeline):
    path = tmp_path_factory.mktemp("tiny-chat")
    chat_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gen_pipeline():
    from emu2.pipelines.gen import Emu2GenPipeline

    return Emu2GenPipeline.from_preset("tiny")


@pytest.fixture(scope="session")
def gen_model_dir(tmp_path_factory, gen_pipeline):
    path = tmp_path_factory.mktemp("tiny-gen")
    gen_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def allowed_dir(tmp_path_factory):
    """A directory file:// URLs may read, holding one image, next to a secret they must not reach."""
    root = tmp_path_factory.mktemp("files")
    (root / "allowed").mkdir()
    png_image("green").save(root / "allowed" / "green.png")
    png_image("black").save(root / "secret.png")
    (root / "allowed" / "link.png").symlink_to(root / "secret.png")
    return root / "allowed"


@contextmanager
def running(chat=None, gen=None, **kwargs):
    """A real uvicorn server on a free loopback port, serving `create_app(chat, gen, **kwargs)`."""
    from emu2.serve.app import ServerThread, create_app

    app = create_app(chat, gen, **kwargs)
    with ServerThread(app) as server:
        server.app = app
        yield server


@pytest.fixture(scope="module")
def server(chat_pipeline, gen_pipeline, allowed_dir):
    from emu2.serve.limits import ServeLimits

    limits = ServeLimits(max_images=3, max_image_pixels=512 * 512, max_image_bytes=200_000,
                         max_request_bytes=1_000_000, max_prompt_tokens=512, max_tokens=32, default_max_tokens=8,
                         max_n=3, max_inference_steps=5, max_output_side=64)
    with running(chat_pipeline, gen_pipeline, limits=limits, allowed_dir=allowed_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def png_image(colour="red", size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def png_bytes(colour="red", size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    png_image(colour, size).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(colour="red", size=(32, 32)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour, size)).decode()


@contextmanager
def unet_calls(unet, delay: float = 0.0):
    """-> the list of the UNet's forward calls while inside (one per denoising step: the guidance pair is one
    batch), each made to last at least ``delay`` seconds (a slow model, so a cancel can land mid-image)."""
    calls = []

    def hook(module, args):
        calls.append(time.monotonic())
        time.sleep(delay)

    handle = unet.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def sse_events(lines) -> list[tuple[str | None, dict | str]]:
    """Server-sent event lines -> [(event name or None, parsed data)]; ``[DONE]`` is kept as the string."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = None
    return events
