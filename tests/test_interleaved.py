"""Interleaved generation: text and images from one model in one KV-cached loop, over a tiny random model."""

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, SuppressTokensLogitsProcessor

from emu2.config import Emu2Config
from emu2.model import Emu2ForCausalLM
from emu2.model.interleaved import InterleavedImage, generate_interleaved
from emu2.pipelines.emu2 import Emu2Pipeline

BOS, EOS, BOI, EOI, IMG = 1, 2, 32001, 32002, 32003
PROMPT = [BOS, 450, 4996, 17354]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Emu2ForCausalLM(Emu2Config.from_preset("tiny")).eval()


class PreferImageStart(LogitsProcessor):
    """Makes [IMG] the most likely token, as a model trained on interleaved documents would at a scene break."""

    def __call__(self, input_ids, scores):
        scores[:, BOI] += 1e4
        return scores


def no_eos():
    return SuppressTokensLogitsProcessor([EOS])


def image_blocks(token_ids):
    """The index of each [IMG] in token_ids."""
    return [j for j, t in enumerate(token_ids) if t == BOI]


def test_each_image_is_n_query_slots_between_the_image_tokens(model):
    [out] = generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=4, force_image_at=[0, 2],
                                 logits_processor=[no_eos()])
    q = model.config.n_query
    starts = image_blocks(out.token_ids)
    assert len(starts) == 2 and len(out.images) == 2
    for j in starts:
        assert out.token_ids[j + 1:j + 2 + q] == [IMG] * q + [EOI]
    assert all(image.shape == (q, model.config.vision_config.width) for image in out.images)
    assert out.token_ids.count(IMG) == 2 * q


def test_cached_loop_equals_a_full_rerun_of_the_generated_sequence(model):
    """Text logits and regressed embeddings after each text/image switch equal one uncached pass over it all."""
    q, width = model.config.n_query, model.config.vision_config.width
    prompt_image = torch.randn(1, q, width)
    prompt = [BOS, 450, BOI] + [IMG] * q + [EOI, 4996]
    [out] = generate_interleaved(model, torch.tensor([prompt]), image_features=prompt_image, max_new_tokens=5,
                                 force_image_at=[1, 3], logits_processor=[no_eos()], output_logits=True)
    sequence = torch.tensor([prompt + out.token_ids])
    features = torch.cat([prompt_image, torch.stack(out.images)])
    hidden = model.language_model.get_decoder()(inputs_embeds=model.embed(sequence, features),
                                                use_cache=False).last_hidden_state[0]
    # Every generated element at j is predicted by the position before it, len(prompt) + j - 1.
    chosen = [j for j, t in enumerate(out.token_ids) if t not in (IMG, EOI)]
    full_logits = model.language_model.get_output_embeddings()(hidden[[len(prompt) + j - 1 for j in chosen]])
    assert torch.allclose(out.logits, full_logits, atol=1e-5)
    for image, j in zip(out.images, image_blocks(out.token_ids)):
        rows = [len(prompt) + j + k for k in range(q)]  # [IMG] predicts slot 0, slot k predicts slot k + 1
        assert torch.allclose(image, model.project_down(hidden[rows]), atol=1e-5)


def test_the_model_choosing_the_image_token_starts_an_image(model):
    [out] = generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=3, max_images=1,
                                 logits_processor=[PreferImageStart()])
    assert out.token_ids[0] == BOI and len(out.images) == 1


def test_max_images_bounds_images_even_when_the_model_wants_more(model):
    [out] = generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=4, max_images=2,
                                 logits_processor=[PreferImageStart(), no_eos()])
    assert len(out.images) == 2 and out.token_ids.count(BOI) == 2
    assert sum(len(p) for p in out.parts if isinstance(p, list)) == 4  # text went on once [IMG] was barred


def test_max_new_tokens_bounds_the_text_tokens(model):
    [out] = generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=5, force_image_at=[2],
                                 logits_processor=[no_eos()])
    text = [t for p in out.parts if isinstance(p, list) for t in p]
    assert len(text) == 5 and out.finish_reason == "length"
    assert len(out.token_ids) == 5 + model.config.n_query + 2


def test_prompt_ending_with_the_image_token_starts_with_an_image(model):
    [out] = generate_interleaved(model, torch.tensor([PROMPT + [BOI]]), max_new_tokens=2,
                                 logits_processor=[no_eos()])
    q = model.config.n_query
    assert out.token_ids[:q + 1] == [IMG] * q + [EOI] and isinstance(out.parts[0], torch.Tensor)


def test_end_of_sequence_ends_a_row(model):
    class PreferEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, EOS] += 1e4
            return scores

    [out] = generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=8, force_image_at=[0],
                                 logits_processor=[PreferEos()])
    assert out.finish_reason == "eos" and out.token_ids[-1] == EOS and len(out.images) == 1


