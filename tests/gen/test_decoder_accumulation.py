"""Gradient accumulation in decoder training: an optimizer step over micro-batches is one step over their union
(the MSE is a per-sample mean, so equal-sized micro-batches are averaged with equal weights)."""

import math
import random

import numpy as np
import PIL.Image
import pytest
import torch

from emu2.data.decoder_shards import prepare_decoder_batch
from emu2.train.stages.diffusion import accumulated_update, decoder_loss, freeze_for_decoder_training

from . import tiny

Q, BATCH = 4, 4  # the whole batch; accumulation splits it in two micro-batches of 2



@pytest.fixture(scope="module")
def fixed():
    """A batch of 16 px crops with per-sample embeddings, noise and timesteps fixed up front, so that a sample
    sees the same draws whichever micro-batch it lands in."""
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(BATCH)]
    batch = prepare_decoder_batch(images, 16, random.Random(0))
    batch["encoder_inputs"] = torch.arange(BATCH)  # rows of the embedding table below
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(BATCH, Q, tiny.WIDTH, generator=generator)
    noise = torch.randn(BATCH, 3, 16, 16, generator=generator)  # pixel space: latents are the pixels
    timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
    return batch, embeddings, noise, timesteps


def _one_step(fixed, micro_batches: int, max_grad_norm: float):
    """One optimizer step from the same initial UNet over ``micro_batches`` equal slices of the fixed batch:
    (returned loss, micro-batch losses, gradients after clipping, parameters)."""
    batch, embeddings, noise, timesteps = fixed
    # float64: AdamW's first step divides each gradient entry by its magnitude (+ eps 1e-8), so float32 rounding
    # of entries near 1e-9 moved single weights by 7e-6 here even though the gradients agree.
    pipe = tiny.pipeline(pixel_space=True, seed=0)
    pipe.unet.double()
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-4)
    size = BATCH // micro_batches
    parts = [slice(i, i + size) for i in range(0, BATCH, size)]
    micro_losses = []

    def losses():  # lazily, as the stages draw them
        for part in parts:
            loss = decoder_loss(
                pipe, {k: v[part] for k, v in batch.items()}, lambda index: embeddings[index],
                condition_drop_prob=0.0, noise_offset=0.0, noise=noise[part], timesteps=timesteps[part],
            )
            micro_losses.append(loss.item())
            yield loss

    loss = accumulated_update(pipe.unet, losses(), optimizer, micro_batches=micro_batches,
                              max_grad_norm=max_grad_norm)
    grads = {n: p.grad.clone() for n, p in pipe.unet.named_parameters()}
    return loss, micro_losses, grads, {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


@pytest.mark.parametrize("max_grad_norm", [math.inf, 1e-3], ids=["unclipped", "clipped"])
def test_two_accumulated_micro_batches_update_the_unet_like_one_batch_of_both(fixed, max_grad_norm):
    whole_loss, _, whole_grads, whole_params = _one_step(fixed, 1, max_grad_norm)
    loss, micro_losses, grads, params = _one_step(fixed, 2, max_grad_norm)

    assert len(micro_losses) == 2 and micro_losses[0] != micro_losses[1]
    assert loss == sum(micro_losses) / 2  # the step's loss is the mean over its micro-batches ...
    assert loss == pytest.approx(whole_loss, rel=1e-6)  # ... which is the whole batch's loss
    # Unclipped, the gradients themselves agree (a wrong weighting of the micro-batches would scale them);
    # clipped, the accumulated gradient is clipped once, as a whole.
    if max_grad_norm < math.inf:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert norm.item() == pytest.approx(max_grad_norm, rel=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-6, atol=1e-12)
    worst = max((params[n] - whole_params[n]).abs().max().item() for n in params)
    assert worst < 1e-9, worst  # measured 1e-16
    before = tiny.pipeline(pixel_space=True, seed=0).unet.double().state_dict()
    assert all(not torch.equal(params[n], before[n]) for n in params)  # the step did update the UNet


def test_a_non_finite_micro_batch_loss_stops_before_the_update():
    pipe = tiny.pipeline(pixel_space=True, seed=0)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-4)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    finite = sum(p.sum() for p in pipe.unet.parameters()) * 0.0 + 1.0
    nan = sum(p.sum() for p in pipe.unet.parameters()) * float("nan")  # as a diverged model's: with its graph
    loss = accumulated_update(pipe.unet, iter([finite, nan]), optimizer, micro_batches=2)
    assert math.isnan(loss)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_the_full_scale_recipe_reaches_the_papers_batch_in_micro_batches():
    from emu2.train.config import load_config
    from emu2.train.stages.decoder import micro_batch_sizes_per_stream

    config = load_config("emu2-decoder")
    assert config.data.streams["images"].batch_size == 2048  # Table 6, per optimizer step
    assert micro_batch_sizes_per_stream(config) == {"images": 2048 // config.gradient_accumulation_steps}
