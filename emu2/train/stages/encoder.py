"""Stage 0 for a vision encoder that starts random (``stage: encoder``): image-caption pre-training (contrastive and
caption words), or, on the shapes world, supervised attribute labels of rendered scenes (`AttributeHeads`).

Emu2 starts from EVA-CLIP, a vision encoder already trained contrastively on image-text pairs (paper 2.1), so its
stage 1 only has to teach the language model to read features that already name colours, shapes and places. A
model of a new size (the shapes presets) has no such encoder; captioning alone teaches a random ViT slowly, because
the caption loss is mostly spent on the language prior. This stage gives it the missing pre-training on the same
image-caption pairs stage 1 uses: an InfoNCE loss between the encoder's ``n_query`` visual embeddings (flattened,
so positions count) and a bag-of-words embedding of the caption, and, weighted by the recipe's ``encoder``
section, a caption-word loss: one logistic output per vocabulary token saying whether the caption contains it
(CatLIP, Mehta et al. 2024). Contrast only rewards what tells a batch's captions apart; the word loss rewards
every attribute a caption names, whatever else is in the batch.

Only ``visual`` (and the objectives' heads, discarded after) is trained, through the one runner
(`emu2.train.runner`); the output directory is a full Emu2 model directory (the language model untouched), which
stage 1 then loads through ``model.init_from``.

Tensor shapes: images (B, 3, S, S) -> visual embeddings (B, n_query, Dv) -> image vectors (B, D);
caption token ids (B, L) with a 0/1 mask (B, L) -> text vectors (B, D); logits (B, B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig


class CaptionContrast(nn.Module):
    """The small heads of the encoder objectives (discarded after the stage)."""

    def __init__(self, vocab_size: int, n_query: int, vision_width: int, dim: int = 128,
                 caption_words: bool = False):
        super().__init__()
        self.words = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.image = nn.Linear(n_query * vision_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.word_logits = nn.Linear(n_query * vision_width, vocab_size) if caption_words else None

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, Q, Dv); ids, mask (B, L) caption tokens -> symmetric InfoNCE loss (scalar)."""
        image = F.normalize(self.image(features.flatten(1)), dim=-1)
        offsets = torch.cat([mask.new_zeros(1), mask.sum(1).cumsum(0)[:-1]]).long()
        text = F.normalize(self.words(ids[mask.bool()], offsets), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def caption_word_loss(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, Q, Dv); ids, mask (B, L) -> binary cross-entropy of "the caption contains token v",
        summed over the vocabulary and averaged over the batch (scalar)."""
        if self.word_logits is None:
            raise ValueError("this head was built without caption_words=True")
        vocab = self.word_logits.out_features
        # Unmasked positions mark their token; masked ones mark a spare column, dropped after.
        index = torch.where(mask.bool(), ids, torch.full_like(ids, vocab))
        present = torch.zeros(ids.shape[0], vocab + 1, device=ids.device).scatter_(1, index, 1.0)[:, :vocab]
        logits = self.word_logits(features.flatten(1))
        return F.binary_cross_entropy_with_logits(logits, present, reduction="sum") / ids.shape[0]


def caption_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised caption tokens of a stage-1 pairs batch: (ids, mask), both (B, L)."""
    labels = batch["labels"]
    mask = labels != -100
    return labels.clamp(min=0), mask


class AttributeHeads(nn.Module):
    """Linear read-outs of the shapes world's attribute labels (`emu2.data.shapes.supervision`): per patch from the
    trunk's tokens (shape, colour); per pooled embedding the same, from each embedding the LM will read; per image
    the object's shape and colour as the best patch's score of a shared read-out (max over patches), and count,
    size, position, background from the flattened pooled embeddings. Discarded after the stage."""

    def __init__(self, n_query: int, vision_width: int):
        super().__init__()
        from emu2.data.shapes.supervision import (
            CELL_LABELS,
            GLOBAL_LABELS,
            LABEL_CLASSES,
            OBJECT_LABELS,
            PATCH_LABELS,
        )

        self.patch = nn.ModuleDict({k: nn.Linear(vision_width, LABEL_CLASSES[k]) for k in PATCH_LABELS})
        self.cell = nn.ModuleDict({k: nn.Linear(vision_width, LABEL_CLASSES[k]) for k in CELL_LABELS})
        self.object = nn.ModuleDict({k: nn.Linear(vision_width, LABEL_CLASSES[k]) for k in OBJECT_LABELS})
        self.image = nn.ModuleDict({k: nn.Linear(n_query * vision_width, LABEL_CLASSES[k]) for k in GLOBAL_LABELS})

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor, labels: dict, names) -> torch.Tensor:
        """tokens (B, 1 + N, Dv) trunk outputs; pooled (B, Q, Dv); labels from `AttributePool.batch`; ``names``: the
        labels to score -> the sum of their cross-entropies (scalar; -100 labels are ignored)."""
        patches, flat = tokens[:, 1:], pooled.flatten(1)
        loss = tokens.new_zeros(())
        for k in names:
            if k in self.patch:
                score, target = self.patch[k](patches).flatten(0, 1), labels[k].flatten()
            elif k in self.cell:
                score, target = self.cell[k](pooled).flatten(0, 1), labels[k].flatten()
            elif k in self.object:
                score, target = self.object[k](patches).amax(1), labels[k]
            else:
                score, target = self.image[k](flat), labels[k]
            if (target != -100).any():
                loss = loss + F.cross_entropy(score, target, ignore_index=-100)
        return loss


