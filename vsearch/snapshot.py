"""The served snapshot: everything a search needs, as one object swapped whole.

A search reads :attr:`vsearch.engine.Engine.snapshot` once and uses that object to
the end: the query is embedded by the snapshot's model version, projected by its
projection and searched in its index, so it can never mix two versions. A model
switch, a refit or a refresh from another process builds a new snapshot aside and
installs it with a single assignment (:meth:`vsearch.writer.IndexWriter.swap`).

Ingest batches and product writes change the snapshot's index in place (rebuilding
it per write would cost the whole catalog); they do so under the engine's write
lock, which searches hold for reading while they use the index.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .categories import CategoryFilter
from .embed import Embedder
from .gallery import GalleryWeights
from .index import VectorIndex
from .projection import Projection

__all__ = ["EmbedderSlot", "Snapshot"]


class EmbedderSlot:
    """A model version's embedder, loaded on first use (so a re-ingest of unchanged
    images, or an open that only rebuilds the index, never loads the model)."""

    def __init__(self, load: Callable[[], Embedder]) -> None:
        self._load = load
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load()
            return self._embedder


@dataclass(frozen=True)
class Snapshot:
    """What one search uses, all from the same model version."""

    model: str  # the model version's name ("base" or a fine-tuned one)
    embedder: EmbedderSlot
    projection: Projection
    index: VectorIndex | None  # None until the projection is fitted
    filters: CategoryFilter  # category blocks and their cached vectors, for this index
    has_text: bool  # whether this version can embed text queries
    query_tta: bool  # queries average the photo with its centre crop
    raw_dim: int  # length of this version's raw vectors (0 before any is stored)
    gallery: GalleryWeights | None = None  # per-product reweighting of catalog vectors (fine-tuned versions)

    @property
    def vectors(self) -> int:
        return self.index.ntotal if self.index is not None else 0
