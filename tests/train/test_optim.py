"""Module groups, per-group learning rates, no decay on norms/biases/embeddings, the schedule."""

import math

import pytest
import torch

from emu2.lr_schedule import lr_factor
from emu2.train.model import build_model
from emu2.train.optim import build_optimizer, build_scheduler, clean_name, group_of

from .conftest import tiny_config


def test_wrapper_prefixes_are_ignored_when_naming_groups():
    assert clean_name("module.base_model.model.language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert clean_name("_fsdp_wrapped_module.visual.blocks.0._checkpoint_wrapped_module.attn.qkv.weight") \
        == "visual.blocks.0.attn.qkv.weight"
    assert [group_of(n) for n in ("project_up.weight", "module.project_down.weight", "visual.pos_embed",
                                  "language_model.lm_head.weight")] == ["project", "project", "visual", "lm"]


def test_each_group_gets_its_recipe_learning_rate_and_decay_skips_norms_biases_embeddings(tmp_path):
    config = tiny_config("emu2-stage1", tmp_path)
    model, _ = build_model(config)
    optimizer = build_optimizer(model, config)
    by_group = {(g["group"], g["decay"]): g for g in optimizer.param_groups}
    assert {k[0] for k in by_group} == {"project", "lm", "visual"}
    for (group, decay), g in by_group.items():
        assert g["lr"] == {"project": 1e-4, "lm": 3e-5, "visual": 5e-5}[group]
        assert g["weight_decay"] == (0.05 if decay else 0.0)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for (_, decay), g in by_group.items() if not decay for p in g["params"]}
    assert {"language_model.model.embed_tokens.weight", "visual.pos_embed", "visual.cls_token",
            "language_model.model.norm.weight", "visual.blocks.0.attn.q_bias", "visual.blocks.0.norm1.bias"} <= undecayed
    assert not any(n.endswith(("q_proj.weight", "fc1.weight")) or n == "project_up.weight" for n in undecayed)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_frozen_groups_are_left_out_of_the_optimizer(tmp_path):
    config = tiny_config("shapes-stage2", tmp_path)
    model, _ = build_model(config)
    optimizer = build_optimizer(model, config)
    assert {g["group"] for g in optimizer.param_groups} == {"project", "lm"}
    assert not any(p.requires_grad for p in model.visual.parameters())


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_zero(decay):
    assert [lr_factor(s, 10, 4, decay) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 10, 4, decay) == 0.0
    middle = lr_factor(7, 10, 4, decay)
    assert middle == pytest.approx(0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(5, 10, 0, "constant") == 1.0


def test_scheduler_scales_every_group_from_its_own_peak(tmp_path):
    config = tiny_config("emu2-stage1", tmp_path, overrides=["steps=10", "schedule.warmup_steps=2"])
    model, _ = build_model(config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(4):
        seen.append({g["group"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    peak = {"project": 1e-4, "lm": 3e-5, "visual": 5e-5}
    for step, lrs in enumerate(seen):
        for group, lr in lrs.items():
            assert lr == pytest.approx(peak[group] * lr_factor(step, 10, 2, "cosine"))
    assert seen[2]["project"] / seen[2]["lm"] == pytest.approx(1e-4 / 3e-5)


def test_changing_image_size_interpolates_the_position_embedding(tmp_path):
    config = tiny_config("shapes-stage1", tmp_path)
    config.model.image_size = 112  # tiny: 56 px, patch 14 -> 4x4; 112 px -> 8x8
    model, _ = build_model(config)
    assert model.visual.pos_embed.shape[1] == 1 + 64 and model.config.vision_config.image_size == 112
    assert model.encode_image(torch.randn(1, 3, 112, 112)).shape == (1, 4, 64)
