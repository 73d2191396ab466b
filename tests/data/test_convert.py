"""Converters from LAION/CapsFusion, MMC4, GRIT, LLaVA and InstructPix2Pix formats to our shard layouts."""

import argparse
import csv
import json
import random
from collections import Counter

import pytest

from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.cli import CONVERT_FORMATS, add_parser
from emu2.data.convert import (
    CONVERTERS,
    convert_grit,
    convert_instructpix2pix,
    convert_llava,
    convert_mmc4,
    convert_pairs,
)
from emu2.data.records import decode_record, read_shard

from .conftest import make_image


def records(result, kind):
    stats = Counter()
    out = [decode_record(kind, raw) for shard in result["shards"] for raw in read_shard(shard, stats)]
    assert not stats
    return out


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        make_image(k, size=12).save(folder / f"{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_pairs_from_jsonl_and_csv_skip_remote_missing_and_broken_images(tmp_path, images):
    rows = [{"url": "images/0.jpg", "caption": "first"}, {"url": "https://example.com/x.jpg", "caption": "web"},
            {"url": "images/missing.jpg", "caption": "gone"}, {"url": "images/broken.jpg", "caption": "bad"},
            {"url": f"file://{images / '1.jpg'}", "caption": "second"}, {"url": "images/2.jpg", "caption": ""}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    result = convert_pairs(tmp_path / "pairs.jsonl", tmp_path / "out", shard_size=1)
    assert result["written"] == 2 and len(result["shards"]) == 2
    assert result["skipped"] == {"remote_image": 1, "missing_image": 1, "bad_image": 1, "no_caption": 1,
                                 "bad_json": 1}
    got = records(result, "pair")
    assert [r.text for r in got] == ["first", "second"]
    assert got[0].image.size == (12, 12)
    assert got[0].image.getpixel((5, 5)) == pytest.approx(make_image(0).getpixel((5, 5)), abs=8)  # JPEG kept as is

    with open(tmp_path / "laion.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["URL", "TEXT"])
        writer.writeheader()
        writer.writerow({"URL": "0.jpg", "TEXT": "from csv"})
    result = convert_pairs(tmp_path / "laion.csv", tmp_path / "t2i", image_root=images, kind="text_to_image")
    assert [type(r).__name__ for r in records(result, "text_to_image")] == ["TextToImage"]


def test_pairs_from_parquet(tmp_path, images):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: parquet input is optional")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_url": ["0.jpg"], "capsfusion": ["a fused caption"]}), tmp_path / "c.parquet")
    result = convert_pairs(tmp_path / "c.parquet", tmp_path / "out", image_root=images)
    assert [r.text for r in records(result, "pair")] == ["a fused caption"]


