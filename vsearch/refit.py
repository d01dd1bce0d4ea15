"""Fitting the projection (centring, PCA) and serving it: on in-domain photos
(``--center-on``) or on a sample of the catalog's own vectors. The refit builds a
new index aside and swaps it in with the projection (:meth:`IndexWriter.refit`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .catalog import BASE_MODEL
from .errors import ConfigError, ImageError, QueryDataError
from .indexfile import FIT_SAMPLE
from .reservoir import QueryReservoir
from .snapshot import Snapshot
from .sources import read_source_items

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["MIN_QUERIES", "embed_photos", "fit_projection", "refit_from_queries"]

# Query photos below which a refit on them is refused. On the grocery protocol
# (scripts/bench_day_one.py) centring on 25 photos gave Recall@1 0.473 and 50-2,000
# gave 0.473-0.500 (from 0.436 on the catalog's own fit); PCA needs 2 x pca_dim.
MIN_QUERIES = 50
LINK_INLINE_MAX = 20_000  # images a first build links itself (~5-10 s on 2 cores); more are left to the server


def fit_projection(engine: Engine, center_on: str | os.PathLike[str] | None = None) -> None:
    """Fit centring/PCA (on the photos in ``center_on`` if given, else on the catalog),
    rebuild the index and save; then link the images stored before there was an index
    to their near-duplicates (:mod:`vsearch.variants`: the first ingest's, which had no
    index to search), if there are at most LINK_INLINE_MAX of them: a larger backlog
    (a bulk import) is linked by ``vsearch serve`` in the background or by ``vsearch
    dups --link``, so the import does not end with a k-NN search per image. A
    fine-tuned version's projection is part of the version, so only a rebuild happens
    while one serves."""
    _fit_projection(engine, center_on)
    if engine.images_not_linked() <= LINK_INLINE_MAX:
        engine.link_variants()


def _fit_projection(engine: Engine, center_on: str | os.PathLike[str] | None) -> None:
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
        writer.refit(raw, "photos" if center_on is not None else "catalog")


def refit_from_queries(engine: Engine, reservoir: QueryReservoir | None = None, minimum: int | None = None) -> int:
    """Refit the base model's projection on the shoppers' query photos: ``reservoir``
    (a server's), or the one saved in the index directory. The index is rebuilt from
    the catalog aside and swapped in with the projection, searches going on; no catalog
    vector is touched, and ``vsearch refit --catalog`` goes back. Returns how many
    query vectors it was fitted on; QueryDataError below ``minimum`` (default MIN_QUERIES)."""
    minimum = MIN_QUERIES if minimum is None else minimum
    if reservoir is None:
        reservoir = QueryReservoir.load(engine.paths.queries, capacity=1 << 30, model=BASE_MODEL)
    raw = reservoir.vectors()
    if reservoir.model != BASE_MODEL or len(raw) < minimum:
        raise QueryDataError(
            f"{len(raw)} query photos in the sample (of model {reservoir.model!r}); a refit needs {minimum} of the "
            f"base model's (vsearch serve collects them: query_reservoir in the serve config)"
        )
    with engine.writer() as writer:
        if writer.snapshot.model != BASE_MODEL:
            raise ConfigError(f"the query refit fits the base model's projection; model {writer.snapshot.model!r} is active")
        writer.refit(raw, "queries")
    return len(raw)


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