def _attribute_pool(config: TrainConfig, model) -> object:
    from emu2.data.shapes.supervision import AttributePool
    from emu2.data.shapes.world import World

    manifest = Path(config.data.root or "") / "dataset.json"
    if not manifest.is_file():
        raise ValueError(f"encoder.attributes needs a shapes-world dataset (data.root with dataset.json): "
                         f"{manifest} is missing")
    seed = json.loads(manifest.read_text()).get("seed", 0)
    vision = model.config.vision_config
    return AttributePool(World.from_seed(seed), vision.image_size, vision.grid_size,
                         size=config.encoder.attribute_pool, seed=config.seed, pooled=math.isqrt(model.config.n_query))


def word_vectors(model, tokenizer, words) -> torch.Tensor:
    """``words`` -> (len(words), D): the mean input embedding of each word's pieces, as it is written after a
    space inside a caption."""
    table = model.get_input_embeddings().weight.detach()
    return torch.stack([table[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0) for w in words])


@torch.no_grad()
def fit_word_projection(model, tokenizer, pool, n_query: int, ridge: float = 1.0, position_weight: float = 0.0) -> float:
    """Set ``model.project_up`` (Dv -> D, no bias) by ridge regression so that each of the ``n_query`` pooled
    embeddings of the pool's renders maps to the sum of the input embeddings of the words for what lies under it
    (`word_targets`). Returns the fit's R^2 over all the pool's embeddings.

    Why: the language model reads words; stage 1 then starts from visual embeddings it can attend to and copy
    from as it does from words, instead of from a random projection (measured: docs/training-notes.md)."""
    target = word_targets(model, tokenizer, pool, n_query, position_weight)
    return fit_projection(model, pool, n_query, target, ridge)


@torch.no_grad()
def word_targets(model, tokenizer, pool, n_query: int, position_weight: float = 0.0) -> torch.Tensor:
    """(len(pool) * n_query, D), row-major per render: for each pooled embedding, the sum of the input embeddings
    of its object's shape and colour words, or, where no object is, of its background colour and "background".

    ``position_weight`` > 0 adds, to an object's embeddings, that weight times the sum of the words of the object's
    position as captions name it ("top" + "left", "center"). Without them the fit keeps little of where an object
    is, and the language model has to learn to read it from which visual token holds the object."""
    from emu2.data.shapes.supervision import LABEL_WORDS, POSITIONS

    shape, colour = pool.labels["cell_shape"].reshape(-1), pool.labels["cell_colour"].reshape(-1)
    background = pool.labels["background"].repeat_interleave(n_query)
    words = {k: word_vectors(model, tokenizer, v).double() for k, v in LABEL_WORDS.items()}
    objects = words["cell_shape"][(shape - 1).clamp(min=0)] + words["cell_colour"][(colour - 1).clamp(min=0)]
    if position_weight:
        names = torch.stack([word_vectors(model, tokenizer, name.split()).double().sum(0) for name in POSITIONS])
        position = pool.labels["cell_position"].reshape(-1)
        objects = objects + position_weight * names[(position - 1).clamp(min=0)]
    empty = words["background"][background] + word_vectors(model, tokenizer, ["background"]).double()
    return torch.where((shape > 0).unsqueeze(1).to(objects.device), objects, empty)


