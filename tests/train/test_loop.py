"""The training loop: every stage learns, frozen groups stay fixed, the loss is normalised by counted targets,
runs resume exactly, corrupted checkpoints are skipped, NaN stops the run, the output is a pipeline directory."""

import json

import pytest
import torch

from emu2.data.sequence import collate
from emu2.model import Emu2ForCausalLM
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.train import TrainingDiverged, train
from emu2.train.checkpoint import list_checkpoints, verify
from emu2.train.data import build_data
from emu2.train.metrics import read_metrics
from emu2.train.model import build_model
from emu2.train.stages.lm import build_accelerator, prepare_model_and_optimizer, train_step

from .conftest import FixedBatches, tiny_config


def _first_window(config):
    model, tokenizer = build_model(config)
    data = build_data(config, model.config, tokenizer)
    batches = iter(data)
    return [next(batches) for _ in range(data.micro_batches_per_step)]


@pytest.mark.parametrize("recipe", ["shapes-lm", "shapes-lm-long", "shapes-stage1", "shapes-stage2", "shapes-chat",
                                    "shapes-gen"])
def test_each_stage_recipe_reduces_the_loss_on_a_fixed_batch(recipe, shapes_dir, tmp_path):
    config = tiny_config(recipe, tmp_path, shapes_dir, overrides=[
        "steps=6", "schedule.warmup_steps=0", "schedule.decay=constant", "optim.grad_clip=1.0"])
    config.optim.lr = {group: 3e-3 for group in config.optim.lr}
    window = _first_window(config)
    train(config, data=FixedBatches(window))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.9, losses
    record = read_metrics(tmp_path)[0]
    if recipe == "shapes-lm":  # language-only documents: text loss on every token, no image anywhere
        assert record["regression_targets"] == 0 and all(len(b["images"]) == len(b["frames"]) == 0 for b in window)
    if recipe == "shapes-lm-long":  # rows packed with several documents, each from its own <s>
        bos = Emu2Pipeline.from_preset("tiny-chat").tokenizer.bos_token_id
        assert all((b["input_ids"] == bos).sum() > 1 for b in window)
    if recipe == "shapes-stage1":  # captions only, no regression (paper 2.2.2)
        assert record["regression_targets"] == 0 and record["text_targets"] > 0
    if recipe == "shapes-gen":  # regression only, on the last image of each sample (2.3.2)
        n_samples = sum(b["input_ids"].shape[0] for b in window)
        assert record["text_targets"] == 0 and record["regression_targets"] == n_samples * 4
    if recipe == "shapes-stage2":
        assert record["regression_targets"] > 0 and record["text_targets"] > 0


