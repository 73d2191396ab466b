"""The procedural shapes world: determinism, every kind, true boxes, held-out splits and few-shot episodes."""

import argparse
import json
import random
import tarfile
from pathlib import Path

import pytest

from emu2 import processing as P
from emu2.data.kinds import KINDS
from emu2.data.mixing import sources_from_manifest
from emu2.data.shapes import ShapesMaker, World, fewshot_prompt, write_shapes
from emu2.data.shapes.cli import add_parser, main
from emu2.data.shapes.tasks import (
    BOX_STEPS,
    HELDOUT_LABEL_WORDS,
    README_FORMAT,
    AttributeFormat,
    is_heldout_format,
    written_box,
)
from emu2.data.shapes.world import COLOURS, Group, Scene
from emu2.data.shards import ShardDataset


def small_world(out, seed=0, processes=1):
    return write_shapes(out, seed=seed, num_train=6, num_val=3, num_heldout=3, num_episodes=1, image_size=16,
                        shard_size=4, processes=processes)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def json_members(root: Path, split: str, kind: str | None = None):
    for shard in sorted((root / split).glob(f"{kind or '*'}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    yield member.name.split("-")[0], json.loads(tar.extractfile(member).read())


def test_same_seed_gives_byte_identical_shards(tmp_path):
    small_world(tmp_path / "a", seed=3)
    small_world(tmp_path / "b", seed=3, processes=2)
    small_world(tmp_path / "c", seed=4)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c
    with tarfile.open(tmp_path / "a" / "train" / "pair-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "emu2", "emu2")


def test_every_kind_is_present_and_builds(shapes_dir, tokenizer, config):
    manifest = json.loads((shapes_dir / "dataset.json").read_text())
    assert set(manifest["splits"]["train"]) == set(KINDS)
    sources = sources_from_manifest(shapes_dir, "train")
    dataset = ShardDataset(sources, tokenizer, config, shuffle_buffer=1, repeat=False)
    kinds = [s.kind for s in dataset]
    assert {k: kinds.count(k) for k in KINDS} == {k: 30 for k in KINDS}
    assert not [k for k in dataset.stats if k.startswith("skipped") or k == "read_errors"]


def test_grounded_boxes_are_the_object_boxes_written_on_a_sixteenth_grid():
    maker = ShapesMaker(World.from_seed(0), image_size=64)
    for seed in range(10):
        record, _ = maker.make("grounded", random.Random(seed), "train")
        for obj in record.objects:
            phrase = record.caption[obj.start:obj.end]
            colour = next(c for c in COLOURS if f" {c} " in f" {phrase} ")
            for box in obj.boxes:
                assert all(v * BOX_STEPS == round(v * BOX_STEPS) for v in box), box
                # rounding moves the centre at most 1/32 of the image (2 px): the object is within 2 px of it
                cx, cy = int((box[0] + box[2]) / 2 * 64), int((box[1] + box[3]) / 2 * 64)
                near = [record.image.getpixel((min(63, max(0, cx + dx)), min(63, max(0, cy + dy))))
                        for dx in range(-2, 3) for dy in range(-2, 3)]
                assert min(max(abs(a - b) for a, b in zip(p, COLOURS[colour])) for p in near) < 40, (phrase, box)


def test_a_written_box_is_the_true_box_rounded_to_the_nearest_sixteenth():
    assert written_box((0.04, 0.5, 0.2813, 0.97)) == (0.0625, 0.5, 0.3125, 1.0)


def test_videos_show_the_event_their_caption_names():
    maker = ShapesMaker(World.from_seed(0), image_size=32)
    record, meta = maker.make("video_pair", random.Random(1), "train")
    assert len(record.frames) == 8 and record.frames[0].tobytes() != record.frames[-1].tobytes()
    assert {"move": "move", "recolour": "turn", "resize": "from"}[meta["event"]] in record.text


def test_readme_format_is_the_official_example():
    group = Group("square", "red", "small", 3, (1, 0), ((0.0, 0.5, 0.1, 0.6),) * 3)
    assert README_FORMAT.render(Scene("white", 2, (group,))) == "[red, white, 3, bottom left]"
    assert not is_heldout_format(README_FORMAT, seed=0)


def test_fewshot_documents_put_each_image_before_its_answer(shapes_dir):
    docs = [meta for kind, meta in json_members(shapes_dir, "train", "interleaved") if meta["meta"]["task"] != "captions"]
    assert {d["meta"]["task"] for d in docs} >= {"attributes", "labels"}
    for doc in docs:
        assert doc["image_position"] == "before" and doc["image_text_index"] == list(range(len(doc["texts"])))
        assert 4 <= len(doc["texts"]) <= 8 and all(t.endswith(".") for t in doc["texts"])
        if doc["meta"]["task"] == "labels":  # every answer is one of the document's own label words
            assert all(any(w in t.split(" ")[-1] for w in doc["meta"]["label_words"]) for t in doc["texts"])


def test_heldout_splits_share_no_format_or_combination_with_training(shapes_dir):
    world = World.from_seed(0)
    train = [meta["meta"] for split in ("train", "val") for _, meta in json_members(shapes_dir, split)]
    train_combos = {tuple(c) for m in train for c in m.get("combos", [])}
    train_formats = {m["format"] for m in train if "format" in m}
    train_words = {w for m in train for w in m.get("label_words", [])}
    assert train_combos and train_formats and train_words
    assert not train_combos & world.heldout_combos
    assert all(not is_heldout_format_id(f) for f in train_formats)
    assert not train_words & set(HELDOUT_LABEL_WORDS)
    pairs = {(m["format"], tuple(c)) for m in train if "format" in m for c in m["combos"]}
    for split in ("heldout_combos", "heldout_formats", "heldout_labels"):
        metas = [meta["meta"] for _, meta in json_members(shapes_dir, split)]
        assert metas
        for m in metas:
            assert not {(m.get("format"), tuple(c)) for c in m["combos"]} & pairs
            if split == "heldout_combos":
                assert {tuple(c) for c in m["combos"]} <= world.heldout_combos
            if split == "heldout_formats":
                assert m["format"] not in train_formats and is_heldout_format_id(m["format"])
            if split == "heldout_labels":
                assert m["label_words"] and set(m["label_words"]) <= set(HELDOUT_LABEL_WORDS)
                assert not set(m["label_words"]) & train_words
    train_text = " ".join(json.dumps(meta) for split in ("train", "val") for _, meta in json_members(shapes_dir, split))
    for word in {w for _, meta in json_members(shapes_dir, "heldout_labels") for w in meta["meta"]["label_words"]}:
        assert f" {word}" not in train_text and f'"{word}' not in train_text


def is_heldout_format_id(format_id: str) -> bool:
    """Held-out formats are attribute formats the seed-0 world marks as held out."""
    if not format_id.startswith("attributes:"):
        return False
    fmt = AttributeFormat.from_id(format_id)
    assert fmt.id == format_id
    return is_heldout_format(fmt, seed=0)


def test_eval_episodes_give_0_1_2_4_8_shot_prompts(shapes_dir):
    episodes = json.loads((shapes_dir / "eval" / "episodes.json").read_text())
    assert episodes["shots"] == [0, 1, 2, 4, 8]
    assert {e["split"] for e in episodes["episodes"]} == {"heldout_combos", "heldout_formats", "heldout_labels"}
    for episode in episodes["episodes"]:
        assert len(episode["support"]) == 8 and episode["queries"]
        for shots in episodes["shots"]:
            text, images, answer = fewshot_prompt(episode, shots, query=0)
            assert text.count(P.IMAGE_PLACEHOLDER) == len(images) == shots + 1
            assert answer == episode["queries"][0]["answer"]
            assert all((shapes_dir / "eval" / image).is_file() for image in images)
        if episode["split"] == "heldout_labels":
            assert episode["queries"][0]["answer"].split()[-1] in episode["label_words"]


def test_cli_runs_standalone_and_as_a_subcommand(tmp_path, capsys):
    main(["--out", str(tmp_path / "w"), "--seed", "1", "--num-train", "2", "--num-episodes", "1", "--image-size", "16"])
    assert json.loads(capsys.readouterr().out)["samples"]["train"] == 2 * len(KINDS)
    assert (tmp_path / "w" / "dataset.json").is_file()
    parser = argparse.ArgumentParser(prog="emu2")
    data = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    add_parser(data)
    args = parser.parse_args(["data", "shapes", "--out", "x", "--seed", "5", "--image-size", "32"])
    assert (args.seed, args.image_size, args.num_train) == (5, 32, 1000) and callable(args.func)


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown split"):
        ShapesMaker(World.from_seed(0)).make("pair", random.Random(0), "test")


# ------------------------------------------------------------------------ language-only in-context documents
def test_training_label_words_are_mostly_fresh_nonce_words_never_held_out():
    from emu2.data.shapes.tasks import LABEL_WORDS, nonce_word, training_label_words

    rng = random.Random(0)
    drawn = [w for _ in range(400) for w in training_label_words(rng, 3)]
    fresh = [w for w in drawn if w not in LABEL_WORDS]
    assert 0.6 < len(fresh) / len(drawn) < 0.9  # NONCE_WORD_PROB of the documents
    assert len(set(fresh)) > 0.5 * len(fresh)  # mostly new every time: only copying from context predicts them
    words = [nonce_word(rng) for _ in range(2000)]
    assert not any(h in w for w in words for h in HELDOUT_LABEL_WORDS)


def test_recall_documents_ask_only_words_bound_earlier_with_the_same_value():
    from emu2.data.shapes.tasks import ShapesMaker

    maker = ShapesMaker(World.from_seed(0))
    for seed in range(30):
        record, meta = maker.recall_document(random.Random(seed))
        sentences = [s.rstrip(".") for s in f"{record.context} {record.text}".split(". ")]
        n = len(meta["label_words"])
        bound = {}
        for sentence in sentences[:n]:
            words = sentence.removeprefix("the ").split()
            bound[words[0].rstrip(":")] = sentence
        assert sorted(bound) == meta["label_words"]
        for sentence in sentences[n:]:
            assert sentence in bound.values()  # a query repeats its word's binding exactly


def test_lookup_documents_name_one_told_object_per_question_and_answer_with_its_own_attribute():
    """The scene is told in the unscored context; each question names one object by what no other object has
    (its shape, colour or cell), and the answer is that object's value (colour, cell, size, shape or all of it)."""
    import re

    from emu2.data.shapes.world import COLOURS, SHAPES

    maker = ShapesMaker(World.from_seed(0))
    asked = 0
    for seed in range(40):
        record, meta = maker.lookup_document(random.Random(seed))
        assert meta["task"] == "lookup"
        told, _background = record.context.rstrip(".").rsplit(" on ", 1)
        objects = []
        for phrase in re.split(r", | and ", told):
            thing, cell = phrase.split(" in the ")
            article, size, colour, shape = thing.split()
            objects.append({"size": size, "colour": colour, "shape": shape, "cell": cell, "all": thing})
        assert 2 <= len(objects) <= 4
        for question, answer in re.findall(r"([^?.]+\?) ([^.?]+)\.", record.text):
            question = question.strip()
            if question.startswith("what is in the "):  # named by its cell, a whole cell name
                named = [o for o in objects if o["cell"] == question.removeprefix("what is in the ").rstrip("?")]
            else:  # named by its shape, its colour or both
                words = set(question.rstrip("?").split()) & (set(COLOURS) | set(SHAPES))
                named = [o for o in objects if words and words <= {o["colour"], o["shape"]}]
            assert len(named) == 1, (question, objects)
            assert answer in (named[0]["colour"], named[0]["cell"], named[0]["size"], named[0]["shape"],
                              named[0]["all"]), (question, answer, named[0])
            asked += 1
    assert asked >= 80  # 2-5 questions a document


def test_lookup_documents_can_leave_their_questions_unscored(monkeypatch):
    import emu2.data.shapes.tasks as tasks

    maker = ShapesMaker(World.from_seed(0))
    scored, _ = maker.lookup_document(random.Random(3))
    assert scored.unscored == ()
    monkeypatch.setattr(tasks, "LOOKUP_SCORES_QUESTIONS", False)
    record, _ = maker.lookup_document(random.Random(3))
    assert record.text == scored.text  # the same document; only what the loss scores changes
    spans = [record.text[start:end] for start, end in record.unscored]
    assert spans and all(s.endswith("?") for s in spans)
    assert "".join(spans).count("?") == record.text.count("?")


def test_lm_long_documents_put_scene_sentences_between_what_they_tell_and_what_repeats_it():
    """The `lm_long` split: the `lm` split's kinds, with up to `LM_LONG_GAP` scene sentences in a repeat or recall
    document's unscored context after what it tells first, and half its made-up words any tokenizer pieces."""
    from emu2.data.shapes.tasks import LM_LONG_GAP

    maker = ShapesMaker(World.from_seed(0))
    gaps, words, kinds = [], {"lm": set(), "lm_long": set()}, set()
    for seed in range(120):
        for split in words:
            record, meta = maker.make("text", random.Random(seed), split)
            words[split] |= set(meta.get("label_words", ()))
            if split == "lm_long" and meta.get("task") == "repeat":
                listed = record.context[: record.context.index(".") + 1]  # the first telling, then the sentences
                between = record.context[len(listed):]
                assert record.text.endswith(listed) and between.count(".") == between.count(" on ")
                gaps.append(between.count(" on "))  # "two small red stars in the top left on white."
            kinds.add(meta.get("task"))
    assert min(gaps) == 0 and 3 <= max(gaps) <= LM_LONG_GAP and {"repeat", "recall"} <= kinds
    from emu2 import processing as P
    from emu2.data.shapes.tasks import LABEL_WORDS
    from emu2.data.shapes.world import SHAPES, SIZES

    tokenizer = P.load_tokenizer(P.SHAPES_TOKENIZER)
    known = {*COLOURS, *SHAPES, *SIZES, *LABEL_WORDS}
    pieces = {split: {p for w in found - known for p in tokenizer.tokenize(w)} for split, found in words.items()}
    assert len(pieces["lm_long"]) > 1.5 * len(pieces["lm"]), {k: len(v) for k, v in pieces.items()}


def test_text_fewshot_documents_describe_each_scene_then_answer_in_one_hidden_format():
    from emu2.data.shapes.tasks import ShapesMaker

    maker = ShapesMaker(World.from_seed(0))
    seen = set()
    for seed in range(60):
        record, meta = maker.text_fewshot_document(random.Random(seed), "train")
        examples = [e for e in record.text.split(". ") if e]
        assert 4 <= len(examples) <= 12 and record.text.endswith(".")
        assert all(" on " in e.split(":")[0] for e in examples)  # "<scene description> on <background>: answer"
        seen.add(meta["task"])
        if meta["task"] == "labels":
            answers = [e.split(": ", 1)[1] for e in examples]
            assert all(any(w in a for w in meta["label_words"]) for a in answers)
        assert not is_heldout_format_id(meta["format"])
    assert seen == {"attributes", "labels", "vqa"}


def test_only_answers_the_document_already_predicts_are_scored(monkeypatch):
    # The first use of a made-up label word and the first example of an attribute format are read, not scored:
    # nothing before them predicts them. Every later answer is scored, and so is every VQA answer.
    import emu2.data.shapes.tasks as tasks

    maker = ShapesMaker(World.from_seed(0), 16)
    assert tasks.UNSCORED_UNPREDICTABLE  # the recipe's setting; off, nothing is unscored
    monkeypatch.setattr(tasks, "UNSCORED_UNPREDICTABLE", False)
    assert all(maker.fewshot_document(random.Random(i), "train")[0].unscored == () for i in range(10))
    monkeypatch.setattr(tasks, "UNSCORED_UNPREDICTABLE", True)
    checked = set()
    for seed in range(80):
        doc, meta = maker.fewshot_document(random.Random(seed), "train")
        if meta["task"] == "labels":
            firsts = [k for k, t in enumerate(doc.texts) if t not in doc.texts[:k]]
            assert doc.unscored == tuple(firsts)
        elif meta["task"] == "attributes":
            assert doc.unscored == (0,)
        else:
            assert doc.unscored == ()
        checked.add(meta["task"])

        # the text version: each example is "<scene description>: <answer>."; the same answers are read only
        record, meta = maker.text_fewshot_document(random.Random(seed), "train")
        unscored = [record.text[start:end] for start, end in record.unscored]
        answers = [e.split(": ", 1)[1].removesuffix(".") + "." for e in record.text.split(". ")]
        if meta["task"] == "labels":
            expected = [a for k, a in enumerate(answers) if a not in answers[:k]]
        else:
            expected = answers[:1] if meta["task"] == "attributes" else []
        assert unscored == expected
    assert checked == {"attributes", "labels", "vqa"}


def test_piece_words_are_made_of_tokenizer_pieces_and_never_held_out(monkeypatch):
    import emu2.data.shapes.tasks as tasks
    from emu2 import processing as P

    tokenizer = P.load_tokenizer(P.SHAPES_TOKENIZER)
    initial, inner = tasks.tokenizer_pieces()
    assert "▁" + initial[0] in tokenizer.get_vocab() and inner[0] in tokenizer.get_vocab()
    rng = random.Random(0)
    words = [tasks.piece_word(rng) for _ in range(3000)]
    assert not any(h in w for w in words for h in HELDOUT_LABEL_WORDS) and not set(words) & set(tasks.LABEL_WORDS)
    assert all(any(w.startswith(p) for p in initial) for w in words)
    # drawn uniformly over the vocabulary, they use far more of its pieces than the syllable words do
    pieces = {p for w in words for p in tokenizer.tokenize(w)}
    syllables = {p for _ in range(3000) for p in tokenizer.tokenize(tasks.nonce_word(rng))}
    assert len(pieces) > 1.5 * len(syllables)
    maker = ShapesMaker(World.from_seed(0), 16)
    plain = [maker.repeat_document(random.Random(i))[1]["label_words"] for i in range(50)]
    monkeypatch.setattr(tasks, "PIECE_WORD_PROB", 0.5)
    mixed = [maker.repeat_document(random.Random(i))[1]["label_words"] for i in range(50)]
    assert plain != mixed
    off = ShapesMaker(World.from_seed(0), 16, piece_words=False)  # the tokenizer's own corpus: syllables only
    assert [off.repeat_document(random.Random(i))[1]["label_words"] for i in range(50)] == plain


def test_kind_counts_change_one_kind_and_reject_unknown_kinds(tmp_path):
    from emu2.data.shapes import write_shapes

    manifest = write_shapes(tmp_path / "w", num_train=2, num_val=0, num_heldout=0, num_episodes=0,
                            image_size=16, kind_counts={"text": 5})
    assert manifest["splits"]["train"]["text"]["count"] == 5
    assert manifest["splits"]["train"]["pair"]["count"] == 2
    with pytest.raises(ValueError, match="unknown kinds"):
        write_shapes(tmp_path / "x", num_train=2, kind_counts={"txt": 5})


def test_repeat_documents_repeat_one_list_of_mostly_made_up_words_exactly():
    from emu2.data.shapes.tasks import REPEAT_INTROS, ShapesMaker
    from emu2.data.shapes.world import COLOURS, SHAPES, SIZES

    maker = ShapesMaker(World.from_seed(0))
    made_up = total = 0
    for seed in range(40):
        record, meta = maker.repeat_document(random.Random(seed))
        parts = [p for p in f"{record.context} {record.text}".split(".") if p.strip()]
        assert record.context.strip() == parts[0].strip() + "."  # the first telling is unscored context
        first = parts[0].strip()
        assert 3 <= len(parts) <= 4 and 3 <= len(first.split()) <= 8
        for part in parts[1:]:  # each repeat is the first list, after an optional "again:"-style lead-in
            assert any(part.strip() == (intro + first).strip() for intro in REPEAT_INTROS), record.text
        assert set(first.split()) == set(meta["label_words"])
        made_up += sum(w not in (*COLOURS, *SHAPES, *SIZES) for w in first.split())
        total += len(first.split())
    assert made_up / total > 0.6  # mostly fresh words: only copying predicts the repeat


def test_the_lm_split_is_a_language_only_corpus_mostly_of_copying_documents(tmp_path):
    from emu2.data.shapes.tasks import LM_CORPUS

    maker = ShapesMaker(World.from_seed(0))
    tasks = [maker.make("text", random.Random(seed), "lm")[1].get("task") for seed in range(300)]
    assert 0.6 < tasks.count("repeat") / len(tasks) < 0.8 and tasks.count("recall") > 0.1 * len(tasks)
    assert set(tasks) <= {"repeat", "recall", "attributes", "labels", "vqa"} and LM_CORPUS["repeat"] == 0.7
    with pytest.raises(ValueError, match="language-only"):
        maker.make("pair", random.Random(0), "lm")
    manifest = write_shapes(tmp_path / "w", num_train=2, num_val=0, num_heldout=0, num_episodes=0,
                            image_size=16, num_lm=7)
    assert manifest["splits"]["lm"] == {"text": {"urls": "lm/text-{000000..000000}.tar", "count": 7}}


def test_exact_repeats_copy_an_earlier_example_of_the_same_document_image_and_answer(monkeypatch):
    import emu2.data.shapes.tasks as tasks

    maker = ShapesMaker(World.from_seed(0), 16)
    plain = [maker.fewshot_document(random.Random(i), "train")[0] for i in range(20)]
    assert all(len({im.tobytes() for im in doc.images}) == len(doc.images) for doc in plain)  # the recipe: none
    monkeypatch.setattr(tasks, "EXACT_REPEAT_PROB", 0.5)
    repeats = 0
    for i in range(20):
        doc, _ = maker.fewshot_document(random.Random(i), "train")
        seen = {}
        for image, text in zip(doc.images, doc.texts):
            key = image.tobytes()
            if key in seen:
                assert seen[key] == text  # the same example: its answer comes with it
                repeats += 1
            seen[key] = text
    assert repeats > 10
