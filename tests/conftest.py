import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("EMU2_OFFICIAL_FIXTURE", REPO.parent / "shared" / "fixtures" / "emu2-official-tiny"))

# The fixture maker seeded torch with this before each Emu2-Gen run (found by matching its RNG stream).
OFFICIAL_GEN_SEED = 400


def official_initial_latents(recorded, num_steps: int):
    """The initial noise of an official Gen run.

    The fixture's ``gen.<run>.latents`` is, despite its README, the last of the unused noise tensors that
    diffusers 0.24's Euler ``step`` draws each step; replaying the seeded stream gives the real initial draw.
    A fixture that records the initial draw itself (as its README says) is returned unchanged.
    """
    import torch

    generator = torch.Generator().manual_seed(OFFICIAL_GEN_SEED)
    draws = [torch.randn(recorded.shape, generator=generator) for _ in range(num_steps + 1)]
    return draws[0] if torch.equal(draws[num_steps], recorded) else recorded


def write_tiny_world(root: Path, image_size: int = 16) -> Path:
    """A shapes world of ``image_size`` px (8 samples of every kind, one shard each) in ``root/data`` and a random
    tiny model in ``root/encoder``, the decoder stages' frozen encoder. Returns ``root``."""
    from emu2.data.shapes import write_shapes
    from emu2.pipelines.emu2 import Emu2Pipeline

    write_shapes(root / "data", seed=0, num_train=8, num_val=0, num_heldout=0, num_episodes=0,
                 image_size=image_size, shard_size=8, processes=1)
    Emu2Pipeline.from_preset("tiny").save_pretrained(root / "encoder")
    return root


def write_damaged_pair_shards(root: Path, image_size: int = 20) -> Path:
    """Caption pairs in ``root``: ``mixed.tar`` holds 6 good samples and 2 whose image bytes are not an image;
    ``cut.tar`` (8 samples) was cut in the middle of a member, as an interrupted download leaves it."""
    import webdataset as wds
    from PIL import Image

    from emu2.data.kinds import ImageTextPair
    from emu2.data.records import encode_record

    def pair(i: int) -> dict:
        image = Image.new("RGB", (image_size, image_size), (30 * i % 256, 90, 160))
        return encode_record(ImageTextPair(image, f"shape {i}"), f"{i:04d}")

    with wds.TarWriter(str(root / "mixed.tar"), mtime=0) as writer:
        for i in range(8):
            writer.write({**pair(i), "png": b"\x89PNG not an image"} if i in (2, 5) else pair(i))
    with wds.TarWriter(str(root / "cut.tar"), mtime=0) as writer:
        for i in range(8, 16):
            writer.write(pair(i))
    data = (root / "cut.tar").read_bytes()
    (root / "cut.tar").write_bytes(data[: len(data) // 2 + 700])
    return root


def write_converted_pair_shard(root: Path, count: int = 6, image_size: int = 20) -> Path:
    """One shard of ``count`` caption pairs written by the project's converter (`emu2.data.convert.convert_pairs`
    over a jsonl table of local images); returns its path."""
    import json

    from PIL import Image

    from emu2.data.convert import convert_pairs

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (image_size, image_size), (40 * i % 256, 90, 160)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"shape {i}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (shard,) = convert_pairs(root / "pairs.jsonl", root / "shards")["shards"]
    return Path(shard)


def cut_before_sample(shard: Path, index: int) -> int:
    """Cut ``shard`` just before the tar header of sample ``index``'s first member, as a copy interrupted between
    two files leaves it: a whole number of 512-byte blocks, without the end-of-archive blocks. Returns the size."""
    import tarfile

    with tarfile.open(shard) as tar:
        first_header: dict[str, int] = {}
        for member in tar.getmembers():
            first_header.setdefault(member.name.split(".", 1)[0], member.offset)
    cut = sorted(first_header.values())[index]
    shard.write_bytes(shard.read_bytes()[:cut])
    return cut
