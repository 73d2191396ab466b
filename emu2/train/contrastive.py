"""Stage 0 for a vision encoder that starts random: CLIP-style image-caption contrastive pre-training.

Emu2 starts from EVA-CLIP, a vision encoder already trained contrastively on image-text pairs (paper 2.1), so its
stage 1 only has to teach the language model to read features that already name colours, shapes and places. A
model of a new size (the shapes presets) has no such encoder; captioning alone teaches a random ViT slowly, because
the caption loss is mostly spent on the language prior. This stage gives it the missing pre-training on the same
image-caption pairs stage 1 uses: an InfoNCE loss between the encoder's ``n_query`` visual embeddings (flattened,
so positions count) and a bag-of-words embedding of the caption.

Only ``visual`` is trained; the output directory is a full Emu2 model directory (the language model untouched),
which stage 1 then loads through ``model.init_from``.

Tensor shapes: images (B, 3, S, S) -> visual embeddings (B, n_query, Dv) -> image vectors (B, D);
caption token ids (B, L) with a 0/1 mask (B, L) -> text vectors (B, D); logits (B, B).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig


class CaptionContrast(nn.Module):
    """The two small heads of the contrastive objective (discarded after the stage)."""

    def __init__(self, vocab_size: int, n_query: int, vision_width: int, dim: int = 128):
        super().__init__()
        self.words = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.image = nn.Linear(n_query * vision_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, Q, Dv); ids, mask (B, L) caption tokens -> symmetric InfoNCE loss (scalar)."""
        image = F.normalize(self.image(features.flatten(1)), dim=-1)
        offsets = torch.cat([mask.new_zeros(1), mask.sum(1).cumsum(0)[:-1]]).long()
        text = F.normalize(self.words(ids[mask.bool()], offsets), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def caption_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised caption tokens of a stage-1 pairs batch: (ids, mask), both (B, L)."""
    labels = batch["labels"]
    mask = labels != -100
    return labels.clamp(min=0), mask


def train_encoder_stage(config: TrainConfig) -> dict:
    """``stage: encoder``: contrastive pre-training of ``visual`` on the recipe's image-caption pairs.

    Uses the recipe's model (``model.preset`` or ``model.init_from``), data (a ``pairs`` stream of kind ``pair``
    in stage-1 layout), ``optim.lr.visual``, warm-up + decay schedule, ``steps`` and ``output_dir``.
    This short stage keeps no resumable checkpoint: rerun it.
    """
    from emu2.pipeline import Emu2Pipeline

    from .data import build_data
    from .model import build_model
    from .optim import build_scheduler

    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    if set(config.data.streams) != {"pairs"}:
        raise ValueError(f"stage: encoder reads one stream named 'pairs' (image-caption pairs), got "
                         f"{sorted(config.data.streams)}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    vision = model.config.vision_config
    head = CaptionContrast(len(tokenizer), model.config.n_query, vision.width)
    lr = config.optim.lr.get("visual")
    if lr is None:
        raise ValueError("stage: encoder needs optim.lr.visual")
    params = [p for p in model.visual.parameters()] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(config.optim.betas), eps=config.optim.eps,
                                  weight_decay=config.optim.weight_decay)
    scheduler = build_scheduler(optimizer, config)
    data = iter(build_data(config, model.config, tokenizer))
    autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=config.mixed_precision == "bf16")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    losses, seconds = [], []
    bar = tqdm(range(config.steps), desc="encoder", unit="step")
    for step in bar:
        started = time.perf_counter()
        batch = next(data)
        ids, mask = caption_tokens(batch)
        with autocast:
            loss = head(model.visual.encode_image(batch["images"], model.config.n_query).float(), ids, mask)
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - started)
        bar.set_postfix_str(f"loss {losses[-1]:.3f} | lr {scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"encoder stage: loss {losses[-1]} at step {step + 1}; nothing was saved")
    bar.close()
    model.eval()
    Emu2Pipeline(model, tokenizer).save_pretrained(out)
    rows = (json.dumps({"step": i, "loss": value, "contrastive_loss": value, "step_seconds": round(took, 4)})
            for i, (value, took) in enumerate(zip(losses, seconds), 1))
    (out / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    return {"step": len(losses), "finished": True, "output_dir": str(out), "loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None}
