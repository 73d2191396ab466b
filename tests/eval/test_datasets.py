"""Each reader on a few records written in that dataset's published format."""

import json

import pytest
from PIL import Image

from emu2.eval.datasets import (
    EvalRecord,
    load_coco_captions,
    load_dreambench,
    load_frames,
    load_gqa,
    load_hateful_memes,
    load_images,
    load_mmmu,
    load_msrvtt_qa,
    load_msvd_qa,
    load_okvqa,
    load_refcoco,
    load_seed_bench,
    load_textvqa,
    load_vizwiz,
    load_vqav2,
    uniform_frame_indices,
)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_image(path, color=(255, 0, 0), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ------------------------------------------------------------------------------------------ image QA
def vqa_answers(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def test_vqav2_joins_questions_and_annotations_and_names_coco_images(tmp_path):
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014", "task_type": "Open-Ended",
        "questions": [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}],
    })
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [{
        "question_id": 262148000, "image_id": 262148, "question_type": "none of the above",
        "answer_type": "other", "multiple_choice_answer": "down",
        "answers": vqa_answers(*["down"] * 7, "at table", "skateboard", "table"),
    }]})
    (tmp_path / "val2014").mkdir()
    [record] = load_vqav2(questions, tmp_path / "val2014", annotations)
    assert record.id == "262148000"
    assert record.question == "Where is he looking?"
    assert record.answers == ["down"] * 7 + ["at table", "skateboard", "table"]
    assert record.images == [tmp_path / "val2014" / "COCO_val2014_000000262148.jpg"]
    assert record.meta["answer_type"] == "other"


def test_vqav2_test_dev_uses_test2015_images_and_has_no_answers(tmp_path):
    questions = write_json(tmp_path / "q.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 1, "question": "What?", "question_id": 10}]})
    (tmp_path / "img").mkdir()
    [record] = load_vqav2(questions, tmp_path / "img")
    assert record.images[0].name == "COCO_test2015_000000000001.jpg"
    assert record.answers == []


def test_okvqa_reads_the_vqa_layout(tmp_path):
    questions = write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014", "questions": [{"image_id": 297147, "question": "What sport?",
                                                  "question_id": 2971475}]})
    annotations = write_json(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [{
        "question_id": 2971475, "image_id": 297147, "answers": vqa_answers(*["racing"] * 5, *["motocross"] * 5)}]})
    (tmp_path / "val2014").mkdir()
    [record] = load_okvqa(questions, tmp_path / "val2014", annotations)
    assert record.answers.count("racing") == 5


def test_vizwiz_reads_image_question_and_ten_answers(tmp_path):
    path = write_json(tmp_path / "val.json", [{
        "image": "VizWiz_val_00000000.jpg", "question": "Ok. There is another picture.",
        "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
        "answer_type": "unanswerable", "answerable": 0}])
    (tmp_path / "val").mkdir()
    [record] = load_vizwiz(path, tmp_path / "val")
    assert record.id == "VizWiz_val_00000000"
    assert record.answers == ["unanswerable"] * 10
    assert record.images == [tmp_path / "val" / "VizWiz_val_00000000.jpg"]


def test_textvqa_reads_the_data_list(tmp_path):
    path = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [{
        "question": "what is the brand of phone?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
        "answers": ["nokia"] * 10, "set_name": "val"}]})
    (tmp_path / "train_images").mkdir()
    [record] = load_textvqa(path, tmp_path / "train_images")
    assert record.id == "34602"
    assert record.images == [tmp_path / "train_images" / "003a8ae2ef43b901.jpg"]


def test_gqa_reads_the_dict_keyed_by_question_id(tmp_path):
    path = write_json(tmp_path / "testdev_balanced_questions.json", {"20968379": {
        "imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes",
        "fullAnswer": "Yes, the shorts are dark.", "types": {"structural": "verify"}}})
    (tmp_path / "images").mkdir()
    [record] = load_gqa(path, tmp_path / "images")
    assert (record.id, record.answers) == ("20968379", ["yes"])
    assert record.images == [tmp_path / "images" / "n288870.jpg"]


