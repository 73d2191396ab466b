"""`emu2 init --vision --llm`: EVA-CLIP's visual tower + a LLaMA folder + random projections -> the stage-1 start
(paper Table 5 "init."), checked on a tiny LLaMA and a tiny EVA-CLIP built here."""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from emu2 import processing as P
from emu2.cli import main
from emu2.config import Emu2Config
from emu2.convert.assemble import AssemblyError, assemble_init
from emu2.convert.official import CheckpointMismatchError, official_key
from emu2.model import Emu2ForCausalLM
from emu2.pipelines.emu2 import Emu2Pipeline

LLAMA_VOCAB = 32000
EVA_IMAGE_SIZE = 28  # the tiny preset says 56: the checkpoint's grid decides, as EVA-CLIP's 224 vs Emu2's 448


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(folder, **changes):
    """A LLaMA folder as Hugging Face ships one: config.json, sharded safetensors + index, tokenizer files."""
    text = Emu2Config.from_preset("tiny").text_config
    sizes = {name: getattr(text, name) for name in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(**{**sizes, "vocab_size": LLAMA_VOCAB, **changes}))
    llama.save_pretrained(folder, max_shard_size="3MB")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):  # the LLaMA tokenizer
        shutil.copy(P.DEFAULT_TOKENIZER / name, folder / name)
    return llama


def tiny_eva_clip(image_size=EVA_IMAGE_SIZE, **vision_changes) -> dict[str, torch.Tensor]:
    """An open_clip-style EVA-CLIP state dict: our tiny vision tower under official names, plus the CLIP parts
    Emu2 does not use (final norm, head, text tower, logit scale)."""
    config = Emu2Config.from_preset("tiny")
    for key, value in {"image_size": image_size, **vision_changes}.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(2)
    visual = Emu2ForCausalLM(config).visual
    state = {}
    for key, value in visual.state_dict().items():
        official = "visual." + key  # the official name whose mapping is ours
        assert official_key(official) == "visual." + key
        state[official] = value.clone()
    width = config.vision_config.width
    state.update({"visual.norm.weight": torch.ones(width), "visual.norm.bias": torch.zeros(width),
                  "visual.head.weight": torch.randn(16, width), "visual.head.bias": torch.zeros(16),
                  "text.token_embedding.weight": torch.randn(100, 32), "text.positional_embedding": torch.randn(8, 32),
                  "text.transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
                  "text.ln_final.weight": torch.ones(32), "text.text_projection": torch.randn(32, 16),
                  "logit_scale": torch.tensor(4.6)})
    return state


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    llama = tiny_llama(root / "llama")
    eva = tiny_eva_clip()
    torch.save(eva, root / "EVA02_CLIP_tiny.pt")  # as EVA-CLIP releases it; read with weights_only
    return root, llama, eva


@pytest.fixture(scope="module")
def assembled(sources, tmp_path_factory):
    root, _, _ = sources
    out = tmp_path_factory.mktemp("emu2-init")
    report = assemble_init("tiny", root / "EVA02_CLIP_tiny.pt", root / "llama", out, dtype=torch.float32)
    return out, report, Emu2ForCausalLM.from_pretrained(out)


def test_decoder_weights_equal_the_llama_with_embeddings_grown_by_their_mean(sources, assembled):
    _, llama, _ = sources
    _, report, model = assembled
    ours = model.language_model.state_dict()
    for key, value in llama.state_dict().items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            grown = ours[key]
            assert grown.shape == (32272, 64) and torch.equal(grown[:LLAMA_VOCAB], value), key
            assert torch.allclose(grown[LLAMA_VOCAB:], value.mean(0).expand(272, -1)), key
        else:
            assert torch.equal(ours[key], value), key
    assert report.new_token_rows == 272


def test_vision_tower_equals_the_eva_clip_visual_weights_at_the_checkpoint_image_size(sources, assembled):
    _, _, eva = sources
    _, report, model = assembled
    for key, value in model.visual.state_dict().items():
        assert torch.equal(value, eva["visual." + key]), key
    assert model.config.vision_config.image_size == report.image_size == EVA_IMAGE_SIZE


def test_clip_parts_emu2_does_not_use_are_dropped_and_listed(assembled):
    _, report, _ = assembled
    assert report.dropped_visual == ["visual.head.bias", "visual.head.weight", "visual.norm.bias", "visual.norm.weight"]
    assert report.dropped_other == {"text": 5, "logit_scale": 1}
    assert "visual.head.weight" in report.summary() and "text.* (5)" in report.summary()


def test_projections_are_random_with_the_model_init_and_the_seed(sources, assembled, tmp_path):
    root, _, _ = sources
    _, _, model = assembled
    for linear in (model.project_up, model.project_down):
        assert linear.weight.shape == (64, 64) and abs(linear.weight.std().item() - 0.02) < 0.004
    assemble_init("tiny", root / "EVA02_CLIP_tiny.pt", root / "llama", tmp_path, dtype=torch.float32, seed=1)
    other = Emu2ForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(other.project_up.weight, model.project_up.weight)
    assert torch.equal(other.visual.pos_embed, model.visual.pos_embed)