def test_frozen_groups_do_not_change_and_trained_ones_do(shapes_dir, tmp_path):
    config = tiny_config("shapes-stage2", tmp_path, shapes_dir, overrides=["steps=2"])
    before, _ = build_model(config)
    train(config)
    after = Emu2ForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        changed = not torch.equal(a, b)
        assert changed == (not name.startswith("visual.")), name


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(shapes_dir, tmp_path):
    """Token/slot-normalised over the step (not a mean of per-micro-batch means)."""
    config = tiny_config("shapes-stage2", tmp_path, shapes_dir, batch_size=2, overrides=["optim.grad_clip=null"])
    window = _first_window(config)  # 4 streams x 2 samples, very different token counts
    model, _ = build_model(config)
    accelerator = build_accelerator(config)
    model, optimizer = prepare_model_and_optimizer(accelerator, model, config)

    def gradients(batches):
        captured = {}
        optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        train_step(model, optimizer, batches, accelerator, config)
        return captured

    split = gradients(window)
    samples = [_unbatch(b, i) for b in window for i in range(b["input_ids"].shape[0])]
    whole = gradients([collate(samples, pad_id=32000)])
    assert split.keys() == whole.keys() and split
    for name in split:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def _unbatch(batch, i):
    from emu2.data.sequence import Sample

    n = int(batch["attention_mask"][i].sum())
    q = 4  # tiny n_query
    per_row = [int((batch["input_ids"][r] == 32003).sum()) // q for r in range(batch["input_ids"].shape[0])]
    first = sum(per_row[:i])
    images = list(batch["images"][first:first + per_row[i]])
    frame_rows = [int((batch["input_ids"][r] == 32004).sum()) // q for r in range(batch["input_ids"].shape[0])]
    f0 = sum(frame_rows[:i])
    return Sample(batch["input_ids"][i, :n], batch["labels"][i, :n], images,
                  batch["image_is_target"][first:first + per_row[i]].tolist(),
                  list(batch["frames"][f0:f0 + frame_rows[i]]), batch["frame_is_target"][f0:f0 + frame_rows[i]].tolist(),
                  "any", batch["images"].shape[-1])


class CrashAfter:
    """Delegates to the recipe's data, then fails like a killed job after ``limit`` micro-batches."""

    def __init__(self, data, limit):
        self.data, self.limit = data, limit
        self.micro_batches_per_step = data.micro_batches_per_step

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i == self.limit:
                raise KeyboardInterrupt("simulated crash")
            yield batch

    def state_dict(self):
        return self.data.state_dict()


def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(shapes_dir, tmp_path):
    overrides = ["steps=5", "checkpoint.every=2", "checkpoint.keep_last=5"]
    straight = tiny_config("shapes-stage2", tmp_path / "straight", shapes_dir, overrides=overrides)
    train(straight)

    resumed = tiny_config("shapes-stage2", tmp_path / "resumed", shapes_dir, overrides=overrides)
    model, tokenizer = build_model(resumed)
    data = build_data(resumed, model.config, tokenizer)
    with pytest.raises(KeyboardInterrupt):  # dies in step 4, after the checkpoint of step 2
        train(resumed, data=CrashAfter(data, limit=3 * data.micro_batches_per_step + 1))
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [2]
    train(resumed, resume=True)

    a = Emu2ForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = Emu2ForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    curve = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")] == curve
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5]


def test_a_corrupted_latest_checkpoint_is_detected_and_the_previous_used(shapes_dir, tmp_path):
    config = tiny_config("shapes-stage1", tmp_path, shapes_dir, overrides=["steps=3", "checkpoint.every=1"])
    train(config, stop_after=2)
    latest = tmp_path / "checkpoints" / "step-00000002"
    assert verify(latest) is None
    weights = next((latest / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in verify(latest)

    with pytest.warns(RuntimeWarning, match="step-00000002 is unusable .* falling back"):
        summary = train(config, resume=True)
    assert summary["step"] == 3 and summary["finished"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # step 2 was redone from step 1


def test_an_unfinished_save_is_never_taken_for_a_checkpoint(shapes_dir, tmp_path):
    config = tiny_config("shapes-stage1", tmp_path, shapes_dir, overrides=["steps=2", "checkpoint.every=1"])
    train(config, stop_after=1)
    # A crash while writing step 2: the files are in the temporary directory, the manifest never written.
    crashed = tmp_path / "checkpoints" / ".tmp-step-00000002"
    crashed.mkdir()
    (crashed / "optimizer.pt").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert train(config, resume=True)["step"] == 2
    assert not crashed.exists()


def test_a_nan_loss_stops_the_run_with_a_message_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path):
    config = tiny_config("shapes-stage2", tmp_path, shapes_dir, overrides=["steps=4", "checkpoint.every=1"])
    window = _first_window(config)
    poisoned = [{k: v.clone() for k, v in b.items()} for b in window]
    for b in poisoned:
        b["images"].fill_(float("nan"))

    class PoisonAtStep3(FixedBatches):
        def __iter__(self):
            for _ in range(2):
                yield from self.window
            yield from poisoned

    with pytest.raises(TrainingDiverged) as err:
        train(config, data=PoisonAtStep3(window))
    message = str(err.value)
    assert "step 3" in message and "nan" in message and "step-00000002" in message
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 1]
    assert verify(tmp_path / "checkpoints" / "step-00000002") is None
    weights = torch.load(tmp_path / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert all(torch.isfinite(s["exp_avg"]).all() for s in weights["state"].values())
    assert not (tmp_path / "config.json").exists()  # no stage output from a diverged run


def test_a_fresh_run_refuses_to_overwrite_checkpoints(shapes_dir, tmp_path):
    config = tiny_config("shapes-stage1", tmp_path, shapes_dir, overrides=["steps=1"])
    train(config)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)


def test_the_stage_output_is_a_pipeline_directory_the_next_stage_starts_from(shapes_dir, tmp_path):
    first = tiny_config("shapes-stage1", tmp_path / "stage1", shapes_dir, overrides=["steps=1"])
    train(first)
    pipe = Emu2Pipeline.from_pretrained(tmp_path / "stage1")
    assert (tmp_path / "stage1" / "train_config.yaml").is_file()
    second = tiny_config("shapes-stage2", tmp_path / "stage2", shapes_dir, overrides=["steps=1"])
    second.model.init_from, second.model.preset = str(tmp_path / "stage1"), None
    model, _ = build_model(second)
    for (name, a), b in zip(pipe.model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    metrics = json.loads((tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "text_loss", "regression_loss", "lr/lm", "tokens_per_s", "grad_norm"} <= set(metrics)


def test_lora_trains_adapters_only_and_merges_them_on_save(shapes_dir, tmp_path):
    config = tiny_config("shapes-chat", tmp_path, shapes_dir, overrides=[
        "steps=2", "lora.enabled=true", "lora.r=4", "checkpoint.every=1", "optim.lr.lm=1e-2"])
    before, _ = build_model(tiny_config("shapes-chat", tmp_path / "x", shapes_dir))
    train(config)
    after = Emu2ForCausalLM.from_pretrained(tmp_path)  # strict load: merged, no peft keys left
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    gate = "language_model.model.layers.0.mlp.gate_proj.weight"
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert not torch.equal(b[q], a[q]) and torch.equal(b[gate], a[gate])
    assert torch.equal(b["visual.pos_embed"], a["visual.pos_embed"])
    adapter = tmp_path / "checkpoints" / "step-00000002" / "model" / "adapter_model.safetensors"
    assert adapter.is_file() and verify(adapter.parent.parent) is None


def test_activation_checkpointing_gives_the_same_training(shapes_dir, tmp_path):
    results = []
    for checkpointing in (False, True):
        config = tiny_config("shapes-stage2", tmp_path / str(checkpointing), shapes_dir, overrides=["steps=2"])
        config.model.activation_checkpointing = checkpointing
        train(config)
        results.append([r["loss"] for r in read_metrics(tmp_path / str(checkpointing))])
    assert results[0] == pytest.approx(results[1], rel=1e-5)
