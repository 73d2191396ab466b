"""Recipes: every packaged YAML loads and validates; overrides are typed; mistakes get clear errors."""

import pytest

from emu2.train.cli import main
from emu2.train.config import ConfigError, load_config, recipe_names

SHAPES = ["shapes-lm", "shapes-stage1", "shapes-stage2", "shapes-chat", "shapes-gen", "shapes-decoder"]
FULL = ["emu2-stage1", "emu2-stage1-448", "emu2-stage2", "emu2-chat", "emu2-gen", "emu2-gen-qft", "emu2-decoder"]


def test_every_stage_has_a_full_scale_and_a_shapes_recipe():
    assert set(SHAPES + FULL) <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_packaged_recipe_loads_and_validates(name):
    config = load_config(name)
    assert config.description and config.steps > 0 and config.output_dir
    assert config.stage in name or name.endswith(("-448", "-qft"))
    if config.stage != "decoder":
        for stream in config.data.streams.values():
            assert stream.sources and stream.batch_size > 0



@pytest.mark.parametrize("stage,previous", [
    ("shapes-stage2", "shapes-stage1"), ("shapes-chat", "shapes-stage2"), ("shapes-gen", "shapes-stage2"),
    ("shapes-decoder", "shapes-stage1"), ("emu2-stage1-448", "emu2-stage1"), ("emu2-stage2", "emu2-stage1-448"),
    ("emu2-chat", "emu2-stage2"), ("emu2-gen", "emu2-stage2"), ("emu2-gen-qft", "emu2-gen"),
    ("emu2-decoder", "emu2-stage1-448"),
])
def test_each_stage_starts_from_the_previous_stage_output(stage, previous):
    assert load_config(stage).model.init_from == load_config(previous).output_dir


def test_full_scale_recipes_carry_the_paper_hyperparameters():
    s1 = load_config("emu2-stage1")
    assert s1.optim.lr == {"project": 1e-4, "lm": 3e-5, "visual": 5e-5} and s1.optim.freeze == []
    assert (s1.optim.grad_clip, s1.schedule.warmup_ratio, s1.steps) == (5.0, 0.02, 35200)
    assert {n: s.batch_size for n, s in s1.data.streams.items()} == {"image_text": 6144, "video_text": 768}
    assert s1.data.sequence["stage"] == 1 and s1.model.image_size == 224
    assert load_config("emu2-stage1-448").model.image_size == 448
    s2 = load_config("emu2-stage2")
    assert s2.optim.freeze == ["visual"] and set(s2.optim.lr.values()) == {1e-5}
    assert [s.batch_size for s in s2.data.streams.values()] == [12800, 6400, 3200, 800]
    assert (s2.schedule.warmup_ratio, s2.steps) == (0.1, 20350)
    chat = load_config("emu2-chat")
    assert (chat.steps, chat.schedule.warmup_steps, chat.optim.grad_clip, chat.data.max_length) == (8000, 100, 5.0, 2048)
    assert chat.model.config_overrides == {"instruct": True, "n_query": 256}
    assert sum(s.batch_size for s in chat.data.streams.values()) == 768
    gen = load_config("emu2-gen")
    assert (gen.steps, gen.optim.grad_clip, gen.schedule.warmup_ratio) == (3000, 1.0, 0.0)
    assert sorted(s.batch_size for s in gen.data.streams.values()) == [2048, 3584, 4096]
    assert load_config("emu2-gen-qft").steps == 900
    decoder = load_config("emu2-decoder")
    assert (decoder.steps, decoder.optim.betas, decoder.optim.weight_decay) == (8000, [0.9, 0.999], 0.01)
    assert decoder.decoder.cfg_drop_prob == 0.1 and decoder.decoder.noise_offset == 0.1
    for name in FULL:
        c = load_config(name)
        assert c.mixed_precision == "bf16" and c.optim.eps in (1e-6, 1e-8)


def test_overrides_set_nested_values_with_their_types():
    config = load_config("shapes-stage2", ["steps=7", "optim.lr.lm=1e-4", "optim.betas=[0.9, 0.95]",
                                           "data.streams.pairs.sources.1.weight=2", "optim.grad_clip=null",
                                           "model.config_overrides.n_query=4"])
    assert config.steps == 7 and config.optim.lr["lm"] == 1e-4 and config.optim.betas == [0.9, 0.95]
    assert config.data.streams["pairs"].sources[1].weight == 2.0 and config.optim.grad_clip is None
    assert config.model.config_overrides == {"n_query": 4}


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "did you mean 'lr'"),
    ("stepz=3", "did you mean 'steps'"),
    ("steps=many", "steps must be int"),
    ("optim.freeze=[vision]", "unknown module group 'vision'"),
    ("optim.lr={project: 1e-4}", "no learning rate for trained group(s) ['lm', 'visual']"),
    ("schedule.decay=exponential", "schedule.decay must be one of"),
    ("data.streams.pairs.sources.0.kind=photos", "'photos' is not one of"),
    ("data.streams.pairs.sources.5.weight=1", "not an index of a list of 1 items"),
    ("steps", "must look like key=value"),
])
def test_mistakes_are_errors_that_say_what_to_change(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("shapes-stage1", [override])
    assert message in str(err.value)


def test_an_unknown_recipe_name_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="did you mean shapes-stage1"):
        load_config("shapes-stag1")


def test_cli_lists_recipes_and_prints_the_resolved_config(capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "emu2-stage1" in listing and "shapes-gen" in listing
    assert main(["shapes-chat", "steps=3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 3" in printed and "n_query: 64" in printed


def test_a_decoder_stage_refuses_recipe_fields_it_does_not_use():
    with pytest.raises(ConfigError) as err:
        load_config("shapes-decoder", ["lora.enabled=true", "optim.freeze=[visual]", "data.max_length=256",
                                       "model.activation_checkpointing=true", "optim.lr.lm=1e-4"])
    for field in ("lora.enabled", "optim.freeze", "data.max_length", "model.activation_checkpointing", "optim.lr"):
        assert field in str(err.value)
    assert "decoder.gradient_checkpointing" in str(err.value)


def test_the_decoder_section_is_typed_and_each_decoder_stage_takes_only_its_own_fields():
    with pytest.raises(ConfigError, match=r"decoder\.output_image_size must be int"):
        load_config("shapes-decoder", ["decoder.output_image_size=large"])
    with pytest.raises(ConfigError) as err:
        load_config("shapes-decoder", ["decoder.num_frames=4", "decoder.pixel_scale=3"])
    assert "decoder.num_frames is not used by stage decoder" in str(err.value)
    assert "pixel_scale 3 must divide decoder.output_image_size 64" in str(err.value)
    with pytest.raises(ConfigError, match="decoder.streaming is not used by stage video-decoder"):
        load_config("shapes-video-decoder", ["decoder.streaming=true"])
    with pytest.raises(ConfigError, match="read by the decoder stages only, not stage: stage1"):
        load_config("shapes-stage1", ["decoder.noise_offset=0.2"])
