"""Linear probe of a vision encoder's pooled embeddings: what each attribute of a shapes-world scene is
linearly readable from them, on renders of attribute combinations the encoder never saw.

The probe is ridge-regression classification (one-hot targets, closed form, regularisation picked on a split
of the probe's training renders): deterministic, no learning-rate or step count to tune, seconds on a CPU.
Features are the encoder's ``n_query`` pooled embeddings flattened (positions count: the position attribute
lives in which slots light up), followed by their per-channel maximum and mean over the ``n_query`` embeddings.
The language model reads the embeddings with attention, which can pick the slot an object is in wherever it is;
a flattened linear map alone would have to learn each attribute once per slot, from a tenth of the renders. Training renders come from the world's training split, test renders from its
held-out (shape, colour) combinations, so a probe that only memorised combinations scores low.

Shapes: renders (N, 3, S, S) -> embeddings (N, n_query, Dv) -> features (N, (n_query + 2) * Dv) -> per-attribute
scores (N, values).
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
    """PIL images -> ``(N, (n_query + 2) * Dv) float32``: ``model.encode_image``'s pooled embeddings flattened,
    then their maximum and mean over the embeddings."""
    from ..processing import preprocess_images

    size = model.config.vision_config.image_size
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start:start + batch_size], size)
        pooled = model.encode_image(pixels.to(model.device, model.dtype)).float().cpu()
        out.append(torch.cat([pooled.flatten(1), pooled.amax(1), pooled.mean(1)], 1))
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


def linear_probe(model, world, image_size: int, train: int = 3000, test: int = 600, seed: int = 0,
                 test_split: str = "heldout") -> dict:
    """Per-attribute linear-probe accuracy of ``model``'s pooled visual embeddings on ``test`` new renders.

    ``model``: an `Emu2ForCausalLM` (only ``encode_image`` is used); ``world``: the shapes `World`;
    ``test_split``: "heldout" (the held-out (shape, colour) combinations: an attribute must be read apart from
    the others) or "train" (new renders of the training combinations).
    Returns ``{attribute: {"value", "ci95", "n", "lambda", "classes"}}``.
    """
    from ..data.shapes.render import render_scene

    fit_scenes = probe_scenes(world, train, "train", seed)
    test_scenes = probe_scenes(world, test, test_split, seed + 1 if test_split == "train" else seed)
    fit_x = pooled_features(model, [render_scene(s, image_size) for s in fit_scenes])
    test_x = pooled_features(model, [render_scene(s, image_size) for s in test_scenes])
    fit_labels = {a: [scene_labels(s)[a] for s in fit_scenes] for a in PROBE_ATTRIBUTES}
    test_labels = {a: [scene_labels(s)[a] for s in test_scenes] for a in PROBE_ATTRIBUTES}
    return fit_linear_probes(fit_x, fit_labels, test_x, test_labels)


def main(argv=None) -> int:
    """``python -m emu2.eval.probe MODEL_DIR [--data DIR]``: print the probe of a model directory as JSON, on
    new renders of the training combinations and on the held-out combinations."""
    import argparse
    import json
    from pathlib import Path

    from ..data.shapes.world import World
    from ..pipelines.emu2 import Emu2Pipeline

    parser = argparse.ArgumentParser(prog="python -m emu2.eval.probe", description=main.__doc__)
    parser.add_argument("model", help="an Emu2 model directory (any stage)")
    parser.add_argument("--data", help="the shapes dataset it was trained on (its dataset.json gives the world's "
                        "seed and image size; default: seed 0, the model's image size)")
    args = parser.parse_args(argv)
    manifest = json.loads((Path(args.data) / "dataset.json").read_text()) if args.data else {}
    model = Emu2Pipeline.from_pretrained(args.model).model
    world = World.from_seed(manifest.get("seed", 0))
    size = manifest.get("image_size", model.config.vision_config.image_size)
    result = {split: linear_probe(model, world, size, test_split=split) for split in ("train", "heldout")}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
