"""Emu2ForCausalLM: splicing, the unified objective's masks and gradients, generation, save/load."""

import pytest
import torch

from emu2.config import Emu2Config
from emu2.convert.official import CheckpointMismatchError
from emu2.model import Emu2ForCausalLM, SlotCountError

BOS, EOS, BOI, EOI, IMG = 1, 2, 32001, 32002, 32003


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Emu2ForCausalLM(Emu2Config.from_preset("tiny"))


def image_block(q=4):
    return [BOI] + [IMG] * q + [EOI]


def batch_with_two_images(model):
    """<s> text [IMG] q slots [/IMG] text [IMG] q slots [/IMG] </s>; second image is the regression target."""
    ids = torch.tensor([[BOS, 450, 4996] + image_block() + [17354] + image_block() + [EOS]])
    S = model.config.vision_config.image_size
    images = torch.randn(2, 3, S, S)
    labels = ids.clone()
    labels[ids == IMG] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=images, labels=labels,
                image_is_target=torch.tensor([False, True]))


def test_image_features_replace_exactly_the_image_slots(model):
    batch = batch_with_two_images(model)
    feats = model.encode_image(batch["images"])
    embeds = model.embed(batch["input_ids"], feats)
    plain = model.get_input_embeddings()(batch["input_ids"])
    slots = batch["input_ids"][0] == IMG
    assert torch.allclose(embeds[0, slots], model.project_up(feats).reshape(-1, embeds.shape[-1]))
    assert torch.equal(embeds[0, ~slots], plain[0, ~slots])


def test_slot_count_mismatch_names_both_counts(model):
    batch = batch_with_two_images(model)
    with pytest.raises(SlotCountError, match="8 image slot tokens but 1 image"):
        model(batch["input_ids"], images=batch["images"][:1])


def test_loss_is_weighted_sum_of_text_and_regression(model):
    model.config.text_loss_weight, model.config.regression_loss_weight = 0.5, 2.0
    out = model(**batch_with_two_images(model))
    assert out.num_text_targets == 8  # text + [IMG]/[/IMG] + </s>, minus the first token which nothing predicts
    assert out.num_regression_targets == 4  # only the target image's 4 slots
    assert torch.allclose(out.loss, 0.5 * out.text_loss + 2.0 * out.regression_loss)


def test_regression_predicts_each_slot_from_the_previous_position(model):
    batch = batch_with_two_images(model)
    out = model(**batch)
    feats = model.encode_image(batch["images"])
    slots = (batch["input_ids"][0] == IMG).nonzero().flatten()[4:]  # second image
    predicted = model.project_down(out.last_hidden_state[0, slots - 1])
    manual = torch.nn.functional.mse_loss(predicted, feats[1])
    assert torch.allclose(out.regression_loss, manual, atol=1e-6)


def test_text_loss_ignores_unsupervised_positions(model):
    batch = batch_with_two_images(model)
    batch["labels"][:, :-1] = -100  # only </s> supervised
    out = model(**batch)
    assert out.num_text_targets == 1
    logits = model.language_model.get_output_embeddings()(out.last_hidden_state[0, -2])
    assert torch.allclose(out.text_loss, torch.nn.functional.cross_entropy(logits[None], torch.tensor([EOS])))


def _visual_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return model.visual.patch_embed.proj.weight.grad.clone()


def test_regression_targets_are_detached_encoder_embeddings(model):
    batch = batch_with_two_images(model)
    batch["labels"][:] = -100  # regression only
    ours = _visual_grad(model, model(**batch).loss)

    def manual_loss(detach):
        feats = model.encode_image(batch["images"])
        hidden = model.language_model.get_decoder()(inputs_embeds=model.embed(batch["input_ids"], feats)).last_hidden_state
        slots = (batch["input_ids"][0] == IMG).nonzero().flatten()[4:]
        target = feats[1].detach() if detach else feats[1]
        return torch.nn.functional.mse_loss(model.project_down(hidden[0, slots - 1]), target)

    assert torch.allclose(ours, _visual_grad(model, manual_loss(detach=True)), atol=1e-7)
    assert not torch.allclose(ours, _visual_grad(model, manual_loss(detach=False)), atol=1e-7)


def test_frozen_encoder_and_lm_layers_get_no_gradient(model):
    model.visual.requires_grad_(False)
    model.language_model.get_input_embeddings().requires_grad_(False)
    out = model(**batch_with_two_images(model))
    out.loss.backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.language_model.get_input_embeddings().weight.grad is None
    assert model.project_up.weight.grad.abs().sum() > 0
    assert model.project_down.weight.grad.abs().sum() > 0


