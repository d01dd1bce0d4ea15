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
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import linking, variants
from .catalog import Catalog
from .checkpoint import IndexImage, copy_index, log_save_failure, superseded
from .errors import IndexBusyError, StorageError, VsearchError
from .faissthreads import one_thread
from .gallery import GalleryWeights
from .index import VectorIndex
from .indexfile import build_index, indexed_vectors
from .manifest import IndexManifest
from .projection import Projection
from .sizing import choose_factory
from .snapshot import Snapshot
from .sources import Item

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["CHECKPOINT_EVERY", "IndexWriter", "NewImage"]

_log = logging.getLogger("vsearch")
SMALL_CHANGE = 256  # vectors; fewer are added on one OpenMP thread (see vsearch.faissthreads)
CHECKPOINT_EVERY = 64  # catalog generations (write transactions) between index saves of API writes


@dataclass(frozen=True)
class NewImage:
    """An image ready to be stored: where it came from and what it is."""

    product_id: str
    source: str
    sha256: str
    width: int
    height: int
    phash: int | None = None  # perceptual hash (vsearch.duplicates); None where no image was decoded


class IndexWriter:
    """Applies changes to an engine's catalog and served index. Use ``engine.writer()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.catalog = engine.catalog
        self._touched: set[int] = set()  # image ids the change in progress put in the index or took out
        self._stored: list[int] = []  # image ids the change in progress stored (their near-duplicates are linked)

    @property
    def snapshot(self) -> Snapshot:
        return self.engine.snapshot

    @contextmanager
    def _apply(self) -> Iterator[Snapshot]:
        """A catalog transaction and the index change that goes with it, under the
        write lock; the category blocks of the images it touched follow.

        The transaction first catches the index up with whatever other processes
        committed (SQLite lets no one else commit until ours ends). If the change
        fails, the catalog rolls back and the images it touched are re-read into
        the index from the catalog, so the index never keeps half a change."""
        engine, snap = self.engine, self.engine.snapshot
        self._touched, self._stored = set(), []
        with engine._rw.write():
            try:
                with _storage_errors(self.catalog), self.catalog.transaction():
                    ours = self._catch_up(snap)
                    before = self.catalog.generation
                    yield snap
                    relink = variants.settle(self.catalog.db.conn)  # what a removal left of a group, linked again
                    if not engine.link_in_background:  # else they stay pending for Engine.link_variants
                        linking.link_pending(self.catalog, snap, engine.manifest.duplicates, self._stored + relink)
                    moved = self._categories_since(before, snap)
            except BaseException:
                self._resync(snap)
                snap.filters.invalidate()
                raise
            snap.filters.update(moved)
            engine.index_generation = self.catalog.generation if ours else -1

    def catch_up(self) -> bool:
        """Apply to the served index what other processes committed since it was
        loaded (from the catalog's change log: the cost of the change). False if
        the log does not reach back that far (the index stays stale)."""
        engine, snap = self.engine, self.engine.snapshot
        with engine._rw.write(), self.catalog.reading():
            return self._catch_up(snap)

    # catalog and index together -------------------------------------------------
    def upsert_products(self, items: Sequence[Item]) -> None:
        with self._apply():
            self._upsert(items)

    def add_images(self, images: Sequence[NewImage], vectors: np.ndarray, products: Sequence[Item] = ()) -> list[int]:
        """Store images with their raw vectors from the served model, creating or
        updating ``products`` in the same transaction (a product appears with its
        first image, never without); returns the image ids."""
        with self._apply() as snap:
            self._upsert(products)
            ids = self._put_images(snap, images, vectors)
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
            ids = self._put_images(snap, [replace(i, product_id=product_id) for i in images or []], vectors)
            gone: dict[int, str] = {}
            if images is not None:
                gone = {row.id: row.sha256 for row in self.catalog.images_of(product_id) if row.id not in ids}
                self.catalog.remove_images(list(gone))
            self._remove(snap, list(gone))
        self._forget_files(gone)

    def remove_products(self, product_ids: Sequence[str]) -> list[int]:
        """Delete products and their images (stored copies and thumbnails too);
        returns the removed image ids."""
        with self._apply() as snap:
            gone = self._images_of(product_ids)
            removed = self.catalog.remove_products(list(product_ids))
            self._remove(snap, removed)
        self._forget_files(gone)
        return removed

    def prune(self, listed: set[tuple[str, str]]) -> tuple[int, list[int]]:
        """Remove products the ``(product_id, source)`` pairs do not list, and images
        their products no longer list. Returns (products removed, image ids removed)."""
        products = {pid for pid, _ in listed}
        with self._apply() as snap:
            stale_products = sorted(self.catalog.product_ids() - products)
            gone = self._images_of(stale_products)
            self.catalog.remove_products(stale_products)
            stale = [row for pid in products for row in self.catalog.images_of(pid) if (pid, row.source) not in listed]
            gone.update((row.id, row.sha256) for row in stale)
            self.catalog.remove_images([row.id for row in stale])
            self._remove(snap, list(gone))
        self._forget_files(gone)
        return len(stale_products), sorted(gone)

    def drop_model_vectors(self, model: str) -> None:
        with self.catalog.transaction(bump=False):
            self.catalog.drop_model_vectors(model)

    # the served snapshot -----------------------------------------------------------
    def build_index(self, projection: Projection, model: str, gallery: GalleryWeights | None) -> tuple[VectorIndex, int]:
        """A new index of ``model``'s stored vectors, and the catalog generation it
        reflects (read first: a commit from elsewhere during the build makes it stale)."""
        generation = self.catalog.generation
        return build_index(self.catalog, self.engine.manifest, projection, model, gallery), generation

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
        if manifest is not None:
            with engine._rw.write():  # one assignment for readers: info() never mixes two
                engine.manifest, engine._snapshot, engine.index_generation = manifest, snapshot, generation
            return
        with engine.dir_lock.hold():
            manifest = replace(engine.manifest, **changes)
            if changes:
                manifest.state_id = uuid.uuid4().hex
            if snapshot.index is not None:
                manifest.factory, manifest.tuning = snapshot.index.factory, snapshot.index.tuning
            manifest.catalog_generation = -1
            manifest.save(engine.paths)
            files()
            with engine._rw.write():
                engine.manifest, engine._snapshot, engine.index_generation = manifest, snapshot, generation
            self.save()

    def serve_saved(self, saved: VectorIndex | None, generation: int) -> None:
        """At open: serve the saved index (which reflects catalog ``generation``)
        caught up from the change log with what was committed after it was saved
        (another process's writes, or ours before a crash), in memory; or, if there
        is none or the log does not reach back, one rebuilt from the catalog, saved
        if the directory can be written (healed in memory if not)."""
        engine = self.engine
        if saved is not None:
            with engine._rw.write():
                engine._snapshot, engine.index_generation = replace(engine.snapshot, index=saved), generation
            if self.catch_up():
                return
        snap = engine.snapshot
        index, built = self.build_index(snap.projection, snap.model, snap.gallery)
        try:
            self.swap(engine.new_snapshot(snap.model, snap.projection, index, like=snap), built)
        except (OSError, StorageError, IndexBusyError) as exc:  # e.g. a read-only directory
            _log.warning("vsearch: could not save the rebuilt index of %s (%s); serving it from memory", engine.paths.root, exc)
            with engine._rw.write():
                engine._snapshot, engine.index_generation = replace(snap, index=index), built

    def rebuild(self) -> None:
        """Rebuild the served index from the catalog's stored vectors (no model work)."""
        snap = self.snapshot
        index, generation = self.build_index(snap.projection, snap.model, snap.gallery)
        self.swap(self.engine.new_snapshot(snap.model, snap.projection, index, like=snap), generation)

    def refit(self, raw: np.ndarray, source: str = "catalog") -> None:
        """Fit centring/PCA on ``raw`` (base-model vectors; ``source`` says what they
        are, for ``vsearch info``), rebuild the index from the catalog, serve both."""
        engine, snap = self.engine, self.snapshot
        projection = replace(Projection.fit(raw, engine.manifest.projection), fitted_from=source)
        index, generation = self.build_index(projection, snap.model, snap.gallery)
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
        reflects), under the directory's write lock, after catching up with the
        catalog; a stale index is rebuilt first. Skipped, with a warning, when
        another process has switched the directory to another model or projection
        since we loaded it: its state wins, and :func:`vsearch.versions.refresh`
        adopts it."""
        with self.engine.dir_lock.hold():
            image = self.capture()
            if image is not None:
                image.write()

    def capture(self) -> IndexImage | None:
        """The first half of :meth:`save`, for a caller already holding the directory
        lock: catch up, then copy the served index in memory under the read lock
        (writes wait for a memory copy, ~30 ms at 1M vectors, not for the disk).
        None if there is nothing to write (superseded, or rebuilt and saved)."""
        engine = self.engine
        if superseded(engine):
            return None
        if engine.snapshot.index is not None and not self.catch_up():
            self.rebuild()  # saves
            return None
        with engine._rw.read():
            snap = engine.snapshot
            copy = copy_index(snap.index) if snap.index is not None else None
            generation = engine.index_generation if snap.index is not None else -1
            return IndexImage(engine, engine.manifest, copy, generation, snap.vectors)

    def checkpoint(self, every: int = CHECKPOINT_EVERY) -> bool:
        """Save if the saved index lags the catalog by ``every`` generations or more
        (0: whenever it lags). Every write is durable once the catalog commits it
        (an open replays the change log), so a save is a checkpoint: it bounds the
        replay, not what survives. A save that fails (a full disk) is logged and
        left to the next checkpoint. Returns True if it saved."""
        if not self.checkpoint_due(every):
            return False
        try:
            self.save()
        except (OSError, VsearchError) as exc:
            log_save_failure(self.engine.paths.index, exc)
            return False
        return True

    def checkpoint_due(self, every: int) -> bool:
        manifest = self.engine.manifest
        lag = self.catalog.generation - manifest.catalog_generation
        return manifest.catalog_generation < 0 or lag >= max(every, 1)

    def finish(self) -> None:
        """After a batch of writes: fit the projection the first time (which links the
        images stored before there was an index to their near-duplicates), move to a
        bigger index type when the catalog has outgrown it, and save. (A catalog from
        before schema 8 keeps its backlog for a server's background linking or
        ``vsearch dups --link``: one search per image is the catalog's cost, not this
        write's.)"""
        if not self.engine.manifest.projection_fitted:
            self.engine.fit_projection()
        else:
            manifest, index = self.engine.manifest, self.snapshot.index
            if (
                not manifest.index.factory
                and index is not None
                and choose_factory(index.ntotal, manifest.dim) != manifest.factory
            ):
                self.rebuild()
            else:
                self.save()

    def link_pending(self, after: int = -1, batch: int = variants.PENDING_BATCH) -> int:
        """Link the next ``batch`` of images waiting for their near-duplicate links
        (vsearch.variants) with ids above ``after``, in one transaction; the served
        vectors do not change, so neither does the catalog generation. Returns the
        highest id looked at, -1 when none were (see :meth:`Engine.link_variants`).

        The index must hold every committed image (another server on this directory
        may have written), so it is caught up first; if it cannot be (its change log
        is gone), or another process commits in between, nothing is linked this time
        and the images stay pending. Locks in the write path's order: ``_rw``, then
        the catalog transaction."""
        engine, catalog = self.engine, self.catalog
        if engine.index_generation != catalog.generation and not self.catch_up():
            return -1
        with engine._rw.read(), _storage_errors(catalog), catalog.transaction(bump=False):
            if engine.index_generation != catalog.generation:  # no one commits while we hold the transaction
                return -1
            return linking.link_pending(catalog, self.snapshot, engine.manifest.duplicates, None, after=after, batch=batch)

    # internals ---------------------------------------------------------------------
    def _upsert(self, items: Sequence[Item]) -> None:
        for item in items:
            self.catalog.upsert_product(item.product_id, title=item.title, category=item.category, attributes=item.attributes)

    def _images_of(self, product_ids: Sequence[str]) -> dict[int, str]:
        return {row.id: row.sha256 for pid in product_ids for row in self.catalog.images_of(pid)}

    def _forget_files(self, gone: dict[int, str]) -> None:
        """After the commit that removed images: their stored copies no other image
        uses, and their thumbnails. A failure here costs disk space, not data."""
        if not gone:
            return
        try:
            unused = self.catalog.unused_sha256s(set(gone.values()))
            self.engine.image_store.forget(unused, gone)
        except OSError as exc:
            _log.warning("vsearch: could not delete the files of removed images: %s", exc)

    def _catch_up(self, snap: Snapshot) -> bool:
        """Inside a catalog transaction and the write lock: see :meth:`catch_up`."""
        engine, current = self.engine, self.catalog.generation
        if snap.index is None or engine.index_generation == current:
            return True
        changed = self.catalog.changed_images(engine.index_generation, snap.model) if engine.index_generation >= 0 else None
        if changed is None:
            return False
        self._reload(snap, changed)
        snap.filters.update(self.catalog.image_categories(changed))
        engine.index_generation = current
        return True

    def _categories_since(self, generation: int, snap: Snapshot) -> dict[int, str | None]:
        """Inside the transaction: the current category of each image it changed."""
        changed = self.catalog.changed_images(generation, snap.model)
        if changed is None:  # not in the log (cannot happen inside our own transaction)
            snap.filters.invalidate()
            return {}
        return self.catalog.image_categories(changed)

    def _resync(self, snap: Snapshot) -> None:
        """After a failed change: the images it touched, as the catalog has them now."""
        try:
            with self.catalog.reading():
                self._reload(snap, sorted(self._touched))
        except Exception:  # noqa: BLE001 - the catalog is unreachable: rebuild at the next save
            self.engine.index_generation = -1

    def _reload(self, snap: Snapshot, image_ids: list[int]) -> None:
        if snap.index is None or not image_ids:
            return
        snap.index.remove(np.array(image_ids, dtype=np.int64))
        ids, raw = self.catalog.vectors_by_id(image_ids, snap.model)
        if len(ids):
            snap.index.add(ids, snap.projection.apply(indexed_vectors(self.catalog, snap.gallery, ids, raw)))

    def _put_images(self, snap: Snapshot, images: Sequence[NewImage], vectors: np.ndarray | None) -> list[int]:
        """Store images and their vectors in the catalog and the index; returns their ids."""
        if not images or vectors is None:
            return []
        known = [self.catalog.image(i.product_id, i.source) is not None for i in images]
        ids = [
            self.catalog.put_image(i.product_id, i.source, i.sha256, i.width, i.height, v, model=snap.model)
            for i, v in zip(images, vectors)
        ]
        variants.store_phashes(self.catalog.db.conn, zip(ids, (i.phash for i in images)))
        self._stored += ids
        id_array = np.array(ids, dtype=np.int64)
        once = np.unique(id_array, return_counts=True)[1][np.searchsorted(np.unique(id_array), id_array)] == 1
        fresh = ~np.array(known) & once  # an image given twice in one call is not new the second time
        self._add(snap, id_array[fresh], vectors[fresh], new=True)  # never indexed: no removal scan
        self._add(snap, id_array[~fresh], vectors[~fresh])
        return ids

    def _add(self, snap: Snapshot, ids: np.ndarray, raw: np.ndarray, new: bool = False) -> None:
        if snap.index is not None and len(ids):
            self._touched.update(int(i) for i in ids)
            with one_thread(len(ids) < SMALL_CHANGE):
                # As the catalog stores them (float16 by default): the index then
                # equals one rebuilt or caught up from the catalog.
                stored = indexed_vectors(self.catalog, snap.gallery, ids, self.catalog.as_stored(raw))
                snap.index.add(ids, snap.projection.apply(stored), new=new)

    def _remove(self, snap: Snapshot, ids: list[int]) -> None:
        if snap.index is not None and ids:
            self._touched.update(ids)
            snap.index.remove(np.array(ids, dtype=np.int64))


@contextmanager
def _storage_errors(catalog: Catalog) -> Iterator[None]:
    """SQLite's write failures as the errors the edges translate: a full disk or a
    read-only catalog (nothing was committed), or another writer holding it."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise IndexBusyError(f"{catalog.path} is being written by another process; try again") from None
        raise StorageError(f"{catalog.path}: cannot write: {exc}; nothing was changed") from None