def test_mmc4_documents_keep_matched_sentences(tmp_path, images):
    docs = [
        {"text_list": ["Intro.", "A dog.", "A cat."], "image_info": [
            {"image_name": "0.jpg", "matched_text_index": 1}, {"image_name": "missing.jpg", "matched_text_index": 0},
            {"image_name": "1.jpg", "matched_text_index": 2}]},
        {"text_list": ["No pictures here."], "image_info": [{"image_name": "gone.jpg", "matched_text_index": 0}]},
    ]
    (tmp_path / "mmc4.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    result = convert_mmc4(tmp_path / "mmc4.jsonl", tmp_path / "out", image_root=images)
    assert result["written"] == 1 and result["skipped"] == {"missing_image": 2, "no_images": 1}
    [doc] = records(result, "interleaved")
    assert doc.texts == ["Intro.", "A dog.", "A cat."] and doc.image_text_index == [1, 2] and len(doc.images) == 2


def test_grit_noun_chunks_become_grounded_objects(tmp_path, images):
    rows = [
        {"key": "0", "caption": "a dog and a cat", "noun_chunks": [[0, 5, 0.1, 0.2, 0.3, 0.4, 0.9],
                                                                     [10, 15, 0.5, 0.5, 0.9, 0.9, 0.8],
                                                                     [10, 15, 0.0, 0.0, 0.2, 0.2, 0.7]]},
        {"image": "1.jpg", "caption": "a box", "width": 100, "height": 50, "noun_chunks": [[0, 5, 10, 5, 50, 25, 1]]},
        {"key": "2", "caption": "bad", "noun_chunks": [[0, 99, 0, 0, 1, 1, 1]]},
    ]
    (tmp_path / "grit.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = convert_grit(tmp_path / "grit.jsonl", tmp_path / "out", image_root=images)
    assert result["written"] == 2 and result["skipped"] == {"bad_box": 1}
    first, second = records(result, "grounded")
    assert [(o.start, o.end, len(o.boxes)) for o in first.objects] == [(0, 5, 1), (10, 15, 2)]
    assert second.objects[0].boxes == [(0.1, 0.1, 0.5, 0.5)]
    gen = convert_grit(tmp_path / "grit.jsonl", tmp_path / "gen", image_root=images, kind="grounded_generation")
    assert all(isinstance(r, K.GroundedGeneration) for r in records(gen, "grounded_generation"))


def test_llava_conversations_become_chat_samples(tmp_path, images, chat_tokenizer, config):
    items = [
        {"image": "0.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A square."},
                                             {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."},
                                             {"from": "human", "value": "dangling question"}]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"image": "1.jpg", "conversations": [{"from": "human", "value": "No marker?"}, {"from": "gpt", "value": "Ok."}]},
        {"image": "0.jpg", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        {"video": "v.mp4", "conversations": []},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    result = convert_llava(tmp_path / "llava.json", tmp_path / "out", image_root=images)
    assert result["written"] == 3 and result["skipped"] == {"image_count_mismatch": 1, "video": 1}
    first, text_only, unmarked = records(result, "chat")
    assert first.messages == [f"{P.IMAGE_PLACEHOLDER}What is it?", "A square.", "Colour?", "Red."]
    assert len(first.images) == 1 and text_only.images == []
    assert unmarked.messages[0] == f"{P.IMAGE_PLACEHOLDER}No marker?"
    sample = K.build_sample(first, chat_tokenizer, config, random.Random(0))
    assert chat_tokenizer.decode(sample.input_ids[sample.labels != -100]).replace(" ", "") == "Asquare.</s>Red.</s>"


def test_instructpix2pix_folders_and_jsonl(tmp_path, images):
    folder = tmp_path / "ip2p" / "0000001"
    folder.mkdir(parents=True)
    (folder / "prompt.json").write_text(json.dumps({"input": "a cat", "edit": "make it a dog", "output": "a dog"}))
    for seed in ("11", "12"):
        make_image(1).save(folder / f"{seed}_0.jpg")
        make_image(2).save(folder / f"{seed}_1.jpg")
    result = convert_instructpix2pix(tmp_path / "ip2p", tmp_path / "out")
    edits = records(result, "edit")
    assert [e.instruction for e in edits] == ["make it a dog"] * 2
    rows = [{"input_image": "0.jpg", "edit_prompt": "add snow", "edited_image": "1.jpg"},
            {"input_image": "0.jpg", "edit_prompt": "", "edited_image": "1.jpg"}]
    (tmp_path / "ip2p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = convert_instructpix2pix(tmp_path / "ip2p.jsonl", tmp_path / "out2", image_root=images)
    assert [e.instruction for e in records(result, "edit")] == ["add snow"]
    assert result["skipped"] == {"no_instruction": 1}


def test_convert_subcommand(tmp_path, images):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.jpg", "text": "cli"}))
    parser = argparse.ArgumentParser(prog="emu2")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["data", "convert", "pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "o"),
                              "--image-root", str(images)])
    assert args.func(args)["written"] == 1
    assert set(CONVERT_FORMATS) == set(CONVERTERS)
