"""Our model reproduces the official Emu2 code's outputs (the test vectors in emu2-official-tiny).

Every size comes from the fixture's files, so any fixture made the same way passes too. Set
EMU2_OFFICIAL_FIXTURE to point at another one.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from emu2.convert.official import config_from_official, load_official, read_official_state_dict
from emu2.processing import expand_placeholders, load_tokenizer

from .conftest import FIXTURE, official_initial_latents

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"official fixture not found at {FIXTURE}")
ATOL = 1e-4


@pytest.fixture(scope="module")
def cases():
    return json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


def _load(name, vision_cfg):
    state = read_official_state_dict(FIXTURE / f"{name}.safetensors")
    if name == "gen":
        state = {k: v for k, v in state.items() if k.startswith("multimodal_encoder.")}
    vocab = next(v for k, v in state.items() if k.endswith("embed_tokens.weight")).shape[0]
    llama = json.loads((FIXTURE / "tokenizer" / "config.json").read_text())
    return load_official(state, config_from_official(vision_cfg, llama, vocab), dtype=torch.float32)


@pytest.fixture(scope="module")
def base(cases):
    return _load("base", cases["base_vision_cfg"])


@pytest.fixture(scope="module")
def chat(cases):
    return _load("chat", cases["chat_vision_cfg"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURE / "tokenizer")


@pytest.fixture(scope="module")
def chat_tokenizer():
    return load_tokenizer(FIXTURE / "tokenizer", instruct=True)


def _ids(tokenizer, model, prompt):
    text = expand_placeholders(prompt, model.config.n_query, model.config.v_query)
    return torch.tensor([tokenizer(text)["input_ids"]])


def _close(actual, wanted):
    assert actual.shape == wanted.shape
    diff = (actual.float() - wanted.float()).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL}"


# --------------------------------------------------------------------------------------------- tokenizer
def test_special_token_ids_match_official(cases, tokenizer, chat_tokenizer):
    vocab = tokenizer.get_vocab()
    assert {t: vocab[t] for t in cases["added_tokens_base"]} == cases["added_tokens_base"]
    chat_vocab = chat_tokenizer.get_vocab()
    assert {t: chat_vocab[t] for t in cases["added_tokens_chat"]} == cases["added_tokens_chat"]
    specials = cases["special_ids_base"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (
        specials["bos"], specials["eos"], specials["pad"], specials["vocab"])


def test_every_prompt_tokenises_to_the_official_ids(cases, tokenizer, base):
    for name, prompt in cases["prompts"].items():
        assert _ids(tokenizer, base, prompt)[0].tolist() == cases["input_ids_base"][name], name


def test_chat_prompts_tokenise_to_the_official_ids(cases, chat_tokenizer, chat):
    assert _ids(chat_tokenizer, chat, cases["chat_prompt"])[0].tolist() == cases["input_ids_chat"]
    assert _ids(chat_tokenizer, chat, cases["chat_grounding_prompt"])[0].tolist() == cases["input_ids_chat_grounding"]


# ---------------------------------------------------------------------------------------------- tensors
def test_encode_image_matches(base, chat, expected):
    with torch.no_grad():
        _close(base.encode_image(expected["pixel_values"]), expected["base.encode_image"])
        _close(chat.encode_image(expected["pixel_values"]), expected["chat.encode_image"])


def test_encode_video_frames_matches(base, expected):
    with torch.no_grad():
        _close(base.encode_image(expected["video_frames"], base.config.v_query), expected["base.encode_video"])


def test_fewshot_forward_matches_logits_hidden_and_regression(cases, base, tokenizer, expected):
    ids = _ids(tokenizer, base, cases["prompts"]["fewshot"])
    with torch.no_grad():
        out = base(ids, images=expected["pixel_values"])
        _close(out.logits[0], expected["base.fewshot.logits"])
        _close(out.last_hidden_state[0], expected["base.fewshot.last_hidden"])
        _close(base.project_down(out.last_hidden_state[0]), expected["base.fewshot.regressed"])


@pytest.mark.parametrize("index,key,with_image", [(0, "text", False), (1, "image_text", True)])
def test_kv_cached_image_regression_matches_official_generate_image(cases, base, tokenizer, expected, index, key,
                                                                    with_image):
    ids = _ids(tokenizer, base, cases["generate_image_prompts"][index])
    images = expected["pixel_values"][:1] if with_image else None
    _close(base.regress_image_embeddings(ids, images=images), expected[f"base.generate_image.{key}"])


# ------------------------------------------------------------------------------------------- generation
def _generated(official_ids):
    # transformers 4.31 returned a dummy BOS first for embeddings-only generation; it was never fed to the model.
    assert official_ids[0][0] == 1
    return [row[1:] for row in official_ids]


@pytest.mark.parametrize("mode", ["greedy", "beam5"])
def test_fewshot_generation_ids_match(cases, base, tokenizer, expected, mode):
    case = cases["base_generate"][mode]
    ids = _ids(tokenizer, base, cases["prompts"]["fewshot"])
    out = base.generate_text(ids, images=expected["pixel_values"], do_sample=False, **case["kwargs"])
    assert out.tolist() == _generated(case["ids"])


def test_video_generation_ids_match(cases, base, tokenizer, expected):
    case = cases["base_generate_video"]
    ids = _ids(tokenizer, base, cases["prompts"]["video"])
    out = base.generate_text(ids, frames=expected["video_frames"], do_sample=False, **case["kwargs"])
    assert out.tolist() == _generated(case["ids"])


def test_chat_generation_ids_match(cases, chat, chat_tokenizer, expected):
    case = cases["chat_generate"]
    ids = _ids(chat_tokenizer, chat, cases["chat_prompt"])
    out = chat.generate_text(ids, images=expected["pixel_values"][:1], do_sample=False, **case["kwargs"])
    assert out.tolist() == _generated(case["ids"])


# ------------------------------------------------------------------------------------ Emu2-Gen (decoder)
@pytest.fixture(scope="module")
def gen(cases):
    pytest.importorskip("diffusers")
    from emu2.convert.gen import load_official_gen_decoder
    from emu2.pipelines.emu2 import Emu2Pipeline
    from emu2.pipelines.gen import Emu2GenPipeline

    state = read_official_state_dict(FIXTURE / "gen.safetensors")
    configs = cases["gen_configs"]
    decoder = load_official_gen_decoder(state, configs["unet"], configs["vae"], configs["scheduler"])
    decoder.set_progress_bar_config(disable=True)
    encoder = _load("gen", cases["base_vision_cfg"])
    return Emu2GenPipeline(Emu2Pipeline(encoder, load_tokenizer(FIXTURE / "tokenizer")), decoder)


def _gen_inputs(prompt, expected):
    """cases.json writes an input image as "<image:KEY>" (a uint8 tensor in expected.safetensors)."""
    from PIL import Image

    def item(p):
        if p.startswith("<image:"):
            return Image.fromarray(expected[p[len("<image:"):-1]].numpy())
        return p

    return [item(p) for p in prompt] if isinstance(prompt, list) else [item(prompt)]


@pytest.mark.parametrize("run", ["t2i", "edit", "autoencode"])
def test_gen_prompt_embeddings_match(cases, gen, expected, run):
    cond, uncond = gen.conditioning(_gen_inputs(cases["gen_runs"][run]["prompt"], expected))
    _close(torch.cat([cond, uncond]), expected[f"gen.{run}.prompt_embeds"])


def _assert_official_gen_image(gen, cases, expected, run):
    import numpy as np

    args = dict(cases["gen_runs"][run])
    out = gen(_gen_inputs(args.pop("prompt"), expected), height=args["height"], width=args["width"],
              num_inference_steps=args["num_inference_steps"], guidance_scale=args["guidance_scale"],
              original_size=tuple(args["original_size"]), crops_coords_top_left=tuple(args["crop_info"]),
              sampler="official", latents=official_initial_latents(expected[f"gen.{run}.latents"], args["num_inference_steps"]))
    diff = np.abs(np.asarray(out.image).astype(int) - expected[f"gen.{run}.image_uint8"].numpy().astype(int))
    assert diff.max() <= 1, f"max grey-level difference {diff.max()}"


@pytest.mark.parametrize("run", ["t2i", "edit", "autoencode"])
def test_gen_images_within_one_grey_level(cases, gen, expected, run):
    """End to end: our encoder's embeddings (not the recorded ones) through our decoder."""
    _assert_official_gen_image(gen, cases, expected, run)


