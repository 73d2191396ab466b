import random

import pytest
from PIL import Image

from ..conftest import FIXTURE

TOKENIZER = FIXTURE / "tokenizer"


def _tokenizer(instruct: bool):
    if not TOKENIZER.is_dir():
        pytest.skip(f"tokenizer fixture not found at {TOKENIZER} (set EMU2_OFFICIAL_FIXTURE)")
    from emu2.processing import load_tokenizer

    return load_tokenizer(TOKENIZER, instruct=instruct)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The Emu2-Chat tokenizer; its ids of every other token equal the base tokenizer's (loading is slow: once)."""
    return _tokenizer(instruct=True)


@pytest.fixture(scope="session")
def tokenizer(chat_tokenizer):
    return chat_tokenizer


@pytest.fixture(scope="session")
def config():
    from emu2.data.sequence import SequenceConfig

    return SequenceConfig(n_query=4, v_query=2, image_size=16, max_length=512)


def make_image(seed: int = 0, size: int = 20) -> Image.Image:
    rng = random.Random(seed)
    return Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes world, written once per session."""
    from emu2.data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes") / "world"
    write_shapes(out, seed=0, num_train=30, num_val=10, num_heldout=20, num_episodes=3, image_size=32,
                 shard_size=10)
    return out