@torch.no_grad()
def fit_projection(model, pool, n_query: int, target: torch.Tensor, ridge: float = 1.0) -> float:
    """Set ``model.project_up`` by ridge regression from the pool's pooled embeddings (len(pool) * n_query, Dv)
    to ``target`` (len(pool) * n_query, D), row-major per render. Returns the fit's R^2."""
    weight = model.project_up.weight
    features = torch.cat([model.visual.encode_image(pool.images[i:i + 256].to(weight.device), n_query).double()
                          for i in range(0, len(pool), 256)])  # (N, Q, Dv)
    x = features.reshape(-1, features.shape[-1])
    target = target.to(device=x.device, dtype=x.dtype)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    solution = torch.linalg.solve(x.T @ x + ridge * eye, x.T @ target)  # (Dv, D)
    weight.copy_(solution.T.to(weight.dtype))
    residual = ((x @ solution - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    return float(1 - residual)


def _fit_and_report_word_projection(model, tokenizer, pool, n_query: int, weights) -> None:
    r2 = fit_word_projection(model, tokenizer, pool, n_query, position_weight=weights.word_projection_position)
    print(f"[encoder] project_up fitted to the words of {len(pool) * n_query:,} pooled embeddings: R^2 {r2:.3f}",
          flush=True)


def _caption_losses(visual, head: CaptionContrast, batch: dict, weights, n_query: int, accelerator):
    """(contrastive, caption-word) losses of a stage-1 pairs batch; an objective of weight 0 gives 0."""
    device = accelerator.device
    ids, mask = (t.to(device) for t in caption_tokens(batch))
    with accelerator.autocast():
        features = visual.encode_image(batch["images"].to(device), n_query).float()
    zero = features.new_zeros(())
    return (head(features, ids, mask) if weights.contrastive else zero,
            head.caption_word_loss(features, ids, mask) if weights.caption_words else zero)


def _attribute_loss(visual, heads: AttributeHeads, pool, batch_size: int, generator, n_query: int, accelerator):
    """The supervised attribute loss of ``batch_size`` scenes drawn from ``pool``: half in colour, scored on every
    label but shape; half colourless (`shape_view`), scored on shape only."""
    from emu2.data.shapes.supervision import LABEL_CLASSES, SHAPE_LABELS, shape_view

    labelled = pool.batch(torch.randint(len(pool), (batch_size,), generator=generator))
    half = batch_size // 2
    colourless = shape_view(labelled["images"][half:], generator)
    labelled = {k: v.to(accelerator.device) for k, v in labelled.items()}
    with accelerator.autocast():
        tokens = visual(torch.cat([labelled["images"][:half], colourless.to(accelerator.device)])).float()
    pooled = visual.pool(tokens, n_query)
    first = {k: v[:half] for k, v in labelled.items()}
    second = {k: v[half:] for k, v in labelled.items()}
    colour_labels = [k for k in LABEL_CLASSES if k not in SHAPE_LABELS]
    return (heads(tokens[:half], pooled[:half], first, colour_labels)
            + heads(tokens[half:], pooled[half:], second, SHAPE_LABELS))


def _trained_modules(config: TrainConfig, model, vocab_size: int, device):
    """The objectives' heads, what checkpoints hold (``visual`` + heads, on ``device``) and their AdamW, with
    the recipe's ``optim.lr.visual``, betas, eps and weight decay."""
    weights, vision, n_query = config.encoder, model.config.vision_config, model.config.n_query
    heads = nn.ModuleDict({"captions": CaptionContrast(vocab_size, n_query, vision.width,
                                                       caption_words=weights.caption_words > 0)})
    if weights.attributes:
        heads["attributes"] = AttributeHeads(n_query, vision.width)
    lr = config.optim.lr.get("visual")
    if lr is None:
        raise ValueError("stage: encoder needs optim.lr.visual")
    trained = nn.ModuleDict({"visual": model.visual, "heads": heads}).to(device)
    groups = [{"params": list(model.visual.parameters()), "group": "visual"},
              {"params": list(heads.parameters()), "group": "heads"}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(config.optim.betas), eps=config.optim.eps,
                                  weight_decay=config.optim.weight_decay)
    return heads, trained, optimizer


def train_encoder_stage(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """``stage: encoder``: pre-training of ``visual`` with the recipe's ``encoder`` objectives: contrastive and
    caption words on the image-caption pairs, and (shapes world) supervised attributes of rendered scenes.

    Uses the recipe's model (``model.preset`` or ``model.init_from``), data (a ``pairs`` stream of kind ``pair``
    in stage-1 layout, read only when a caption objective has weight), ``optim`` (``lr.visual``, betas, eps,
    weight decay on every weight, ``grad_clip``), the schedule, ``steps`` and ``output_dir``. It runs on the one
    runner (`emu2.train.runner`): checkpoints hold the encoder and its objectives' heads, so ``resume=True``
    continues exactly. The output is a full Emu2 model directory, the language model untouched.
    """
    from ...pipelines.emu2 import Emu2Pipeline
    from ..data import build_data
    from ..model import build_model
    from ..optim import build_scheduler
    from ..runner import SingleProcess, Stage, StageSampling, StepReport, run_stage

    accelerator = SingleProcess(config, "encoder")
    device = accelerator.device
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    weights = config.encoder
    uses_captions = weights.contrastive > 0 or weights.caption_words > 0
    if uses_captions and set(config.data.streams) != {"pairs"}:
        raise ValueError(f"stage: encoder reads one stream named 'pairs' (image-caption pairs), got "
                         f"{sorted(config.data.streams)}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    n_query = model.config.n_query
    heads, trained, optimizer = _trained_modules(config, model, len(tokenizer), device)
    streams = build_data(config, model.config, tokenizer) if uses_captions else None
    sampling = StageSampling(config.seed, streams)  # its generator draws the rendered scenes and their views
    pool = _attribute_pool(config, model) if weights.attributes else None
    batch_size = next(iter(config.data.streams.values())).batch_size if config.data.streams else 64
    zero = torch.zeros((), device=device)
    batches = None

    def step() -> StepReport:
        nonlocal batches
        contrastive = words = attributes = zero
        if streams is not None:
            batches = batches or iter(streams)  # opened on first use: after a resumed checkpoint set the position
            contrastive, words = _caption_losses(model.visual, heads["captions"], next(batches), config.encoder,
                                                 n_query, accelerator)
        if pool is not None:
            attributes = _attribute_loss(model.visual, heads["attributes"], pool, batch_size, sampling.generator,
                                         n_query, accelerator)
        loss = weights.contrastive * contrastive + weights.caption_words * words + weights.attributes * attributes
        # One host read for the four numbers (each float() of a device tensor would wait for the device).
        value, *numbers = torch.stack([loss, contrastive, words, attributes]).detach().tolist()
        parts = dict(zip(("contrastive_loss", "caption_word_loss", "attribute_loss"), numbers))
        if not math.isfinite(value):  # before backward and the update: the weights stay as they were
            return StepReport(value, parts, diverged=f"encoder loss {value}")
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepReport(value, parts)

    def save_output(out: Path) -> None:
        model.eval()
        if weights.word_projection:
            _fit_and_report_word_projection(model, tokenizer, pool, n_query, weights)
        Emu2Pipeline(model, tokenizer).save_pretrained(out)

    stage = Stage(accelerator, trained, optimizer, build_scheduler(optimizer, config), step, save_output,
                  state=sampling, data_stats=streams)
    return run_stage(config, stage, resume=resume, stop_after=stop_after)