# ------------------------------------------------------------------ Emu2-Gen converted to a pipeline directory
def _write_diffusion_config(folder, configs):
    """The official conf/diffusion_config layout the native Gen loader builds its decoder from."""
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (folder / part).mkdir(parents=True)
        (folder / part / name).write_text(json.dumps(configs[part]))


def _encoder_config(cases):
    state = read_official_state_dict(FIXTURE / "gen.safetensors")
    vocab = state["multimodal_encoder.decoder.lm.model.embed_tokens.weight"].shape[0]
    llama = json.loads((FIXTURE / "tokenizer" / "config.json").read_text())
    return config_from_official(cases["base_vision_cfg"], llama, vocab)


@pytest.fixture(scope="module")
def converted_gen(cases, tmp_path_factory):
    """The native Gen file -> our Gen directory (one call) -> `Emu2GenPipeline.from_pretrained`."""
    from emu2.convert.gen import load_official_gen
    from emu2.pipelines.gen import Emu2GenPipeline

    tmp = tmp_path_factory.mktemp("gen")
    _write_diffusion_config(tmp / "diffusion_config", cases["gen_configs"])
    pipe = load_official_gen(FIXTURE / "gen.safetensors", _encoder_config(cases), load_tokenizer(FIXTURE / "tokenizer"),
                             decoder_config=tmp / "diffusion_config")
    pipe.save_pretrained(tmp / "converted")
    loaded = Emu2GenPipeline.from_pretrained(tmp / "converted")
    loaded.decoder.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize("run", ["t2i", "edit", "autoencode"])
