"""Each stage records the kind of model it writes, so evaluation can follow what the model is."""

from emu2.model.kind import model_kind
from emu2.train.model import build_model

from .conftest import tiny_config


def test_training_records_the_kind_of_model_each_stage_writes(tmp_path):
    """stage1/stage2 write base Emu2, chat writes Emu2-Chat (saved in config.json as model_kind); both have the
    chat vocabulary here (tiny-chat), so only the record tells them apart."""
    for recipe, kind in (("shapes-stage2", "base"), ("shapes-chat", "chat")):
        model, _ = build_model(tiny_config(recipe, tmp_path / recipe))
        assert model_kind(model.config) == kind
