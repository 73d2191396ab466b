"""`emu2 convert --to official-hf` writes the config files of the official HF repos (official-format section 1):
``config.json`` (BAAI/Emu2, Emu2-Chat, and Emu2-Gen's ``multimodal_encoder/``) and Emu2-Gen's ``model_index.json``.

The sizes are checked against the official fixture's own files (its LLaMA ``config.json`` and the official
``CLIPVisionCfg`` in cases.json), so any fixture made the same way passes.
"""

import json

import pytest
import torch

from emu2.cli import main
from emu2.convert.official import config_from_official, load_official, read_official_state_dict
from emu2.processing import load_tokenizer

from .conftest import FIXTURE

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"official fixture not found at {FIXTURE}")

# The fields of the official HF config.json files (BAAI/Emu2, BAAI/Emu2-Chat, Emu2-Gen/multimodal_encoder),
# leaving out the two that name the authors' own paths (_name_or_path, llama_config_path).
OFFICIAL_FIELDS = {
    "architectures", "attention_bias", "attention_dropout", "auto_map", "bos_token_id", "d_model", "eos_token_id",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
    "model_version", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
    "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "use_cache", "vision_config", "vocab_size",
}
OFFICIAL_VISION_FIELDS = {
    "drop_path_rate", "eva_model_name", "head_width", "image_size", "intermediate_size", "layer_norm_eps", "layers",
    "mlp_ratio", "n_query", "patch_size", "postnorm", "qkv_bias", "v_query", "width", "xattn",
}
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "tie_word_embeddings")
VISION_FIELDS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "qkv_bias", "postnorm",
                 "drop_path_rate", "n_query", "v_query")


@pytest.fixture(scope="module")
def cases():
    return json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture(scope="module")
def llama():
    return json.loads((FIXTURE / "tokenizer" / "config.json").read_text())


def _vocab(state):
    return next(v for k, v in state.items() if k.endswith("embed_tokens.weight")).shape[0]


def _export(name, vision_cfg, llama, tmp_path):
    from emu2.pipelines.emu2 import Emu2Pipeline

    state = read_official_state_dict(FIXTURE / f"{name}.safetensors")
    model = load_official(state, config_from_official(vision_cfg, llama, _vocab(state)), dtype=torch.float32)
    Emu2Pipeline(model, load_tokenizer(FIXTURE / "tokenizer", instruct=model.config.instruct)).save_pretrained(
        tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", "official-hf", "--out", str(tmp_path / "hf")]) == 0
    return json.loads((tmp_path / "hf" / "config.json").read_text()), _vocab(state)


def _assert_official_config(config, cases_vision, llama, vocab):
    assert set(config) == OFFICIAL_FIELDS and set(config["vision_config"]) == OFFICIAL_VISION_FIELDS
    assert config["architectures"] == ["EmuForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_emu.EmuForCausalLM"
    assert {k: config[k] for k in LLAMA_FIELDS} == {k: llama[k] for k in LLAMA_FIELDS}
    vision = config["vision_config"]
    assert {k: vision[k] for k in VISION_FIELDS} == {k: cases_vision[k] for k in VISION_FIELDS}
    assert vision["intermediate_size"] == int(cases_vision["width"] * cases_vision["mlp_ratio"])
    # official-format 2.2: vocab = len(tokenizer) (the embedding rows), pad 32000; d_model is the ViT width.
    assert (config["vocab_size"], config["pad_token_id"], config["d_model"]) == (vocab, 32000, cases_vision["width"])
    assert config["torch_dtype"] == "float32" and config["num_key_value_heads"] == llama["num_attention_heads"]


@pytest.mark.parametrize("name,vision,version,xattn", [("base", "base_vision_cfg", "base", True),
                                                       ("chat", "chat_vision_cfg", "chat", False)])
def test_hf_export_writes_the_official_config_json(cases, llama, tmp_path, name, vision, version, xattn):
    """BAAI/Emu2 and BAAI/Emu2-Chat ship config.json (EmuConfig: the LLaMA fields, d_model, model_version,
    vision_config); model_version "chat" is what switches the official HF code to its chat template, and the
    official repos set xattn true for Emu2, false for Emu2-Chat."""
    config, vocab = _export(name, cases[vision], llama, tmp_path)
    _assert_official_config(config, cases[vision], llama, vocab)
    assert (config["model_version"], config["vision_config"]["xattn"]) == (version, xattn)


def test_hf_gen_export_writes_the_encoder_config_and_the_official_model_index(cases, llama, tmp_path):
    """BAAI/Emu2-Gen: multimodal_encoder/config.json (the base EmuConfig) and model_index.json naming
    EmuVisualGenerationPipeline and its components (official-format 1)."""
    from emu2.convert.gen import load_official_gen

    configs = tmp_path / "diffusion_config"
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (configs / part).mkdir(parents=True)
        (configs / part / name).write_text(json.dumps(cases["gen_configs"][part]))
    state = read_official_state_dict(FIXTURE / "gen.safetensors")
    encoder_config = config_from_official(cases["base_vision_cfg"], llama, _vocab(state))
    load_official_gen(FIXTURE / "gen.safetensors", encoder_config, load_tokenizer(FIXTURE / "tokenizer"),
                      decoder_config=configs).save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", "official-hf", "--out", str(tmp_path / "hf")]) == 0

    config = json.loads((tmp_path / "hf" / "multimodal_encoder" / "config.json").read_text())
    _assert_official_config(config, cases["base_vision_cfg"], llama, _vocab(state))
    assert config["model_version"] == "base"
    index = json.loads((tmp_path / "hf" / "model_index.json").read_text())
    assert index["_class_name"] == "EmuVisualGenerationPipeline"
    assert index["multimodal_encoder"] == ["transformers_modules.modeling_emu", "EmuForCausalLM"]
    assert index["tokenizer"] == ["transformers", "LlamaTokenizerFast"]
    assert (index["unet"], index["vae"], index["scheduler"]) == (
        ["diffusers", "UNet2DConditionModel"], ["diffusers", "AutoencoderKL"], ["diffusers", "EulerDiscreteScheduler"])
    assert index["safety_checker"] == [None, None]  # no checker in the fixture: a missing part, as diffusers writes it
    for part in ("multimodal_encoder", "unet", "vae", "scheduler", "tokenizer"):
        assert (tmp_path / "hf" / part).is_dir()


def test_hf_export_refuses_a_model_the_official_code_cannot_build(tmp_path):
    """The official EVA-CLIP has a patch-embedding convolution only: a conv-stem encoder has no official
    config, so the export stops with the reason instead of writing a directory the official code would misread."""
    from emu2.pipelines.emu2 import Emu2Pipeline

    Emu2Pipeline.from_preset("shapes").save_pretrained(tmp_path / "ours")
    with pytest.raises(SystemExit, match="emu2: error: .*stem"):
        main(["convert", str(tmp_path / "ours"), "--to", "official-hf", "--out", str(tmp_path / "hf")])
