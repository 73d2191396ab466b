"""Write the shapes world as WebDataset shards, held-out splits and few-shot evaluation episodes.

Output (``out``):
  ``dataset.json``                       manifest: seed, image size, splits -> kind -> shard pattern and count
  ``train/<kind>-000000.tar`` ...        every sample kind (`emu2.data.records` layouts)
  ``val/<kind>-000000.tar``              the training distribution, other samples
  ``heldout_combos/<kind>-...tar``       scenes of held-out (shape, colour) combinations only
  ``heldout_formats/interleaved-...tar`` few-shot documents in attribute formats never used in training
  ``heldout_labels/interleaved-...tar``  few-shot documents with label words never used in training
  ``eval/episodes.json``, ``eval/images/`` few-shot episodes (8 support examples + queries) of the held-out splits
  ``lm/text-000000.tar`` ...             the language model stage's corpus (`ShapesMaker.lm_text`)

Every sample is drawn from ``random.Random(f"{seed}:{split}:{kind}:{index}")`` and tar members get fixed
names, times and owners, so the same arguments give byte-identical files (with any number of processes).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import webdataset as wds

from emu2.data.kinds import KINDS
from emu2.data.records import encode_record
from emu2.data.shapes.tasks import ShapesMaker, make_episode
from emu2.data.shapes.world import World

TRAIN_KINDS = tuple(KINDS)  # every kind
HELDOUT_KINDS = {
    "heldout_combos": ("interleaved", "pair", "text_to_image", "chat"),
    "heldout_formats": ("interleaved",),
    "heldout_labels": ("interleaved",),
}
SHOTS = (0, 1, 2, 4, 8)
_TAR = {"mtime": 0, "user": "emu2", "group": "emu2", "mode": 0o444}


def _write_kind(out: str, seed: int, split: str, kind: str, count: int, image_size: int, shard_size: int) -> dict:
    maker = ShapesMaker(World.from_seed(seed), image_size)
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{kind}-%06d.tar"), maxcount=shard_size, verbose=0, **_TAR) as writer:
        for index in range(count):
            rng = random.Random(f"{seed}:{split}:{kind}:{index}")
            record, meta = maker.make(kind, rng, split)
            writer.write(encode_record(record, f"{kind}-{index:07d}", meta=meta))
        shards = writer.shard
    return {"urls": f"{split}/{kind}-{{000000..{shards - 1:06d}}}.tar", "count": count}


def _write_episodes(out: str, seed: int, image_size: int, episodes: int) -> dict:
    maker = ShapesMaker(World.from_seed(seed), image_size)
    images = Path(out) / "eval" / "images"
    images.mkdir(parents=True, exist_ok=True)
    result = []
    for split in HELDOUT_KINDS:
        for index in range(episodes):
            episode = make_episode(maker, random.Random(f"{seed}:episodes:{split}:{index}"), split)
            name = f"{split}-{index:04d}"
            for role in ("support", "queries"):
                for k, example in enumerate(episode[role]):
                    path = images / f"{name}-{role}-{k}.png"
                    example["image"].save(path, format="PNG")
                    example["image"] = str(path.relative_to(Path(out) / "eval"))
            result.append({"id": name, **episode})
    document = {"seed": seed, "image_size": image_size, "shots": list(SHOTS), "episodes": result}
    (Path(out) / "eval" / "episodes.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    return {"episodes": "eval/episodes.json", "count": len(result)}


def write_shapes(out: str | Path, seed: int = 0, num_train: int = 1000, num_val: int | None = None,
                 num_heldout: int | None = None, num_episodes: int = 20, image_size: int = 64,
                 shard_size: int = 250, processes: int | None = None, kind_counts: dict[str, int] | None = None,
                 num_lm: int | None = None, num_lm_long: int | None = None) -> dict:
    """Generate the shapes world into ``out``; returns the manifest (also written as ``dataset.json``).

    ``num_train`` samples per kind (``num_val``/``num_heldout`` default to a tenth of it, at least 20);
    ``num_episodes`` evaluation episodes per held-out split; ``processes`` (default 1) only changes speed, not the bytes.
    ``kind_counts`` replaces ``num_train`` for the kinds it names (e.g. more cheap language-only documents).
    ``num_lm``: documents in the ``lm`` split, the LM stage's corpus (default ``num_train``); ``num_lm_long``: in
    the ``lm_long`` split, the same documents with scene sentences between what they tell and what repeats it, for
    the LM stage's long rows (default a third of ``num_lm``).
    """
    out = str(out)
    num_val = num_val if num_val is not None else max(num_train // 10, 20)
    num_heldout = num_heldout if num_heldout is not None else max(num_train // 10, 20)
    kind_counts = kind_counts or {}
    unknown = set(kind_counts) - set(TRAIN_KINDS)
    if unknown:
        raise ValueError(f"kind_counts names unknown kinds {sorted(unknown)}; kinds are {list(TRAIN_KINDS)}")
    jobs = [("train", kind, kind_counts.get(kind, num_train)) for kind in TRAIN_KINDS]
    jobs += [("val", kind, num_val) for kind in TRAIN_KINDS]
    jobs += [(split, kind, num_heldout) for split, kinds in HELDOUT_KINDS.items() for kind in kinds]
    num_lm = num_train if num_lm is None else num_lm
    jobs += [("lm", "text", num_lm), ("lm_long", "text", num_lm // 3 if num_lm_long is None else num_lm_long)]
    jobs = [job for job in jobs if job[2] > 0]
    processes = processes or 1
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            futures = [pool.submit(_write_kind, out, seed, s, k, n, image_size, shard_size) for s, k, n in jobs]
            episodes = pool.submit(_write_episodes, out, seed, image_size, num_episodes)
            written = [f.result() for f in futures]
            eval_entry = episodes.result()
    else:
        written = [_write_kind(out, seed, s, k, n, image_size, shard_size) for s, k, n in jobs]
        eval_entry = _write_episodes(out, seed, image_size, num_episodes)
    splits: dict = {}
    for (split, kind, _), entry in zip(jobs, written):
        splits.setdefault(split, {})[kind] = entry
    world = World.from_seed(seed)
    manifest = {
        "name": "shapes", "seed": seed, "image_size": image_size, "splits": splits, "eval": eval_entry,
        "heldout_combos": sorted([list(c) for c in world.heldout_combos]),
    }
    Path(out, "dataset.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
