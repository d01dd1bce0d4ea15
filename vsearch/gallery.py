"""A fine-tuned version's per-product blend of catalog vectors.

A fine-tuned vector joins a zero-shot part and an adapted part (:mod:`vsearch.adapter`),
``sqrt(w) * zero-shot ++ sqrt(1 - w) * adapted``, and a query's similarity to a
catalog image is ``w * zero-shot + (1 - w) * adapted`` cosine. The adapted part
is only trustworthy for products the training saw photos of: for the others it
measured as worse than the zero-shot part (grocery protocol B, unseen products:
Recall@1 0.497 at w = 0.5 against 0.537 zero-shot). So the catalog images of a
product *without* training photos are indexed with the zero-shot part given share
``untrained`` instead (0.7 measured best: unseen 0.524 / 0.932, seen 0.826 / 0.960,
against 0.497 / 0.898 and 0.805 / 0.953 at 0.5; ``scripts/bench_finetune.py
--protocol B``). Queries keep ``w``, whatever product they are looking for.

This is a view at indexing time: the catalog keeps each image's vector as the model
computes it, and every path that puts stored vectors into an index (a rebuild,
a write, a catch-up) reweights them here, so a product's weight follows from the
version's ``trained_products.json`` alone and never from how the image arrived.
Rescaling the two unit-length parts by ``sqrt(untrained / w)`` and
``sqrt((1 - untrained) / (1 - w))`` keeps the vector unit-length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

__all__ = ["TRAINED_FILE", "GalleryWeights", "save_trained"]

TRAINED_FILE = "trained_products.json"


@dataclass(frozen=True)
class GalleryWeights:
    """How a version's catalog vectors are reweighted, product by product."""

    adapted_dim: int  # trailing columns that hold the adapted part (the version's head_dim)
    zero_shot_weight: float  # the version's share for the zero-shot part (queries, trained products)
    untrained_weight: float  # the share for products without training photos
    trained: frozenset[str]  # products the version saw training photos of

    def __post_init__(self) -> None:
        if not 0.0 < self.zero_shot_weight < 1.0 or not 0.0 <= self.untrained_weight <= 1.0:
            raise ModelError("gallery weights must lie in (0, 1) for the version and [0, 1] for untrained products")

    @property
    def scales(self) -> tuple[float, float]:
        w, u = self.zero_shot_weight, self.untrained_weight
        return math.sqrt(u / w), math.sqrt((1 - u) / (1 - w))

    def apply(self, products: Sequence[str | None], raw: np.ndarray) -> np.ndarray:
        """``raw`` (one row per image, of the products ``products``) as indexed."""
        untrained = np.fromiter((p not in self.trained for p in products), dtype=bool, count=len(products))
        if not untrained.any():
            return raw
        out = np.array(raw, dtype=np.float32, copy=True)
        zero_scale, adapted_scale = self.scales
        split = out.shape[1] - self.adapted_dim
        out[untrained, :split] *= zero_scale
        out[untrained, split:] *= adapted_scale
        return out

    @classmethod
    def load(cls, folder: Path, adapted_dim: int, zero_shot_weight: float, untrained_weight: float) -> GalleryWeights:
        try:
            trained = json.loads((folder / TRAINED_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{folder / TRAINED_FILE}: unreadable: {exc}") from exc
        if not isinstance(trained, list) or not all(isinstance(p, str) for p in trained):
            raise ModelError(f"{folder / TRAINED_FILE}: not a list of product ids")
        return cls(adapted_dim, zero_shot_weight, untrained_weight, frozenset(trained))


def save_trained(folder: Path, products: Sequence[str]) -> None:
    """Record which products a version saw training photos of (sorted, one JSON list)."""
    (folder / TRAINED_FILE).write_text(json.dumps(sorted(set(products))) + "\n")
