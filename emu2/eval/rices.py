"""Retrieval In-Context Example Selection (RICES), as in Flamingo / OpenFlamingo (paper Appendix D).

For each query, the in-context examples are the support items whose image embeddings are most similar
(cosine) to the query image's. The model enters through one callable,
``encode(images: list[PIL.Image]) -> (N, D) tensor`` (the model's pooled image embedding).

Order: `RICES.find` returns the k nearest with the MOST similar LAST, so that the closest example sits right
before the query in the prompt (OpenFlamingo's order; the paper does not say). A k-shot selection is then the
last k of a larger one, which the few-shot runner relies on.

Support features are computed once, L2-normalised, and cached as ``{cache_dir}/{cache_name}.safetensors``
with a hash of the support ids; a cache made for other ids is recomputed. Put the model in ``cache_name``:
the cache cannot tell which encoder made it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from emu2.eval.datasets import EvalRecord, load_images

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[Image.Image]], torch.Tensor]
_CACHE_FORMAT = "emu2-rices-v1"


class ExampleSelector(Protocol):
    """What the few-shot runner needs: k support indices per query, in prompt order (most relevant last)."""

    def select(self, query_ids: Sequence[str], query_images: Sequence[Image.Image], k: int) -> list[list[int]]:
        ...


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _check_unique(ids: Sequence[str]) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("support ids must be unique; found duplicates such as "
                         f"{next(i for i in ids if ids.count(i) > 1)!r}")
    return ids


def _check_k(k: int, available: int) -> None:
    if k < 0 or k > available:
        raise ValueError(f"cannot select {k} in-context examples from a support set of {available} "
                         "(the query's own item excluded)")


def encode_normalized(encode: EncodeFn, images: list[Image.Image]) -> torch.Tensor:
    """``encode(images)`` as L2-normalised ``(N, D) float32`` on the CPU, with the shape checked."""
    with torch.no_grad():
        features = encode(images)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != len(images):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"encode must return a (N, D) tensor for N={len(images)} images; got {shape}")
    return F.normalize(features.detach().float().cpu(), dim=-1)


class RICES:
    """Nearest-neighbour example selection over a support set's image embeddings.

    Args:
        support_ids: one unique id per support item; indices returned by `find` index this list.
        load_support_image: ``i -> PIL image`` of support item i (called only when features are computed).
        encode: ``list[PIL.Image] -> (N, D)`` image embeddings.
        cache_dir / cache_name: where the features are cached; no caching when cache_dir is None.
        batch_size: images per ``encode`` call.
        image_keys: optional, one per support item (e.g. the image path); items sharing a key share an image
            and are encoded once (VQAv2 has ~5 questions per image).
    """

    def __init__(
        self,
        support_ids: Sequence[str],
        load_support_image: Callable[[int], Image.Image],
        encode: EncodeFn,
        cache_dir: str | Path | None = None,
        cache_name: str = "rices",
        batch_size: int = 64,
        image_keys: Sequence[str] | None = None,
    ) -> None:
        self.support_ids = _check_unique(support_ids)
        if not self.support_ids:
            raise ValueError("RICES needs a non-empty support set")
        if image_keys is not None and len(image_keys) != len(self.support_ids):
            raise ValueError(f"got {len(image_keys)} image keys for {len(self.support_ids)} support ids")
        self._index = {item_id: i for i, item_id in enumerate(self.support_ids)}
        self.encode = encode
        self.batch_size = batch_size
        self.cache_path = None if cache_dir is None else Path(cache_dir) / f"{cache_name}.safetensors"
        features = self._load_cache()
        if features is None:
            features = self._compute(load_support_image, image_keys)
            self._save_cache(features)
        self.features = features  # (S, D) float32, rows L2-normalised

    @classmethod
    def from_records(
        cls,
        support_records: Sequence[EvalRecord],
        encode: EncodeFn,
        cache_dir: str | Path | None = None,
        cache_name: str = "rices",
        batch_size: int = 64,
    ) -> RICES:
        """RICES over benchmark records, keyed by record id, each record's first image encoded once per file."""
        no_image = [r.id for r in support_records if not r.images]
        if no_image:
            raise ValueError(f"RICES needs an image per support record; {len(no_image)} have none, e.g. "
                             f"{no_image[0]!r}")
        return cls(
            [r.id for r in support_records],
            lambda i: load_images(support_records[i])[0],
            encode,
            cache_dir=cache_dir,
            cache_name=cache_name,
            batch_size=batch_size,
            image_keys=[str(r.images[0]) for r in support_records],
        )

    # -------------------------------------------------------------------------------- features and cache
    def _compute(self, load_image: Callable[[int], Image.Image], image_keys: Sequence[str] | None) -> torch.Tensor:
        keys = list(image_keys) if image_keys is not None else self.support_ids
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_index.setdefault(key, i)
        unique = list(first_index.values())  # support index of each distinct image, in first-seen order
        chunks = []
        for start in tqdm(range(0, len(unique), self.batch_size), desc="RICES support features", unit="batch"):
            batch = unique[start : start + self.batch_size]
            chunks.append(encode_normalized(self.encode, [load_image(i) for i in batch]))
        unique_features = torch.cat(chunks)
        row_of_key = {key: row for row, key in enumerate(first_index)}
        return unique_features[[row_of_key[key] for key in keys]].contiguous()

    def _load_cache(self) -> torch.Tensor | None:
        if self.cache_path is None or not self.cache_path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(self.cache_path), framework="pt") as cache:
            metadata = cache.metadata() or {}
            if metadata.get("format") != _CACHE_FORMAT or metadata.get("ids_sha256") != _ids_digest(self.support_ids):
                logger.warning("RICES cache %s was made for a different support set (%s items); recomputing",
                               self.cache_path, metadata.get("num_items", "?"))
                return None
            return cache.get_tensor("features")

    def _save_cache(self, features: torch.Tensor) -> None:
        if self.cache_path is None:
            return
        from safetensors.torch import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": _CACHE_FORMAT, "ids_sha256": _ids_digest(self.support_ids),
                    "num_items": str(len(self.support_ids))}
        partial = self.cache_path.with_name(self.cache_path.name + ".partial")
        save_file({"features": features}, str(partial), metadata=metadata)
        os.replace(partial, self.cache_path)  # a crash mid-write never leaves a half cache behind

    # ---------------------------------------------------------------------------------------- selection
    def find(
        self, query_features: torch.Tensor, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """The ``k`` support indices most similar to each query, least similar first, most similar LAST.

        Args:
            query_features: ``(Q, D)`` query image embeddings (normalised here).
            k: examples per query.
            exclude_ids: per query, a support id never to return (the query's own item), or None.
        Returns:
            Q lists of k indices into ``support_ids``.
        """
        if query_features.ndim != 2 or query_features.shape[1] != self.features.shape[1]:
            raise ValueError(f"query_features must be (Q, {self.features.shape[1]}); got "
                             f"{tuple(query_features.shape)}")
        _check_k(k, len(self.support_ids) - (1 if exclude_ids else 0))
        if k == 0:
            return [[] for _ in range(query_features.shape[0])]
        queries = F.normalize(query_features.detach().float().cpu(), dim=-1)
        similarity = queries @ self.features.T  # (Q, S) cosine similarities
        if exclude_ids is not None:
            if len(exclude_ids) != len(queries):
                raise ValueError(f"got {len(exclude_ids)} exclude_ids for {len(queries)} queries")
            for row, item_id in enumerate(exclude_ids):
                if item_id is not None and str(item_id) in self._index:
                    similarity[row, self._index[str(item_id)]] = float("-inf")
        nearest = similarity.topk(k, dim=1).indices  # (Q, k), most similar first
        return [row[::-1] for row in nearest.tolist()]

    def select(self, query_ids: Sequence[str], query_images: Sequence[Image.Image], k: int) -> list[list[int]]:
        """`find` for query images: encodes them and excludes each query's own id from its examples."""
        if len(query_ids) != len(query_images):
            raise ValueError(f"got {len(query_ids)} query ids for {len(query_images)} query images")
        if k == 0:
            return [[] for _ in query_ids]
        missing = [qid for qid, image in zip(query_ids, query_images) if image is None]
        if missing:
            raise ValueError(f"RICES selects by the query's image, but {len(missing)} queries have none (e.g. "
                             f"{missing[0]!r}); use RandomSelector for text-only or video items")
        return self.find(encode_normalized(self.encode, list(query_images)), k, exclude_ids=list(query_ids))


class RandomSelector:
    """Random in-context examples with RICES's interface: seeded per (seed, query id), so a query gets the same
    examples whatever batch it is in, and its own id excluded."""

    def __init__(self, support_ids: Sequence[str], seed: int = 0) -> None:
        self.support_ids = _check_unique(support_ids)
        self._index = {item_id: i for i, item_id in enumerate(self.support_ids)}
        self.seed = seed

    def find(
        self, query_features: torch.Tensor | None, k: int, exclude_ids: Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """``k`` random support indices per query; ``query_features`` only gives the number of queries when
        ``exclude_ids`` is None (queries are then seeded by their row)."""
        if exclude_ids is None:
            if query_features is None:
                raise ValueError("RandomSelector.find needs query_features or exclude_ids to count the queries")
            exclude_ids = [None] * query_features.shape[0]
        _check_k(k, len(self.support_ids) - 1)
        selections = []
        for row, item_id in enumerate(exclude_ids):
            key = str(item_id) if item_id is not None else f"row-{row}"
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8"))])
            draw = rng.choice(len(self.support_ids), size=min(k + 1, len(self.support_ids)), replace=False)
            own = self._index.get(str(item_id)) if item_id is not None else None
            selections.append([int(i) for i in draw if i != own][:k])
        return selections

    def select(self, query_ids: Sequence[str], query_images: Sequence[Image.Image], k: int) -> list[list[int]]:
        """`find` keyed by query id (the images are not needed)."""
        return self.find(None, k, exclude_ids=[str(i) for i in query_ids])
