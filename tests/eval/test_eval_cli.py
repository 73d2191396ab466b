"""`emu2 eval` end to end on a tiny random model: files written, resumable predictions, RICES cache."""

import json

import pytest
from PIL import Image

from emu2.cli import main
from emu2.pipelines.emu2 import Emu2Pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    Emu2Pipeline.from_preset("tiny").save_pretrained(path)
    return path


def write_vqa(root, split, n):
    images = root / split
    images.mkdir(parents=True)
    questions, annotations = [], []
    for i in range(n):
        Image.new("RGB", (40, 30), (30 * i % 255, 80, 160)).save(images / f"COCO_{split}_{i:012d}.jpg")
        questions.append({"question_id": i, "image_id": i, "question": f"what colour is thing {i}?"})
        annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": "blue"}] * 10})
    (root / f"q-{split}.json").write_text(json.dumps({"data_subtype": split, "questions": questions}))
    (root / f"a-{split}.json").write_text(json.dumps({"annotations": annotations}))


def test_vqav2_fewshot_with_rices_writes_results_and_resumes(model_dir, tmp_path, capsys):
    write_vqa(tmp_path, "val2014", 3)
    write_vqa(tmp_path, "train2014", 4)
    args = ["eval", "vqav2", "--model", str(model_dir), "--data", str(tmp_path / "q-val2014.json"),
            "--images", str(tmp_path / "val2014"), "--annotations", str(tmp_path / "a-val2014.json"),
            "--support", str(tmp_path / "q-train2014.json"), "--support-images", str(tmp_path / "train2014"),
            "--support-annotations", str(tmp_path / "a-train2014.json"), "--shots", "0,2", "--rices",
            "--num-beams", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "out")]
    main(args)
    out = tmp_path / "out"
    rows = (out / "vqav2-predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6  # 3 questions x 2 shot counts
    results = json.loads((out / "vqav2-results.json").read_text())
    assert set(results["fewshot"]["VQAv2"]) == {"0", "2"}
    assert list(out.glob("rices-*.safetensors"))
    main(args)  # rerun: every row is already there, nothing is appended
    assert len((out / "vqav2-predictions.jsonl").read_text().splitlines()) == 6
    assert "VQAv2" in capsys.readouterr().out


def test_shapes_eval_writes_metrics_table_and_plot(model_dir, tmp_path):
    from emu2.data.shapes import write_shapes

    write_shapes(tmp_path / "data", seed=0, num_train=4, num_val=1, num_heldout=1, num_episodes=1)
    main(["eval", "shapes", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--shots", "0,1",
          "--chat-model", str(model_dir), "--items", "2", "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["fewshot"]["all"]) == {"0", "1"}
    assert 0 <= metrics["fewshot"]["all"]["1"]["exact"] <= 1
    assert {"vqa_exact", "grounding_acc_iou50", "caption_attribute_recall"} <= set(metrics["instructions"])
    assert (tmp_path / "eval" / "accuracy_vs_shots.png").stat().st_size > 1000


def test_shapes_eval_with_a_gen_model_adds_generation_attribute_accuracy(model_dir, tmp_path, capsys):
    from emu2.data.shapes import write_shapes
    from emu2.pipelines.gen import Emu2GenPipeline

    write_shapes(tmp_path / "data", seed=0, num_train=4, num_val=1, num_heldout=1, num_episodes=1)
    gen = Emu2GenPipeline.from_preset("tiny")
    gen.encoder.save_pretrained(tmp_path / "gen")  # the quickstart layout: gen/ (encoder) beside decoder/
    gen.decoder.save_pretrained(tmp_path / "decoder")
    main(["eval", "shapes", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--shots", "0",
          "--gen", str(tmp_path / "gen"), "--decoder", str(tmp_path / "decoder"), "--items", "1",
          "--gen-steps", "1", "--out", str(tmp_path / "eval")])
    generation = json.loads((tmp_path / "eval" / "metrics.json").read_text())["generation"]
    assert set(generation) == {"text_to_image", "autoencode", "truth_renders", "items"}
    assert generation["truth_renders"]["all"] == 1.0
    assert "| text-to-image |" in (tmp_path / "eval" / "table.md").read_text()
    assert "| autoencoded |" in capsys.readouterr().out


def test_answer_nll_is_the_models_own_cross_entropy_on_the_answer_tokens(model_dir):
    import torch

    from emu2 import processing as P
    from emu2.eval.shapes import answer_nll

    pipe = Emu2Pipeline.from_pretrained(model_dir)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    prompts = [f"{P.IMAGE_PLACEHOLDER}red.{P.IMAGE_PLACEHOLDER}", f"{P.IMAGE_PLACEHOLDER}Q: what colour? A:"]
    answers = ["blue", "green leaf"]
    pixels = pipe.encode(prompts, images)["images"]
    got = answer_nll(pipe, prompts, answers, pixels)
    for prompt, answer, image_slice, value in zip(prompts, answers, (images[:2], images[2:]), got):
        full = prompt + (" " if not prompt.endswith(P.IMAGE_PLACEHOLDER) else "") + answer + "."
        batch = pipe.encode([full], image_slice)
        n_prompt = pipe.encode([prompt], image_slice)["input_ids"].shape[1]
        labels = batch["input_ids"].clone()
        labels[:, :n_prompt] = -100  # supervise only the answer and its "."
        with torch.no_grad():
            want = pipe.model(**batch, labels=labels).text_loss
        assert value == pytest.approx(float(want), rel=1e-4)
    assert got[0] != got[1]


# ------------------------------------------------------------------------- protocol: what the model is, or --protocol
@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """Tiny models with the chat vocabulary (as every shapes model has), recorded as base or chat models."""
    from emu2.model.kind import record_model_kind

    dirs = {}
    for kind in ("base", "chat"):
        pipe = Emu2Pipeline.from_preset("tiny-chat")
        record_model_kind(pipe.model.config, kind)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        pipe.save_pretrained(dirs[kind])
    return dirs


def vqa_args(root, model, *extra):
    write_vqa(root, "val2014", 2)
    write_vqa(root, "train2014", 3)
    return ["eval", "vqav2", "--model", str(model), "--data", str(root / "q-val2014.json"),
            "--images", str(root / "val2014"), "--annotations", str(root / "a-val2014.json"),
            "--num-beams", "1", "--max-new-tokens", "2", "--out", str(root / "out"), *extra]


SUPPORT = ("--support", "{root}/q-train2014.json", "--support-images", "{root}/train2014",
           "--support-annotations", "{root}/a-train2014.json")


def support(root):
    return [a.format(root=root) for a in SUPPORT]


def test_a_base_model_with_the_chat_vocabulary_is_evaluated_few_shot(kinds, tmp_path):
    """The paper's base-Emu2 protocol (section 3.1): the recorded kind decides, not the [USER] token."""
    main(vqa_args(tmp_path, kinds["base"], "--shots", "0,2", "--rices", *support(tmp_path)))
    results = json.loads((tmp_path / "out" / "vqav2-results.json").read_text())
    assert results["meta"]["protocol"] == "base" and set(results["fewshot"]["VQAv2"]) == {"0", "2"}


def test_a_chat_model_given_shots_or_rices_is_refused_not_silently_zero_shot(kinds, tmp_path):
    with pytest.raises(SystemExit, match=r"--shots, --rices, --support.* would be ignored"):
        main(vqa_args(tmp_path, kinds["chat"], "--shots", "0,4", "--rices", *support(tmp_path)))


def test_a_chat_model_is_evaluated_zero_shot_through_the_chat_template(kinds, tmp_path):
    main(vqa_args(tmp_path, kinds["chat"]))
    results = json.loads((tmp_path / "out" / "vqav2-results.json").read_text())
    assert results["meta"]["protocol"] == "chat" and set(results["fewshot"]["VQAv2"]) == {"0"}


def test_protocol_flag_overrides_the_recorded_kind(kinds, tmp_path):
    main(vqa_args(tmp_path, kinds["chat"], "--protocol", "base", "--shots", "0,2", *support(tmp_path)))
    results = json.loads((tmp_path / "out" / "vqav2-results.json").read_text())
    assert results["meta"]["protocol"] == "base" and set(results["fewshot"]["VQAv2"]) == {"0", "2"}


def test_a_model_that_records_no_kind_gets_the_base_protocol_and_a_note(model_dir, tmp_path, capsys):
    main(vqa_args(tmp_path, model_dir, "--shots", "0"))
    assert "does not record whether it is a base or a chat model" in capsys.readouterr().err

