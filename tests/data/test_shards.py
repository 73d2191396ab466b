"""Shards -> Samples: layouts of every kind, corrupt data, mixing weights, order, resume and reader splits."""

import json
import random
from collections import Counter
from dataclasses import replace
from itertools import chain, islice

import pytest
import torch
import webdataset as wds

from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.mixing import Source, expand_urls, sources_from_manifest
from emu2.data.records import encode_record
from emu2.data.sequence import IGNORE_INDEX
from emu2.data.shards import Augmentation, ShardDataset, make_dataloader

from ..conftest import cut_before_sample, write_converted_pair_shard
from .conftest import make_image


def write_texts(folder, name, count, per_shard):
    """Text shards whose samples say "<name> <index>" (so tests can tell them apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0) as w:
        for i in range(count):
            w.write(encode_record(K.Text(f"{name} {i}"), f"{name}{i:05d}"))
    return str(folder / f"{name}-*.tar")


def texts(samples, tok):
    return [tok.decode(s.input_ids[1:-1]).strip() for s in samples]


def dataset(sources, tok, config, **kw):
    kw = {"shuffle_buffer": 8, "repeat": False, **kw}
    return ShardDataset(sources, tok, config, **kw)


ONE_OF_EACH = {
    "pair": lambda: K.ImageTextPair(make_image(1), "a caption"),
    "text_to_image": lambda: K.TextToImage("a caption", make_image(2)),
    "video_pair": lambda: K.VideoTextPair([make_image(k) for k in range(10)], "a video"),
    "interleaved": lambda: K.InterleavedDocument(["one.", "two."], [make_image(1), make_image(2)], [0, 1]),
    "interleaved_with_unscored": lambda: K.InterleavedDocument(["a dax.", "a dax."], [make_image(1), make_image(2)],
                                                               [0, 1], "before", unscored=(0,)),
    "video_interleaved": lambda: K.VideoDocument(["a.", "b."], [[make_image()] * 2, [make_image()] * 3], [0, 1]),
    "grounded": lambda: K.GroundedPair(make_image(), "a dog", [K.GroundedObject(2, 5, [(0, 0, 0.5, 0.5)])]),
    "text": lambda: K.Text("plain text"),
    "text_with_context": lambda: K.Text("kax bloo.", context="kax bloo."),
    "text_with_unscored": lambda: K.Text("red: dax. blue: wug. red: dax.", unscored=((0, 4), (5, 9), (10, 20))),
    "chat": lambda: K.Conversation([f"{P.IMAGE_PLACEHOLDER}what?", "a dog", f"{P.VIDEO_TOKEN}and?", "runs"],
                                   [make_image()], [make_image(k) for k in range(8)]),
    "edit": lambda: K.ImageEdit(make_image(1), "make it red", make_image(2)),
    "grounded_generation": lambda: K.GroundedGeneration(
        make_image(), "a dog", [K.GroundedObject(2, 5, [(0, 0, 0.5, 0.5)])], [make_image(3)]),
}


@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_every_kind_round_trips_through_its_shard_layout(name, tmp_path, chat_tokenizer, config):
    record = ONE_OF_EACH[name]()
    kind = record.kind
    assert name.startswith(kind)
    with wds.TarWriter(str(tmp_path / "s.tar"), mtime=0) as w:
        w.write(encode_record(record, "sample0", meta={"note": "ignored"}))
    config = replace(config, drop_entity_prob=0.0, drop_box_prob=0.0)
    [sample] = list(dataset([Source(kind, kind, str(tmp_path / "s.tar"))], chat_tokenizer, config))
    direct = K.build_sample(ONE_OF_EACH[name](), chat_tokenizer, config, random.Random(0))
    assert sample.kind == kind
    assert len(sample.images) == len(direct.images) and len(sample.frames) == len(direct.frames)
    assert sample.image_is_target == direct.image_is_target
    assert sorted(sample.input_ids.tolist()) == sorted(direct.input_ids.tolist())  # same tokens, maybe reordered
    if isinstance(record, K.Text) or getattr(record, "image_position", "") == "before":
        # no randomness: the labels (what is read but not scored) survive the shard too
        assert sample.labels.tolist() == direct.labels.tolist()


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tokenizer, config):
    good = encode_record(K.ImageTextPair(make_image(), "good"), "good0")
    bad_image = {**encode_record(K.ImageTextPair(make_image(), "bad"), "bad1"), "png": b"\x89PNG not really"}
    no_caption = {k: v for k, v in encode_record(K.ImageTextPair(make_image(), "x"), "bad2").items() if k != "txt"}
    with wds.TarWriter(str(tmp_path / "pair-0.tar"), mtime=0) as w:
        for s in (good, bad_image, no_caption, {**good, "__key__": "good3"}):
            w.write(s)
    doc = encode_record(K.InterleavedDocument(["a."], [make_image()], [0]), "doc0")
    with wds.TarWriter(str(tmp_path / "doc-0.tar"), mtime=0) as w:
        w.write({**doc, "json": b"{not json"})
        w.write(doc | {"__key__": "doc1"})
    write_texts(tmp_path, "text", 40, per_shard=40)
    data = (tmp_path / "text-000000.tar").read_bytes()
    (tmp_path / "text-000000.tar").write_bytes(data[: len(data) // 2 + 700])  # a download cut mid-member
    (tmp_path / "empty.tar").write_bytes(b"not a tar file")
    sources = [Source("pairs", "pair", str(tmp_path / "pair-0.tar")),
               Source("docs", "interleaved", str(tmp_path / "doc-0.tar")),
               Source("text", "text", [str(tmp_path / "text-000000.tar"), str(tmp_path / "empty.tar")])]
    ds = dataset(sources, tokenizer, config)
    samples = list(ds)
    kinds = Counter(s.kind for s in samples)
    assert kinds["pair"] == 2 and kinds["interleaved"] == 1 and 5 < kinds["text"] < 40
    assert ds.stats["skipped.bad_image"] == 1
    assert ds.stats["skipped.bad_record"] == 1
    assert ds.stats["skipped.bad_json"] == 1
    assert ds.stats["read_errors"] == 2  # the truncated shard and the garbage file
    assert ds.stats["samples"] == len(samples)


def test_a_shard_cut_at_a_member_boundary_counts_as_truncated(tmp_path, tokenizer, config):
    shard = write_converted_pair_shard(tmp_path, count=6)
    source = [Source("pairs", "pair", str(shard))]
    whole = dataset(source, tokenizer, config)
    assert len(list(whole)) == 6 and not [k for k in whole.stats if k.startswith("skipped") or k == "read_errors"]
    size = cut_before_sample(shard, 4)
    assert size % 512 == 0  # tarfile reads these bytes as a complete archive of 4 samples
    cut = dataset(source, tokenizer, config)
    assert len(list(cut)) == 4
    assert cut.stats["skipped.truncated_shard"] == 1 and "read_errors" not in cut.stats


def _sample_offsets(shard):
    import tarfile

    with tarfile.open(shard) as tar:
        first_header: dict[str, int] = {}
        for member in tar.getmembers():
            first_header.setdefault(member.name.split(".", 1)[0], member.offset)
    return sorted(first_header.values())


def test_a_corrupt_header_in_mid_shard_counts_as_a_corrupt_shard(tmp_path, tokenizer, config):
    shard = write_converted_pair_shard(tmp_path, count=6)
    data = bytearray(shard.read_bytes())
    header = _sample_offsets(shard)[3]
    data[header + 100:header + 108] = b"\xff" * 8  # the header's mode field: its checksum no longer matches
    shard.write_bytes(bytes(data))
    damaged = dataset([Source("pairs", "pair", str(shard))], tokenizer, config)
    assert len(list(damaged)) == 3  # the samples before the bad header, the last of them included
    assert damaged.stats["skipped.corrupt_shard"] == 1 and "read_errors" not in damaged.stats


def test_compressed_shards_are_read_and_checked_like_plain_ones(tmp_path, tokenizer, config):
    import gzip

    shard = write_converted_pair_shard(tmp_path, count=6)
    plain = shard.read_bytes()
    whole = tmp_path / "whole.tar.gz"
    whole.write_bytes(gzip.compress(plain))
    read = dataset([Source("pairs", "pair", str(whole))], tokenizer, config)
    assert len(list(read)) == 6 and not [k for k in read.stats if k.startswith("skipped") or k == "read_errors"]
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(plain[:_sample_offsets(shard)[4]]))  # cut at a member boundary, then compressed
    read = dataset([Source("pairs", "pair", str(cut))], tokenizer, config)
    assert len(list(read)) == 4
    assert read.stats["skipped.truncated_shard"] == 1 and "read_errors" not in read.stats


def test_mixing_weights_are_honoured(tmp_path, tokenizer, config):
    a = write_texts(tmp_path, "a", 50, 10)
    b = write_texts(tmp_path, "b", 50, 10)
    ds = dataset([Source("a", "text", a, weight=3.0), Source("b", "text", b, weight=1.0)], tokenizer, config,
                 repeat=True)
    drawn = [t.split()[0] for t in texts(islice(ds, 2000), tokenizer)]
    assert 0.72 < drawn.count("a") / len(drawn) < 0.78
    assert dict(ds.state_dict()["workers"]["0"]["consumed"]) == {"a": drawn.count("a"), "b": drawn.count("b")}


def test_exhausted_sources_drop_out_and_every_sample_comes_once(tmp_path, tokenizer, config):
    a = write_texts(tmp_path, "a", 30, 7)
    b = write_texts(tmp_path, "b", 5, 7)
    got = texts(dataset([Source("a", "text", a), Source("b", "text", b, weight=5)], tokenizer, config), tokenizer)
    assert sorted(got) == sorted([f"a {i}" for i in range(30)] + [f"b {i}" for i in range(5)])


def test_order_is_deterministic_per_seed(tmp_path, tokenizer, config):
    sources = [Source("a", "text", write_texts(tmp_path, "a", 40, 10)),
               Source("b", "text", write_texts(tmp_path, "b", 40, 10))]
    first = texts(dataset(sources, tokenizer, config, seed=1), tokenizer)
    again = texts(dataset(sources, tokenizer, config, seed=1), tokenizer)
    other = texts(dataset(sources, tokenizer, config, seed=2), tokenizer)
    assert first == again and first != other and sorted(first) == sorted(other)


def test_resume_in_process_continues_exactly(tmp_path, tokenizer, config):
    sources = [Source("a", "text", write_texts(tmp_path, "a", 25, 5), 2.0),
               Source("b", "text", write_texts(tmp_path, "b", 15, 5))]
    reference = texts(islice(dataset(sources, tokenizer, config, repeat=True), 90), tokenizer)
    ds = dataset(sources, tokenizer, config, repeat=True)
    it = iter(ds)
    head = texts(islice(it, 57), tokenizer)  # crosses epoch boundaries of both sources
    state = json.loads(json.dumps(ds.state_dict()))  # a checkpoint stores it as json
    resumed = dataset(sources, tokenizer, config, repeat=True)
    resumed.load_state_dict(state)
    tail = texts(islice(resumed, 33), tokenizer)
    assert head + tail == reference
    assert resumed.stats["samples"] == 57 + 33


def test_resume_with_dataloader_workers(tmp_path, tokenizer, config):
    sources = [Source("a", "text", write_texts(tmp_path, "a", 40, 5))]

    def run(state, batches):
        loader = make_dataloader(dataset(sources, tokenizer, config, repeat=True), 3, tokenizer.pad_token_id,
                                 num_workers=2, state=state)
        out = []
        for batch in islice(loader, batches):
            out.append(batch["input_ids"].tolist())
        return out, loader.state_dict()

    reference, _ = run(None, 10)
    head, state = run(None, 4)
    tail, _ = run(json.loads(json.dumps(state)), 6)
    assert head + tail == reference
    with pytest.raises(ValueError, match="dataloader workers"):
        make_dataloader(dataset(sources, tokenizer, config), 3, 0, num_workers=1, state=state)


def rows_of(batch):
    """Each row's real tokens and labels (right padding removed)."""
    return [(ids[mask.bool()].tolist(), labels[mask.bool()].tolist())
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]


