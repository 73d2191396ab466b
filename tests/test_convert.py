"""Reading official checkpoints: native .bin / .safetensors, the HF sharded layout, the Emu2-Gen native file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from emu2.cli import main
from emu2.config import Emu2Config
from emu2.convert.official import CheckpointMismatchError, load_official
from emu2.model import Emu2ForCausalLM
from emu2.pipelines.emu2 import Emu2Pipeline


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Emu2ForCausalLM(Emu2Config.from_preset("tiny"))


def official_native(model, prefix=""):
    """Our state dict written with the official native names (+ the rotary buffers 4.31 saved)."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("language_model.", "decoder.lm.")
        state[prefix + key] = value.clone()
    for i in range(model.config.text_config.num_hidden_layers):
        state[f"{prefix}decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return state


def official_hf(model):
    state = {}
    for key, value in official_native(model).items():
        state[key if key.startswith("project_") else "model." + key] = value
    return state


def assert_same(model, loaded):
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_native_bin_loads_with_weights_only(model, tmp_path):
    torch.save(official_native(model), tmp_path / "Emu2_pytorch_model.bin")
    assert_same(model, load_official(tmp_path / "Emu2_pytorch_model.bin", model.config))


def test_native_gen_safetensors_multimodal_encoder_part(model, tmp_path):
    state = official_native(model, prefix="multimodal_encoder.")
    state["unet.conv_in.weight"] = torch.zeros(2)  # decoder parts belong to the visual decoder
    state["vae.decoder.conv_out.bias"] = torch.zeros(2)
    save_file(state, tmp_path / "gen.safetensors")
    assert_same(model, load_official(tmp_path / "gen.safetensors", model.config))


def test_hf_sharded_layout_with_index(model, tmp_path):
    state = official_hf(model)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same(model, load_official(tmp_path, model.config))


def test_bf16_checkpoint_loads_without_an_fp32_copy(model, tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in official_native(model).items()}
    save_file(state, tmp_path / "m.safetensors")
    loaded = load_official(tmp_path / "m.safetensors", model.config)
    assert loaded.dtype == torch.bfloat16
    assert loaded.language_model.get_decoder().rotary_emb.inv_freq.dtype == torch.float32


def test_mismatched_official_checkpoint_names_keys(model, tmp_path):
    state = official_native(model)
    del state["project_down.weight"]
    state["visual.head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(state, model.config)
    assert err.value.missing == ["project_down.weight"] and err.value.unexpected == ["visual.head.weight"]


def test_wrong_preset_reports_shape_errors(model):
    chat_config = Emu2Config.from_preset("tiny-chat")
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape keys: .*lm_head.weight: checkpoint \(32272, 64\) vs model \(32274, 64\)"):
        load_official(official_native(model), chat_config)


def test_convert_command_writes_a_loadable_model(model, tmp_path):
    save_file(official_native(model), tmp_path / "official.safetensors")
    main(["convert", str(tmp_path / "official.safetensors"), "--preset", "tiny", "--out", str(tmp_path / "out")])
    pipe = Emu2Pipeline.from_pretrained(tmp_path / "out")
    assert_same(model, pipe.model)
    assert len(pipe.tokenizer) == 32272


# ------------------------------------------------------------------------------ Emu2-Gen and the way back
def _same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _gen_state(pipe):
    state = {f"encoder.{k}": v for k, v in pipe.encoder.model.state_dict().items()}
    for part in ("unet", "vae"):
        state.update({f"{part}.{k}": v for k, v in getattr(pipe.decoder, part).state_dict().items()})
    return state


def test_gen_directory_round_trips_through_the_official_native_file(tmp_path):
    """ours -> official native Gen file (multimodal_encoder.*, unet.*, vae.*) -> ours, with one command each way;
    the decoder's sizes are read from the file, its head counts from the official conf/diffusion_config layout."""
    from emu2.pipelines.gen import Emu2GenPipeline, tiny_decoder_config

    Emu2GenPipeline.from_preset("tiny").save_pretrained(tmp_path / "ours")
    original = Emu2GenPipeline.from_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", "official-native", "--out", str(tmp_path / "official")]) == 0
    (native,) = (tmp_path / "official").iterdir()
    config = tmp_path / "diffusion_config"
    for part, values in tiny_decoder_config(original.encoder.model.config.vision_config.width).items():
        (config / part).mkdir(parents=True)
        (config / part / "config.json").write_text(json.dumps(values))
    assert main(["convert", str(native), "--preset", "tiny", "--decoder-config", str(config),
                 "--out", str(tmp_path / "back")]) == 0
    _same_tensors(_gen_state(original), _gen_state(Emu2GenPipeline.from_pretrained(tmp_path / "back")))


def test_gen_directory_round_trips_through_the_official_hf_layout(tmp_path):
    """ours -> BAAI/Emu2-Gen diffusers layout (multimodal_encoder/, unet/, vae/, scheduler/, tokenizer/) -> ours."""
    from emu2.pipelines.gen import Emu2GenPipeline

    Emu2GenPipeline.from_preset("tiny").save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", "official-hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), "--preset", "tiny", "--out", str(tmp_path / "back")]) == 0
    _same_tensors(_gen_state(Emu2GenPipeline.from_pretrained(tmp_path / "ours")),
                  _gen_state(Emu2GenPipeline.from_pretrained(tmp_path / "back")))


@pytest.mark.parametrize("to", ["official-native", "official-hf"])
def test_chat_directory_round_trips_through_the_official_layouts(tmp_path, to):
    """ours -> official (native file / HF shards with model.* and root project_* names) -> ours, bit-identical."""
    Emu2Pipeline.from_preset("tiny-chat").save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), "--to", to, "--out", str(tmp_path / "official")]) == 0
    source = tmp_path / "official"
    if to == "official-native":
        (source,) = source.iterdir()
        assert source.name == "Emu2-Chat_pytorch_model.bin"
    assert main(["convert", str(source), "--preset", "tiny-chat", "--out", str(tmp_path / "back")]) == 0
    _same_tensors(Emu2Pipeline.from_pretrained(tmp_path / "ours").model.state_dict(),
                  Emu2Pipeline.from_pretrained(tmp_path / "back").model.state_dict())


def test_hf_export_uses_the_official_hf_key_names(model, tmp_path):
    """HF EmuForCausalLM: model.visual.*, model.decoder.lm.*, and project_up/down at the root."""
    Emu2Pipeline(model, Emu2Pipeline.from_preset("tiny").tokenizer).save_pretrained(tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), "--to", "official-hf", "--out", str(tmp_path / "hf")])
    names = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(names) == sorted(official_hf(model))


def test_reading_an_official_checkpoint_needs_a_preset(tmp_path):
    with pytest.raises(SystemExit, match="--preset is required"):
        main(["convert", str(tmp_path / "x.bin"), "--out", str(tmp_path / "out")])