def test_saved_tokenizer_has_the_special_tokens_at_the_config_ids(assembled):
    out, _, _ = assembled
    assert (out / "tokenizer_config.json").is_file()
    pipe = Emu2Pipeline.from_pretrained(out)
    vocab, config = pipe.tokenizer.get_vocab(), pipe.model.config
    assert len(pipe.tokenizer) == config.text_config.vocab_size == 32272
    assert (vocab[P.PAD_TOKEN], vocab[P.BOI], vocab[P.EOI], vocab[P.IMAGE_TOKEN], vocab[P.FRAME_TOKEN]) == (
        config.text_config.pad_token_id, config.boi_token_id, config.eoi_token_id, config.image_token_id,
        config.frame_token_id)
    assert all(token in vocab for token in P.SPECIAL_TOKENS)


def test_assembled_directory_answers_and_trains_one_stage1_step(assembled, tmp_path):
    from emu2.train import train
    from emu2.train.config import load_config

    out, _, _ = assembled
    pipe = Emu2Pipeline.from_pretrained(out)
    image = torch.zeros(3, EVA_IMAGE_SIZE, EVA_IMAGE_SIZE)
    inputs = pipe.encode([f"{P.IMAGE_PLACEHOLDER}A photo of"], images=[image])
    assert pipe.model(**inputs).logits.shape[-1] == 32272
    # The full-scale stage-1 recipe, shrunk: only its model.init_from target is what this test is about.
    config = load_config("emu2-stage1", [
        f"output_dir={tmp_path / 'stage1'}", f"model.init_from={out}", "model.image_size=null", "steps=1",
        "model.activation_checkpointing=false", "mixed_precision=no", "log.progress=false", "log.tensorboard=false",
        "data.synthetic={seq_len: 24, images: 1, regress: false}", "data.num_workers=0",
        "data.streams={pairs: {batch_size: 1, sources: []}}",
    ])
    summary = train(config)
    assert summary["step"] == 1
    trained = Emu2ForCausalLM.from_pretrained(tmp_path / "stage1")
    assert not torch.equal(trained.project_up.weight, pipe.model.project_up.weight)


def test_cli_init_assembles_bf16_shards_from_safetensors(sources, tmp_path, capsys):
    root, _, eva = sources
    save_file(eva, root / "eva.safetensors")
    main(["init", "--preset", "tiny", "--vision", str(root / "eva.safetensors"), "--llm", str(root / "llama"),
          "--out", str(tmp_path), "--max-shard-size", "2MB"])
    assert "dropped visual tensors" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = Emu2ForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.visual.pos_embed, eva["visual.pos_embed"].to(torch.bfloat16))


def test_cli_init_wants_vision_and_llm_together(tmp_path):
    with pytest.raises(SystemExit, match="together"):
        main(["init", "--preset", "tiny", "--llm", str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_llama_of_other_sizes_is_refused_naming_the_fields(sources, tmp_path):
    root, _, _ = sources
    tiny_llama(tmp_path / "llama", hidden_size=32, num_hidden_layers=3)
    with pytest.raises(AssemblyError, match=r"hidden_size: 32 \(preset 64\)") as error:
        assemble_init("tiny", root / "EVA02_CLIP_tiny.pt", tmp_path / "llama", tmp_path / "out")
    assert "num_hidden_layers: 3 (preset 2)" in str(error.value) and "intermediate_size" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_vision_tower_of_another_size_is_refused(sources, tmp_path):
    root, _, _ = sources
    torch.save(tiny_eva_clip(width=32, head_width=16), tmp_path / "eva.pt")
    with pytest.raises(AssemblyError, match="width 32, 2 layers, patch 14; the preset wants 64, 2, 14"):
        assemble_init("tiny", tmp_path / "eva.pt", root / "llama", tmp_path / "out")


def test_missing_vision_tensors_are_named(sources, tmp_path):
    root, _, eva = sources
    torch.save({k: v for k, v in eva.items() if k != "visual.blocks.1.mlp.fc2.weight"}, tmp_path / "eva.pt")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)--vision .*missing keys: visual\.blocks\.1\.mlp\.fc2\.weight"):
        assemble_init("tiny", tmp_path / "eva.pt", root / "llama", tmp_path / "out")


def test_a_clip_without_a_visual_tower_is_refused(sources, tmp_path):
    root, _, eva = sources
    torch.save({k: v for k, v in eva.items() if not k.startswith("visual.")}, tmp_path / "text_only.pt")
    with pytest.raises(AssemblyError, match="no visual.* tensors"):
        assemble_init("tiny", tmp_path / "text_only.pt", root / "llama", tmp_path / "out")


def test_missing_and_unexpected_llama_tensors_are_named(sources, tmp_path):
    root, llama, _ = sources
    folder = tmp_path / "llama"
    folder.mkdir()
    shutil.copy(root / "llama" / "config.json", folder / "config.json")
    state = {k: v for k, v in llama.state_dict().items() if k != "model.norm.weight"}
    save_file({**state, "model.extra.weight": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)--llm .*missing keys: language_model\.model\.norm\.weight"
                       r".*unexpected keys: model\.extra\.weight"):
        assemble_init("tiny", root / "EVA02_CLIP_tiny.pt", folder, tmp_path / "out")


def test_an_existing_model_directory_is_not_overwritten(sources, assembled):
    root, _, _ = sources
    out, _, _ = assembled
    with pytest.raises(FileExistsError, match="not empty"):
        assemble_init("tiny", root / "EVA02_CLIP_tiny.pt", root / "llama", out)