def test_hateful_memes_reads_jsonl_relative_to_its_folder(tmp_path):
    path = write_jsonl(tmp_path / "test_seen.jsonl", [
        {"id": 16395, "img": "img/16395.png", "label": 1, "text": "handjobs sold seperately"},
        {"id": 37405, "img": "img/37405.png", "label": 0, "text": "introducing fidget spinner for women"},
    ])
    hateful, benign = load_hateful_memes(path)
    assert hateful.images == [tmp_path / "img" / "16395.png"]
    assert (hateful.label, hateful.answers, hateful.text) == (1, ["yes"], "handjobs sold seperately")
    assert (benign.label, benign.answers) == (0, ["no"])


# ------------------------------------------------------------------------------------------ video QA
def test_msrvtt_qa_maps_video_ids_to_video_files(tmp_path):
    path = write_json(tmp_path / "test_qa.json", [
        {"answer": "dance", "category_id": 3, "id": 158581, "question": "what are people doing?", "video_id": 7010}])
    (tmp_path / "videos").mkdir()
    [record] = load_msrvtt_qa(path, tmp_path / "videos")
    assert (record.id, record.answers) == ("158581", ["dance"])
    assert record.video == tmp_path / "videos" / "video7010"


def test_msvd_qa_maps_video_ids_through_youtube_mapping(tmp_path):
    path = write_json(tmp_path / "test_qa.json", [{"answer": "cut", "id": 0, "question": "what is done?",
                                                  "video_id": 1}])
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
    (tmp_path / "YouTubeClips").mkdir()
    [record] = load_msvd_qa(path, tmp_path / "YouTubeClips", mapping)
    assert record.video == tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15"


def test_video_qa_accepts_preprocessed_video_names(tmp_path):
    path = write_json(tmp_path / "qa.json", [{"video": "video7010.mp4", "question": "who?", "answer": "man"}])
    (tmp_path / "v").mkdir()
    [record] = load_msrvtt_qa(path, tmp_path / "v")
    assert (record.id, record.video.name) == ("0", "video7010.mp4")


def test_frames_are_sampled_uniformly_from_a_frame_folder(tmp_path):
    # 10 frames, 4 wanted: middles of 4 equal segments: int((i + 0.5) * 10 / 4) = 1, 3, 6, 8
    assert uniform_frame_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_frame_indices(3, 16) == [0, 1, 2]
    for i in range(10):
        write_image(tmp_path / "video7010" / f"{i:05d}.jpg", color=(i * 20, 0, 0))
    record = EvalRecord(id="0", video=tmp_path / "video7010")  # a frame folder named like the video
    frames = load_frames(record, num_frames=4)
    assert [f.getpixel((0, 0))[0] // 20 for f in frames] == [1, 3, 6, 8]


# ----------------------------------------------------------------------------------- multiple choice
def test_seed_bench_reads_choices_answer_letter_and_data_type(tmp_path):
    path = write_json(tmp_path / "SEED-Bench.json", {"question_type": {"Instance Counting": 5}, "questions": [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
         "data_id": "1454426_2591111986", "data_type": "image", "question": "How many towels are in the image?",
         "question_id": "101669", "question_type_id": 5},
        {"answer": "C", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "data_id": "12345.webm", "data_type": "video", "question": "What happens?", "question_id": "9",
         "question_type_id": 10},
    ]})
    write_image(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
    image_only = load_seed_bench(path, tmp_path / "SEED-Bench-image", data_types=("image",))
    assert [r.id for r in image_only] == ["101669"]
    record = image_only[0]
    assert (record.options, record.answers) == (["One", "Two", "Three", "Four"], ["A"])
    assert len(load_images(record)) == 1  # the ".jpg" missing from data_id is found
    both = load_seed_bench(path, tmp_path / "SEED-Bench-image", video_dir=tmp_path / "videos")
    assert both[1].video == tmp_path / "videos" / "12345.webm" and both[1].images == []


def test_mmmu_reads_options_list_string_and_image_fields(tmp_path):
    path = write_jsonl(tmp_path / "mmmu_validation.jsonl", [
        {"id": "validation_Art_1", "question": "<image 1> Which style?", "options": "['Baroque', 'Rococo']",
         "answer": "B", "image_1": "images/validation_Art_1_1.png", "image_2": None,
         "question_type": "multiple-choice"},
        {"id": "validation_Math_3", "question": "<image 1> <image 2> x = ?", "options": "[]", "answer": "12",
         "image_1": "images/m1.png", "image_2": "images/m2.png", "question_type": "open"},
    ])
    choice, open_question = load_mmmu(path)
    assert choice.options == ["Baroque", "Rococo"] and choice.answers == ["B"]
    assert choice.images == [tmp_path / "images" / "validation_Art_1_1.png"]
    assert open_question.options == [] and len(open_question.images) == 2


# ------------------------------------------------------------------------------------------ grounding
def test_refcoco_converts_xywh_to_corner_box(tmp_path):
    path = write_jsonl(tmp_path / "refcoco_val.jsonl", [
        {"image": "COCO_train2014_000000581857.jpg", "sentence": "the lady with the blue shirt",
         "bbox": [103.93, 299.99, 134.22, 177.42], "width": 640, "height": 427}])
    (tmp_path / "train2014").mkdir()
    [record] = load_refcoco(path, tmp_path / "train2014")
    assert record.question == "the lady with the blue shirt"
    assert record.box == pytest.approx((103.93, 299.99, 238.15, 477.41))
    assert record.meta == {"width": 640, "height": 427}


# ----------------------------------------------------------------------------------------- generation
def coco_captions(num_images, captions_per_image=5):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(num_images)]
    annotations = [{"id": 1000 * i + j, "image_id": i, "caption": f"image {i} caption {j}"}
                   for i in range(num_images) for j in range(captions_per_image)]
    return {"images": images, "annotations": annotations}


