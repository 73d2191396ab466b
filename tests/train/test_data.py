"""The recipe's data section -> batches: per-stream global batch sizes split over ranks and accumulation."""

import pytest

from emu2.config import Emu2Config
from emu2.train.config import load_config
from emu2.train.data import build_data

from .test_distributed import RECIPE


def test_each_micro_step_takes_one_batch_per_stream_of_its_share_of_the_global_batch(shapes_dir, tmp_path):
    config = load_config("shapes-stage2", [f"data.root={shapes_dir}", "gradient_accumulation_steps=2",
                                           "data.streams.pairs.batch_size=8", "data.streams.videos.batch_size=4",
                                           "data.streams.interleaved.batch_size=4", "data.streams.text.batch_size=4",
                                           "data.max_length=256", "data.shuffle_buffer=4"])
    import emu2.processing as P

    data = build_data(config, Emu2Config.from_preset("tiny-chat"), P.load_tokenizer(instruct=True), rank=1,
                      world_size=2)
    assert data.micro_batches_per_step == 8  # 2 accumulation steps x 4 streams
    batches = iter(data)
    sizes = [next(batches)["input_ids"].shape[0] for _ in range(8)]
    assert sizes == [2, 1, 1, 1] * 2  # global / (2 ranks x 2 micro-steps)
    state = data.state_dict()
    assert set(state["streams"]) == {"pairs", "videos", "interleaved", "text"}
    assert state["streams"]["pairs"]["rank"] == 1 and state["streams"]["pairs"]["world_size"] == 2


def test_a_global_batch_that_does_not_split_evenly_is_an_error():
    config = load_config(dict(RECIPE), ["output_dir=x", "gradient_accumulation_steps=3"])
    with pytest.raises(ValueError, match=r"batch_size=4 is not a positive multiple of world_size \(1\) x "
                                         r"gradient_accumulation_steps \(3\)"):
        build_data(config, Emu2Config.from_preset("tiny"), tokenizer=None)


def test_packing_fills_each_row_with_samples_up_to_max_length(shapes_dir):
    import emu2.processing as P

    overrides = [f"data.root={shapes_dir}", "data.max_length=256", "data.shuffle_buffer=4"]
    lengths = {}
    for packing in (False, True):
        config = load_config("shapes-lm", [*overrides, f"data.packing={str(packing).lower()}"])
        batch = next(iter(build_data(config, Emu2Config.from_preset("shapes"), P.load_tokenizer(
            P.preset_tokenizer("shapes"), instruct=True))))
        lengths[packing] = batch["attention_mask"].sum(1)
    assert lengths[True].max() <= 256
    assert lengths[True].float().mean() > 2 * lengths[False].float().mean()  # several documents a row