def test_native_gen_file_converts_to_a_gen_directory_with_official_images(cases, converted_gen, expected, run):
    """Official `EmuVisualGeneration.from_pretrained` loads multimodal_encoder.*, unet.*, vae.* from the one file:
    all of them must reach our encoder/ and decoder/, so the converted directory gives the official images."""
    _assert_official_gen_image(converted_gen, cases, expected, run)


def test_native_gen_decoder_sizes_come_from_the_file(cases, expected, tmp_path):
    """The official loader builds the UNet/VAE from conf/diffusion_config; the sizes the weights fix are read
    from the file, so a config with the 37B model's sizes still converts the tiny file."""
    from emu2.convert.gen import OFFICIAL_UNET_CONFIG, OFFICIAL_VAE_CONFIG, load_official_gen

    configs = json.loads(json.dumps(cases["gen_configs"]))
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        configs["unet"][key] = OFFICIAL_UNET_CONFIG[key]
    configs["unet"]["attention_head_dim"] = cases["gen_configs"]["unet"]["attention_head_dim"]  # not in the weights
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types"):
        configs["vae"][key] = OFFICIAL_VAE_CONFIG[key]
    _write_diffusion_config(tmp_path, configs)
    pipe = load_official_gen(FIXTURE / "gen.safetensors", _encoder_config(cases), load_tokenizer(FIXTURE / "tokenizer"),
                             decoder_config=tmp_path)
    pipe.decoder.set_progress_bar_config(disable=True)
    _assert_official_gen_image(pipe, cases, expected, "t2i")


@pytest.fixture(scope="module")
def hf_gen_folder(converted_gen, tmp_path_factory):
    """The BAAI/Emu2-Gen diffusers layout of the fixture's weights, written by our exporter."""
    from emu2.convert.export import export_official

    tmp = tmp_path_factory.mktemp("hf")
    converted_gen.save_pretrained(tmp / "ours")
    export_official(tmp / "ours", tmp / "Emu2-Gen", "official-hf")
    return tmp / "Emu2-Gen"