def test_text_only_batch_has_no_regression_term(model):
    ids = torch.tensor([[BOS, 450, 4996, EOS]])
    out = model(ids, labels=ids)
    assert out.num_regression_targets == 0 and out.regression_loss.item() == 0
    assert out.loss.item() == pytest.approx(out.text_loss.item())


def test_generate_text_returns_only_new_tokens(model):
    ids = torch.tensor([[BOS, 450, 4996]])
    out = model.generate_text(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3)


def test_kv_cached_regression_equals_full_recompute(model):
    from emu2.bench.regression import official_recompute_regression

    ids = torch.tensor([[BOS, 450, 4996, 17354]])
    assert torch.allclose(model.regress_image_embeddings(ids), official_recompute_regression(model, ids), atol=1e-5)


def test_left_padded_batch_regresses_like_single_prompts(model):
    a, b = [BOS, 450, 4996, 17354, 1701], [BOS, 450]
    batch = torch.tensor([a, [32000] * 3 + b])
    out = model.regress_image_embeddings(batch, attention_mask=(batch != 32000).long())
    assert torch.allclose(out[0], model.regress_image_embeddings(torch.tensor([a]))[0], atol=1e-5)
    assert torch.allclose(out[1], model.regress_image_embeddings(torch.tensor([b]))[0], atol=1e-5)


def test_save_and_load_round_trip_sharded(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = Emu2ForCausalLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_load_in_bf16_gives_bf16_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert Emu2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("project_up.weight")
    state["not_a_model_key.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        Emu2ForCausalLM.from_pretrained(tmp_path)
    assert err.value.missing == ["project_up.weight"]
    assert err.value.unexpected == ["not_a_model_key.weight"]


def test_other_llama_family_backbone_builds_through_auto_classes():
    from transformers import Qwen2Config

    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32272)
    config = Emu2Config.from_preset("tiny", text_config=text)
    model = Emu2ForCausalLM(config)
    ids = torch.tensor([[BOS] + image_block() + [EOS]])
    out = model(ids, images=torch.randn(1, 3, 56, 56), labels=ids, image_is_target=torch.tensor([True]))
    assert torch.isfinite(out.loss)


def test_device_map_loading(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = Emu2ForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"


def test_auto_classes_load_a_saved_model_as_the_official_readme_loads_emu2(tmp_path):
    """Official README: `AutoModelForCausalLM.from_pretrained(path, ...)`; importing emu2.model registers
    Emu2Config / Emu2ForCausalLM with AutoConfig / AutoModelForCausalLM (no remote code needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from emu2.config import Emu2Config
    from emu2.model import Emu2ForCausalLM

    torch.manual_seed(0)
    model = Emu2ForCausalLM(Emu2Config.from_preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Emu2Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Emu2ForCausalLM)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


class _OneDevicePerOp(torch.overrides.TorchFunctionMode):
    """Refuses any op whose (non-scalar) tensor arguments live on different devices, as CUDA does; lets a CPU
    test stand in "meta" for a second device (meta kernels themselves accept mixed devices)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.dim()}
        if len(devices) > 1:
            raise RuntimeError(f"{func} got tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_splice_moves_projected_features_to_the_embeddings_device_as_official():
    """Official `EmuModel.generate`: `text_embeds[image_idx] = prompt_image_embeds.to(text_embeds.device)`,
    so a model whose embedding table sits on another device than the vision encoder (device_map="auto")
    works. Here the embedding table is on "meta" (its inputs moved there by a hook, as accelerate's are) and the
    vision side on CPU; the mode above makes a cross-device op fail as on GPUs. It catches a splice that leaves
    the features or the slot mask on the vision side's device; it does not run real multi-GPU kernels."""
    torch.manual_seed(0)
    config = Emu2Config.from_preset("tiny")
    model = Emu2ForCausalLM(config).eval()
    table = model.get_input_embeddings().to("meta")
    table.register_forward_pre_hook(lambda module, args: (args[0].to("meta"),))
    n = config.n_query
    input_ids = torch.tensor([[1, config.boi_token_id, *[config.image_token_id] * n, config.eoi_token_id, 5]])
    features = torch.randn(1, n, config.vision_config.width, dtype=torch.float64)  # another dtype as well
    with _OneDevicePerOp():
        embeds = model.embed(input_ids, features)
    assert embeds.device.type == "meta" and embeds.dtype == table.weight.dtype
    assert embeds.shape == (1, n + 4, config.text_config.hidden_size)