def test_coco_captions_sample_is_seeded_and_one_per_image(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", coco_captions(20))
    (tmp_path / "val2014").mkdir()
    first = load_coco_captions(path, tmp_path / "val2014", num_samples=8, seed=3)
    again = load_coco_captions(path, tmp_path / "val2014", num_samples=8, seed=3)
    other = load_coco_captions(path, tmp_path / "val2014", num_samples=8, seed=4)
    assert [r.id for r in first] == [r.id for r in again] != [r.id for r in other]
    assert len({r.meta["image_id"] for r in first}) == 8
    record = first[0]
    assert record.text.startswith(f"image {record.meta['image_id']} caption")
    assert record.images[0].name == f"COCO_val2014_{record.meta['image_id']:012d}.jpg"
    with pytest.raises(ValueError, match="only 20"):
        load_coco_captions(path, tmp_path / "val2014", num_samples=30_000)


DREAMBOOTH_PROMPTS = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


def test_dreambench_reads_subject_folders_and_dreambooth_prompts(tmp_path):
    for subject in ("backpack", "dog"):
        for i in range(2):
            write_image(tmp_path / "dataset" / subject / f"{i:02d}.jpg")
    (tmp_path / "dataset" / "prompts_and_classes.txt").write_text(DREAMBOOTH_PROMPTS)
    records = load_dreambench(tmp_path / "dataset", chosen_images={"dog": "01.jpg"})
    by_id = {r.id: r for r in records}
    assert len(records) == 2 + 3  # object prompts for the backpack, live-subject prompts for the dog
    assert by_id["backpack-01"].text == "a red backpack"
    assert by_id["dog-01"].text == "a dog wearing a red hat"
    assert by_id["dog-01"].meta["template"] == "a {0} {1} wearing a red hat"
    assert [p.name for p in by_id["dog-00"].images] == ["01.jpg"]
    assert len(by_id["backpack-00"].images) == 2


# ------------------------------------------------------------------------------------ errors for people
def test_missing_annotation_file_names_the_path_expected(tmp_path):
    missing = tmp_path / "nowhere" / "TextVQA_0.5.1_val.json"
    with pytest.raises(FileNotFoundError, match="TextVQA annotations file not found.*TextVQA_0.5.1_val.json"):
        load_textvqa(missing, tmp_path)


def test_missing_image_folder_names_the_folder(tmp_path):
    path = write_json(tmp_path / "val.json", [])
    with pytest.raises(FileNotFoundError, match="VizWiz image folder not found.*no_such_dir"):
        load_vizwiz(path, tmp_path / "no_such_dir")


def test_missing_image_names_the_file_when_loaded(tmp_path):
    record = EvalRecord(id="1", images=[tmp_path / "COCO_val2014_000000000001.jpg"])
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000001.jpg"):
        load_images(record)


def test_loaded_images_are_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (4, 4), 128).save(path)
    [image] = load_images(EvalRecord(id="1", images=[path]))
    assert image.mode == "RGB" and image.size == (4, 4)