def test_hf_gen_layout_has_the_official_folders(hf_gen_folder):
    """BAAI/Emu2-Gen: multimodal_encoder/ (bf16-variant shards + model.safetensors.index.bf16.json), unet/, vae/,
    scheduler/, tokenizer/ (official-format 1)."""
    names = {p.name for p in hf_gen_folder.iterdir()}
    assert {"multimodal_encoder", "unet", "vae", "scheduler", "tokenizer"} <= names
    assert (hf_gen_folder / "multimodal_encoder" / "model.safetensors.index.bf16.json").is_file()
    assert (hf_gen_folder / "unet" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    index = json.loads((hf_gen_folder / "multimodal_encoder" / "model.safetensors.index.bf16.json").read_text())
    assert "model.decoder.lm.lm_head.weight" in index["weight_map"] and "project_up.weight" in index["weight_map"]


def test_hf_gen_layout_converts_to_a_gen_directory_with_official_images(cases, hf_gen_folder, expected, tmp_path):
    """Official HF `DiffusionPipeline.from_pretrained(BAAI/Emu2-Gen)` reads each part from its subfolder; our
    converter reads the same folders into one Gen directory."""
    from emu2.convert.gen import load_official_gen
    from emu2.pipelines.gen import Emu2GenPipeline

    load_official_gen(hf_gen_folder, _encoder_config(cases)).save_pretrained(tmp_path)
    pipe = Emu2GenPipeline.from_pretrained(tmp_path)
    pipe.decoder.set_progress_bar_config(disable=True)
    _assert_official_gen_image(pipe, cases, expected, "edit")


# ---------------------------------------------------------------------- back to the official layouts
def _assert_identical(official, written):
    assert sorted(written) == sorted(official)
    different = [k for k in official if official[k].dtype != written[k].dtype or not torch.equal(official[k], written[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("name,vision", [("base", "base_vision_cfg"), ("chat", "chat_vision_cfg")])
def test_native_checkpoint_round_trips_bit_identical(cases, tmp_path, name, vision):
    """Official native `from_pretrained` loads the file with strict=True: what we export must carry exactly its
    key names (rotary inv_freq buffers included) and tensors."""
    from emu2.convert.export import export_official
    from emu2.pipelines.emu2 import Emu2Pipeline

    official = read_official_state_dict(FIXTURE / f"{name}.safetensors")
    model = _load(name, cases[vision])
    Emu2Pipeline(model, load_tokenizer(FIXTURE / "tokenizer", instruct=model.config.instruct)).save_pretrained(
        tmp_path / "ours")
    (written,) = export_official(tmp_path / "ours", tmp_path / "official", "official-native")
    assert written.name == ("Emu2-Chat" if name == "chat" else "Emu2") + "_pytorch_model.bin"
    _assert_identical(official, torch.load(written, weights_only=True))


def test_native_gen_file_round_trips_bit_identical(converted_gen, tmp_path):
    """Official `EmuVisualGeneration.from_pretrained` loads multimodal_encoder.*, unet.*, vae.* strictly."""
    from emu2.convert.export import export_official

    converted_gen.save_pretrained(tmp_path / "ours")
    (written,) = export_official(tmp_path / "ours", tmp_path / "official", "official-native")
    assert written.name == "Emu2-Gen_pytorch_model.safetensors"
    _assert_identical(read_official_state_dict(FIXTURE / "gen.safetensors"), load_file(str(written)))


def test_hf_gen_layout_round_trips_bit_identical(cases, hf_gen_folder, tmp_path):
    """official HF -> ours -> official HF keeps every weight file's names and tensors."""
    from emu2.convert.export import export_official
    from emu2.convert.gen import load_official_gen

    load_official_gen(hf_gen_folder, _encoder_config(cases)).save_pretrained(tmp_path / "ours")
    export_official(tmp_path / "ours", tmp_path / "again", "official-hf")
    for part in ("multimodal_encoder", "unet", "vae"):
        _assert_identical(read_official_state_dict(hf_gen_folder / part), read_official_state_dict(tmp_path / "again" / part))
