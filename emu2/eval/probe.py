"""Linear probe of a vision encoder's pooled embeddings: what each attribute of a shapes-world scene is
linearly readable from them, on renders of attribute combinations the encoder never saw.

The probe is ridge-regression classification (one-hot targets, closed form, regularisation picked on a split
of the probe's training renders): deterministic, no learning-rate or step count to tune, seconds on a CPU.
Features are the encoder's ``n_query`` pooled embeddings flattened (positions count: the position attribute
lives in which slots light up). Training renders come from the world's training split, test renders from its
held-out (shape, colour) combinations, so a probe that only memorised combinations scores low.

Shapes: renders (N, 3, S, S) -> features (N, n_query * Dv) -> per-attribute scores (N, values).
"""

from __future__ import annotations

import random

import torch

from .intervals import with_interval

PROBE_ATTRIBUTES = ("shape", "colour", "count", "position", "size", "background")
RIDGE_LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def probe_scenes(world, n: int, split: str, seed: int) -> list:
    """``n`` one-group scenes (the attribute tasks' scenes) of ``split`` ("train" or "heldout")."""
    rng = random.Random(f"{seed}:probe:{split}")
    return [world.group_scene(rng, split) for _ in range(n)]


def scene_labels(scene) -> dict[str, str]:
    group = scene.groups[0]
    return {"shape": group.shape, "colour": group.colour, "count": str(group.count),
            "position": scene.position(group), "size": group.size, "background": scene.background}


@torch.no_grad()
def pooled_features(model, images, batch_size: int = 256) -> torch.Tensor:
    """PIL images -> ``(N, n_query * Dv) float32`` flattened pooled embeddings of ``model.encode_image``."""
    from ..processing import preprocess_images

    size = model.config.vision_config.image_size
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start:start + batch_size], size)
        out.append(model.encode_image(pixels.to(model.device, model.dtype)).float().flatten(1).cpu())
    model.train(was_training)
    return torch.cat(out)


class _Ridge:
    """Ridge regressions of several targets and regularisations on one design matrix, from one eigendecomposition
    of its Gram matrix: W(lam) = V diag(1 / (e + lam)) V^T X^T Y, with a bias column (float64)."""

    def __init__(self, x: torch.Tensor):
        self.x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.eigenvalues, self.vectors = torch.linalg.eigh(self.x.T @ self.x)

    def weights(self, y: torch.Tensor, lam: float) -> torch.Tensor:
        projected = self.vectors.T @ (self.x.T @ y)
        return self.vectors @ (projected / (self.eigenvalues + lam)[:, None])


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return [((x - mean) / std).double() for x in (train_x, *others)]


def fit_linear_probes(train_x: torch.Tensor, train_labels: dict[str, list[str]], test_x: torch.Tensor,
                      test_labels: dict[str, list[str]]) -> dict:
    """Ridge classifiers from features to each attribute's values; held-out accuracy with its 95 % interval.

    ``train_x`` (N, D), ``test_x`` (M, D); labels are strings, one list per attribute. Each attribute's
    regularisation is the one of `RIDGE_LAMBDAS` (times N) with the best accuracy on the last fifth of the
    training features.
    """
    xs, xt = _standardise(train_x, test_x)
    cut = len(xs) * 4 // 5
    fit_part, full = _Ridge(xs[:cut]), _Ridge(xs)
    results = {}
    for attribute, labels in train_labels.items():
        values = sorted(set(labels))
        index = {v: i for i, v in enumerate(values)}
        ys = torch.nn.functional.one_hot(torch.tensor([index[v] for v in labels]), len(values)).double()
        truth = ys[cut:].argmax(1)
        best = max(RIDGE_LAMBDAS, key=lambda lam: float(
            (_predict(fit_part.weights(ys[:cut], lam * cut), xs[cut:]) == truth).double().mean()))
        predicted = _predict(full.weights(ys, best * len(xs)), xt)
        hits = [float(values[int(p)] == t) for p, t in zip(predicted, test_labels[attribute])]
        results[attribute] = with_interval(hits) | {"lambda": best, "classes": len(values)}
    return results


def linear_probe(model, world, image_size: int, train: int = 3000, test: int = 600, seed: int = 0) -> dict:
    """Per-attribute held-out linear-probe accuracy of ``model``'s pooled visual embeddings.

    ``model``: an `Emu2ForCausalLM` (only ``encode_image`` is used); ``world``: the shapes `World`.
    Returns ``{attribute: {"value", "ci95", "n", "lambda", "classes"}}``.
    """
    from ..data.shapes.render import render_scene

    fit_scenes, test_scenes = probe_scenes(world, train, "train", seed), probe_scenes(world, test, "heldout", seed)
    fit_x = pooled_features(model, [render_scene(s, image_size) for s in fit_scenes])
    test_x = pooled_features(model, [render_scene(s, image_size) for s in test_scenes])
    fit_labels = {a: [scene_labels(s)[a] for s in fit_scenes] for a in PROBE_ATTRIBUTES}
    test_labels = {a: [scene_labels(s)[a] for s in test_scenes] for a in PROBE_ATTRIBUTES}
    return fit_linear_probes(fit_x, fit_labels, test_x, test_labels)
