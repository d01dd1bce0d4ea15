"""The one write path: every change to an index directory goes through an
:class:`IndexWriter`, obtained with ``with engine.writer() as w:``.

One writer at a time (a re-entrant mutex; slow work such as decoding and the model
runs while holding it, with searches going on). Each change is applied as a catalog
transaction plus the matching change to the served index, together under the
engine's write lock, so a search sees it completely or not at all. :meth:`save`
persists the index and the manifest atomically (temp file, fsync, rename); if a
process dies between a catalog commit and the save, the next open sees that the
index lags the catalog's generation and rebuilds it from the stored vectors.

A model switch, a refit and a refresh from another process all end in
:meth:`swap`, which installs a new :class:`~vsearch.snapshot.Snapshot`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import Catalog
from .errors import IndexFormatError
from .index import VectorIndex, choose_factory
from .manifest import IndexManifest, IndexPaths
from .projection import Projection
from .snapshot import Snapshot
from .sources import Item

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["FIT_SAMPLE", "IndexWriter", "NewImage", "build_index", "load_saved_index"]

_log = logging.getLogger("vsearch")
FIT_SAMPLE = 100_000  # vectors used to fit the projection and train IVF quantizers


@dataclass(frozen=True)
class NewImage:
    """An image ready to be stored: where it came from and what it is."""

    product_id: str
    source: str
    sha256: str
    width: int
    height: int


def build_index(catalog: Catalog, manifest: IndexManifest, projection: Projection, model: str) -> VectorIndex:
    """A faiss index of ``model``'s stored vectors, projected (no model work)."""
    n = catalog.counts()["images"]
    dim = projection.out_dim(catalog.vector_dim(model) or manifest.raw_dim)
    factory = manifest.index.factory or choose_factory(n, dim)
    index = VectorIndex.create(factory, dim, nprobe=manifest.index.nprobe)
    if not index.is_trained:
        index.train(projection.apply(catalog.sample_vectors(FIT_SAMPLE, model=model)))
    for ids, raw in catalog.iter_vectors(model=model):
        index.add(ids, projection.apply(raw))
    index.to_gpu()
    return index


def load_saved_index(paths: IndexPaths, manifest: IndexManifest, generation: int, mmap: bool = False) -> VectorIndex | None:
    """The saved index file, if ``manifest`` says it reflects catalog ``generation``; else None."""
    if manifest.catalog_generation != generation or not paths.index.exists():
        return None
    try:
        index = VectorIndex.load(paths.index, manifest.factory, nprobe=manifest.index.nprobe, mmap=mmap)
    except IndexFormatError as exc:  # a derived file: every vector is in the catalog
        _log.warning("vsearch: %s is damaged (%s); rebuilt from the catalog", paths.index, str(exc).split(":")[0])
        return None
    if index.d != manifest.dim:
        _log.warning("vsearch: %s has dimension %d, not %d; rebuilt from the catalog", paths.index, index.d, manifest.dim)
        return None
    index.to_gpu()
    return index