def test_packed_rows_hold_consecutive_samples_whole_up_to_the_length(tmp_path, tokenizer, config):
    sources = [Source("a", "text", write_texts(tmp_path, "a", 30, 5))]
    one_by_one = [row for batch in make_dataloader(dataset(sources, tokenizer, config), 1, tokenizer.pad_token_id)
                  for row in rows_of(batch)]
    lengths = [len(ids) for ids, _ in one_by_one]
    pack_length = 3 * max(lengths)
    packed = [row for batch in make_dataloader(dataset(sources, tokenizer, config), 2, tokenizer.pad_token_id,
                                               pack_length=pack_length) for row in rows_of(batch)]
    assert all(len(ids) <= pack_length for ids, _ in packed) and len(packed) < len(one_by_one) / 2
    start = 0
    for ids, labels in packed:  # each row: the next samples in order, ids and labels, as many as fit
        n = next(k for k in range(len(one_by_one) - start + 1)
                 if sum(lengths[start:start + k]) == len(ids))
        assert ids == [t for row_ids, _ in one_by_one[start:start + n] for t in row_ids]
        assert labels == [t for _, row_labels in one_by_one[start:start + n] for t in row_labels]
        if start + n < len(one_by_one):
            assert len(ids) + lengths[start + n] > pack_length  # the next one did not fit
        start += n
    assert start == len(one_by_one)  # every sample once


