"""Fitting the projection (centring, PCA) and serving it: on in-domain photos
(``--center-on``) or on a sample of the catalog's own vectors. The refit builds a
new index aside and swaps it in with the projection (:meth:`IndexWriter.refit`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .catalog import BASE_MODEL
from .errors import ConfigError, ImageError
from .indexfile import FIT_SAMPLE
from .snapshot import Snapshot
from .sources import read_source_items

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["embed_photos", "fit_projection"]


def fit_projection(engine: Engine, center_on: str | os.PathLike[str] | None = None) -> None:
    """Fit centring/PCA (on the photos in ``center_on`` if given, else on the catalog),
    rebuild the index and save. A fine-tuned version's projection is part of the
    version, so only a rebuild happens while one serves."""
    with engine.writer() as writer:
        snap = writer.snapshot
        if snap.model != BASE_MODEL:
            if center_on is not None:
                raise ConfigError(f"--center-on refits the base model's projection; model {snap.model!r} is active")
            writer.rebuild()
            return
        if center_on is not None:
            raw = embed_photos(engine, snap, [item.image for item in read_source_items(center_on)])
        else:
            raw = engine.catalog.sample_vectors(FIT_SAMPLE, model=snap.model)
        if len(raw) == 0:
            writer.save()
            return
        writer.refit(raw)


def embed_photos(engine: Engine, snap: Snapshot, sources: list[str], batch: int = 32) -> np.ndarray:
    """Raw query-style vectors of the readable images among ``sources`` (others skipped)."""
    vectors = []
    for start in range(0, len(sources), batch):
        images = []
        for source in sources[start : start + batch]:
            try:
                images.append(engine.load_query(source))
            except ImageError:
                continue
        if images:
            vectors.append(engine.embed_queries(images, snap))
    return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