class IndexWriter:
    """Applies changes to an engine's catalog and served index. Use ``engine.writer()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.catalog = engine.catalog

    @property
    def snapshot(self) -> Snapshot:
        return self.engine.snapshot

    @contextmanager
    def _apply(self) -> Iterator[Snapshot]:
        """A catalog transaction and the index change that goes with it, under the
        write lock; category blocks are forgotten afterwards.

        Tracks which catalog generation the served index reflects: a commit from
        another process since our last one (seen inside the transaction, where no
        other writer can commit) or a change that failed halfway leaves the index
        stale, and the next :meth:`save` rebuilds it from the catalog."""
        engine, snap = self.engine, self.engine.snapshot
        with engine._rw.write():
            try:
                with self.catalog.transaction():
                    ours = self.catalog.generation == engine.index_generation
                    yield snap
            except BaseException:
                engine.index_generation = -1  # the index may hold part of what the catalog rolled back
                raise
            finally:
                snap.filters.invalidate()
            engine.index_generation = self.catalog.generation if ours else -1

    # catalog and index together -------------------------------------------------
    def upsert_products(self, items: Sequence[Item]) -> None:
        with self._apply():
            for item in items:
                self.catalog.upsert_product(item.product_id, title=item.title, category=item.category, attributes=item.attributes)

    def add_images(self, images: Sequence[NewImage], vectors: np.ndarray) -> list[int]:
        """Store images with their raw vectors from the served model; returns their ids."""
        with self._apply() as snap:
            ids = [
                self.catalog.put_image(i.product_id, i.source, i.sha256, i.width, i.height, v, model=snap.model)
                for i, v in zip(images, vectors)
            ]
            self._add(snap, np.array(ids, dtype=np.int64), vectors)
        return ids

    def store_vectors(self, model: str, rows: list[tuple[int, str, np.ndarray]]) -> int:
        """Store another (or the served) model version's vectors for existing images;
        the served index is rebuilt from them by the switch that follows, so searches
        go on meanwhile (the catalog's own lock keeps their reads whole)."""
        with self.catalog.transaction(bump=model == self.snapshot.model):
            return self.catalog.put_vectors(model, rows)

    def put_product(
        self,
        product_id: str,
        *,
        title: str,
        category: str,
        attributes: dict[str, Any] | None,
        images: Sequence[NewImage] | None,
        vectors: np.ndarray | None,
    ) -> None:
        """Create or replace a product; ``images`` (if not None) replace its images."""
        with self._apply() as snap:
            self.catalog.upsert_product(product_id, title=title, category=category, attributes=attributes)
            ids = [
                self.catalog.put_image(product_id, i.source, i.sha256, i.width, i.height, v, model=snap.model)
                for i, v in zip(images or [], vectors if vectors is not None else [])
            ]
            removed: list[int] = []
            if images is not None:
                removed = [row.id for row in self.catalog.images_of(product_id) if row.id not in ids]
                self.catalog.remove_images(removed)
            self._remove(snap, removed)
            if vectors is not None:
                self._add(snap, np.array(ids, dtype=np.int64), vectors)

    def remove_products(self, product_ids: Sequence[str]) -> list[int]:
        """Delete products and their images; returns the removed image ids."""
        with self._apply() as snap:
            removed = self.catalog.remove_products(list(product_ids))
            self._remove(snap, removed)
        return removed

    def prune(self, listed: set[tuple[str, str]]) -> tuple[int, list[int]]:
        """Remove products the ``(product_id, source)`` pairs do not list, and images
        their products no longer list. Returns (products removed, image ids removed)."""
        products = {pid for pid, _ in listed}
        with self._apply() as snap:
            stale_products = sorted(self.catalog.product_ids() - products)
            removed = self.catalog.remove_products(stale_products)
            stale = [row.id for pid in products for row in self.catalog.images_of(pid) if (pid, row.source) not in listed]
            self.catalog.remove_images(stale)
            self._remove(snap, removed + stale)
        return len(stale_products), removed + stale

    def drop_model_vectors(self, model: str) -> None:
        with self.catalog.transaction(bump=False):
            self.catalog.drop_model_vectors(model)

    # the served snapshot -----------------------------------------------------------
    def build_index(self, projection: Projection, model: str) -> tuple[VectorIndex, int]:
        """A new index of ``model``'s stored vectors, and the catalog generation it
        reflects (read first: a commit from elsewhere during the build makes it stale)."""
        generation = self.catalog.generation
        return build_index(self.catalog, self.engine.manifest, projection, model), generation

    def swap(
        self,
        snapshot: Snapshot,
        generation: int,
        *,
        manifest: IndexManifest | None = None,
        files: Callable[[], None] = lambda: None,
        **changes: Any,
    ) -> None:
        """Serve ``snapshot`` (whose index reflects catalog ``generation``) from now on.

        With ``manifest`` (one just read from disk: a refresh) that replaces ours as
        is. Otherwise ``changes`` are applied to ours, the manifest is saved marked
        stale, ``files()`` writes what the new snapshot needs on disk (a projection),
        and then the index and manifest are saved: a crash anywhere in between leaves
        a stale manifest, which the next open repairs by rebuilding."""
        engine = self.engine
        if manifest is None:
            manifest = replace(engine.manifest, **changes)
            if snapshot.index is not None:
                manifest.factory = snapshot.index.factory
            manifest.catalog_generation = -1
            manifest.save(engine.paths)
            files()
        with engine._rw.write():  # one assignment for readers: info() never mixes two
            engine.manifest, engine._snapshot, engine.index_generation = manifest, snapshot, generation
        if manifest.catalog_generation == -1:
            self.save()

    def rebuild(self) -> None:
        """Rebuild the served index from the catalog's stored vectors (no model work)."""
        snap = self.snapshot
        index, generation = self.build_index(snap.projection, snap.model)
        self.swap(self.engine.new_snapshot(snap.model, snap.projection, index, like=snap), generation)

    def refit(self, raw: np.ndarray) -> None:
        """Fit centring/PCA on ``raw`` (base-model vectors), rebuild the index, serve both."""
        engine, snap = self.engine, self.snapshot
        projection = Projection.fit(raw, engine.manifest.projection)
        index, generation = self.build_index(projection, snap.model)
        raw_dim = int(raw.shape[1])
        self.swap(
            engine.new_snapshot(snap.model, projection, index, like=snap),
            generation,
            files=lambda: projection.save(engine.paths.projection),
            projection_fitted=True,
            raw_dim=raw_dim,
            dim=projection.out_dim(raw_dim),
        )

    def save(self) -> None:
        """Persist the index and the manifest (with the catalog generation the index
        reflects); a stale index is rebuilt first."""
        engine = self.engine
        if engine.index_generation == -1 and engine.snapshot.index is not None:
            self.rebuild()  # saves
            return
        with engine._rw.read():  # saving only reads the index; searches may go on
            snap = engine.snapshot
            if snap.index is not None:
                snap.index.save(engine.paths.index)
            counts = self.catalog.counts()
            engine.manifest.counts = {**counts, "vectors": snap.vectors}
            engine.manifest.catalog_generation = engine.index_generation if snap.index is not None else -1
            engine.manifest.save(engine.paths)

    def finish(self) -> None:
        """After a batch of writes: fit the projection the first time, move to a bigger
        index type when the catalog has outgrown it, and save."""
        if not self.engine.manifest.projection_fitted:
            self.engine.fit_projection()
            return
        manifest, index = self.engine.manifest, self.snapshot.index
        if not manifest.index.factory and index is not None and choose_factory(index.ntotal, manifest.dim) != manifest.factory:
            self.rebuild()
            return
        self.save()

    # internals ---------------------------------------------------------------------
    def _add(self, snap: Snapshot, ids: np.ndarray, raw: np.ndarray) -> None:
        if snap.index is not None and len(ids):
            snap.index.add(ids, snap.projection.apply(raw))

    def _remove(self, snap: Snapshot, ids: list[int]) -> None:
        if snap.index is not None and ids:
            snap.index.remove(np.array(ids, dtype=np.int64))