def test_a_packed_loader_resumes_exactly(tmp_path, tokenizer, config):
    sources = [Source("a", "text", write_texts(tmp_path, "a", 40, 5))]

    def run(state, batches):
        loader = make_dataloader(dataset(sources, tokenizer, config, repeat=True), 2, tokenizer.pad_token_id,
                                 num_workers=2, state=state, pack_length=24)
        return [batch["input_ids"].tolist() for batch in islice(loader, batches)], loader.state_dict()

    reference, _ = run(None, 9)
    head, state = run(None, 4)
    tail, _ = run(json.loads(json.dumps(state)), 5)
    assert head + tail == reference  # the sample that did not fit the last row is read again, not lost


def test_rank_and_worker_split_is_disjoint_and_complete(tmp_path, tokenizer, config):
    many = Source("many", "text", write_texts(tmp_path, "many", 60, 5))  # 12 shards: split by shard
    few = Source("few", "text", write_texts(tmp_path, "few", 9, 5))  # 2 shards < 4 readers: split by sample
    everything = sorted([f"many {i}" for i in range(60)] + [f"few {i}" for i in range(9)])
    parts = [texts(dataset([many, few], tokenizer, config, rank=r, world_size=4), tokenizer) for r in range(4)]
    assert sorted(chain.from_iterable(parts)) == everything and all(parts)
    got = []
    for rank in range(2):  # 2 ranks x 2 dataloader workers
        loader = make_dataloader(dataset([many, few], tokenizer, config, rank=rank, world_size=2), 4,
                                 tokenizer.pad_token_id, num_workers=2)
        for batch in loader:
            got += [tokenizer.decode(row[mask.bool()][1:-1]).strip()
                    for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert sorted(got) == everything


def test_dataloader_batches_follow_the_training_contract(tmp_path, tokenizer, config):
    with wds.ShardWriter(str(tmp_path / "pair-%06d.tar"), maxcount=5, verbose=0, mtime=0) as w:
        for i in range(12):
            w.write(encode_record(K.ImageTextPair(make_image(i), f"caption {i}"), f"p{i}"))
    loader = make_dataloader(dataset([Source("p", "pair", str(tmp_path / "pair-*.tar"))], tokenizer, config), 5,
                             tokenizer.pad_token_id)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 2]
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels", "images", "image_is_target", "frames",
                      "frame_is_target"}
    assert b["images"].shape == (5, 3, config.image_size, config.image_size)
    assert b["frames"].shape == (0, 3, config.image_size, config.image_size)
    assert b["labels"][b["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    assert loader.stats["samples"] == 12 and loader.last_kinds == ["pair", "pair"]


def test_augmentation_crops_only_kinds_without_geometry(tmp_path, tokenizer, config):
    gradient = make_image().resize((32, 32))
    gradient.putdata([(x * 8, y * 8, 0) for y in range(32) for x in range(32)])
    records = {"pair": K.ImageTextPair(gradient, "c"),
               "grounded": K.GroundedPair(gradient, "a dog", [K.GroundedObject(2, 5, [(0, 0, 1, 1)])])}
    for kind, record in records.items():
        with wds.TarWriter(str(tmp_path / f"{kind}.tar"), mtime=0) as w:
            w.write(encode_record(record, "k0"))
        source = [Source(kind, kind, str(tmp_path / f"{kind}.tar"))]
        plain = next(iter(dataset(source, tokenizer, config)))
        cropped = next(iter(dataset(source, tokenizer, config, augmentation=Augmentation(crop_scale=(0.3, 0.3)))))
        assert torch.equal(plain.images[0], cropped.images[0]) == (kind == "grounded")


def test_shard_lists_accept_globs_and_brace_lists(tmp_path):
    write_texts(tmp_path, "t", 30, 10)
    assert expand_urls(str(tmp_path / "t-*.tar")) == expand_urls(str(tmp_path / "t-{000000..000002}.tar"))
    assert len(expand_urls([str(tmp_path / "t-000000.tar"), str(tmp_path / "t-00000[12].tar")])) == 3
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_sources_from_a_manifest_with_kind_weights(shapes_dir):
    sources = sources_from_manifest(shapes_dir, "train", weights={"pair": 4.0, "interleaved": 1.0})
    assert [(s.kind, s.weight) for s in sources] == [("interleaved", 1.0), ("pair", 4.0)]
    assert all(expand_urls(s.urls) for s in sources)
    with pytest.raises(KeyError, match="no kinds"):
        sources_from_manifest(shapes_dir, "heldout_formats", weights={"pair": 1.0})


def test_unknown_kind_is_a_clear_error(tokenizer, config):
    with pytest.raises(ValueError, match="unknown kind"):
        ShardDataset([Source("x", "podcast", "x.tar")], tokenizer, replace(config))