def test_sampling_with_top_k_1_equals_greedy(model):
    kwargs = dict(max_new_tokens=4, force_image_at=[1], logits_processor=[no_eos()])
    [greedy] = generate_interleaved(model, torch.tensor([PROMPT]), **kwargs)
    [sampled] = generate_interleaved(model, torch.tensor([PROMPT]), do_sample=True, top_k=1, temperature=0.7,
                                     generator=torch.Generator().manual_seed(0), **kwargs)
    assert sampled.token_ids == greedy.token_ids


def test_batch_with_different_image_counts_equals_each_row_alone(model):
    short, long = [BOS, 450], [BOS, 450, 4996, 17354, 278, 3186]
    batch = torch.tensor([[0] * 4 + short, long])
    mask = torch.tensor([[0] * 4 + [1] * 2, [1] * 6])
    kwargs = dict(max_new_tokens=5, logits_processor=[no_eos()])
    together = generate_interleaved(model, batch, mask, force_image_at=[[0], [1, 3]], **kwargs)
    alone = [generate_interleaved(model, torch.tensor([ids]), force_image_at=[at], **kwargs)[0]
             for ids, at in ((short, [0]), (long, [1, 3]))]
    assert [len(out.images) for out in together] == [1, 2]
    for row, single in zip(together, alone):
        assert row.token_ids == single.token_ids
        for a, b in zip(row.images, single.images):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_prompt_too_long_for_the_limits_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's"):
        generate_interleaved(model, torch.tensor([PROMPT]), max_new_tokens=4000)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipe():
    return Emu2Pipeline.from_preset("tiny")


def test_pipeline_returns_ordered_text_and_decoded_images(pipe):
    drawn = []

    def decoder(embeddings):
        drawn.append(embeddings.shape)
        return Image.new("RGB", (8, 8), "blue")

    [parts] = pipe.generate_interleaved(["A story:"], decoder=decoder, max_new_tokens=4, force_image_at=[2],
                                        logits_processor=[no_eos()])
    kinds = [type(p) for p in parts]
    assert kinds == [str, InterleavedImage, str]
    assert isinstance(parts[1].image, Image.Image) and drawn == [(1, pipe.model.config.n_query, 64)]


def test_streamed_parts_add_up_to_the_returned_parts(pipe):
    streamed = {0: [], 1: []}
    result = pipe.generate_interleaved([["first"], ["a longer second prompt"]], max_new_tokens=4,
                                       force_image_at=[[1], []], logits_processor=[no_eos()],
                                       stream=lambda row, part: streamed[row].append(part))
    for row, parts in enumerate(result):
        texts = "".join(p for p in streamed[row] if isinstance(p, str))
        assert texts == "".join(p for p in parts if isinstance(p, str))
        assert sum(isinstance(p, InterleavedImage) for p in streamed[row]) == (1 if row == 0 else 0)


def test_stop_string_ends_the_answer_before_it(pipe):
    [free] = pipe.generate_interleaved(["A story:"], max_new_tokens=6, logits_processor=[no_eos()])
    text = free[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    [stopped] = pipe.generate_interleaved(["A story:"], max_new_tokens=6, logits_processor=[no_eos()], stop=[stop])
    assert stopped == [text[:text.find(stop)]]


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    from emu2.pipelines.gen import Emu2GenPipeline

    path = tmp_path_factory.mktemp("tiny-gen")
    Emu2GenPipeline.from_preset("tiny").save_pretrained(path)
    return path


def test_cli_writes_a_markdown_document_with_its_images_beside_it(tmp_path, capsys, gen_dir):
    from emu2.serve.cli import main

    out = tmp_path / "docs" / "story.md"
    argv = ["generate", "--interleaved", "--model", str(gen_dir), "Once upon a time", "--image-at", "0",
            "--image-at", "3", "--max-new-tokens", "4", "--steps", "2", "--seed", "0", "-o", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    document = out.read_text()
    assert document.startswith("> Once upon a time") and "](story-1.png)" in document
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs[0] == "story-1.png" and all(f"]({name})" in document for name in pngs)
    assert Image.open(out.parent / "story-1.png").size == (16, 16)


def test_cli_interleaved_needs_a_markdown_output(tmp_path):
    from emu2.serve.cli import main

    with pytest.raises(SystemExit, match="Markdown"):
        main(["generate", "--interleaved", "--model", str(tmp_path), "x", "-o", str(tmp_path / "x.png")])


def test_cli_takes_an_emu2_model_with_a_separate_decoder(tmp_path, capsys, gen_dir):
    from emu2.serve.cli import main

    out = tmp_path / "doc.md"
    argv = ["generate", "--interleaved", "--model", str(gen_dir / "encoder"), "--decoder", str(gen_dir / "decoder"),
            "A picture:", "--image-at", "0", "--max-new-tokens", "2", "--steps", "1", "--guidance", "1", "-o", str(out)]
    assert main(argv) == 0
    assert (tmp_path / "doc-1.png").is_file() and "](doc-1.png)" in out.read_text()
