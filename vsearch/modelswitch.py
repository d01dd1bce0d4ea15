"""Model versions of an open engine: list, switch (with reindexing), remove, and
pick up a switch another process made. Mixed into :class:`vsearch.engine.Engine`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from .catalog import BASE_MODEL, Catalog, ImageRow
from .embed import Embedder, pick_device
from .errors import IndexFormatError, IndexNotFoundError, VersionError
from .imagestore import ImageStore
from .index import VectorIndex
from .locks import RWLock
from .manifest import IndexManifest, IndexPaths
from .projection import Projection
from .reindex import ReindexReport, embed_missing
from .versions import VersionInfo, list_versions, remove_version_dir, version_dir

__all__ = ["ModelVersions"]


class ModelVersions:
    """The model-version half of :class:`vsearch.engine.Engine` (state lives there)."""

    paths: IndexPaths
    manifest: IndexManifest
    catalog: Catalog
    device: str | None
    active: str
    epoch: int
    projection: Projection
    index: VectorIndex | None
    image_store: ImageStore
    _embedder: Embedder | None
    _embedder_name: str
    _categories: dict[str, np.ndarray] | None
    _rw: RWLock
    _writer: threading.RLock

    if TYPE_CHECKING:

        def _load_embedder(self, name: str) -> Embedder: ...
        def _projection_for(self, name: str) -> Projection: ...
        def _build_index(self, projection: Projection, model: str) -> VectorIndex: ...
        def _saved_index(self, manifest: IndexManifest, mmap: bool = False) -> VectorIndex | None: ...
        def _save(self) -> None: ...

    def models(self) -> list[VersionInfo]:
        """``base`` and the fine-tuned versions in ``DIR/models``, oldest first."""
        return list_versions(self.paths.root, self.active)

    def use_model(self, name: str, *, quiet: bool = False, workers: int | None = None) -> ReindexReport:
        """Serve model version ``name``: embed every image that has no vector from it
        yet (resumable), build its index, then switch.

        Searches go on meanwhile with the old version; the switch swaps model, index
        and projection under the write lock, so each search uses one version
        completely. The old version's vectors stay, so switching back is quick.
        """
        with self._writer:
            if name != BASE_MODEL:
                version_dir(self.paths.root, name)  # exists and is complete
            same = name == self.active
            embedder: Embedder | None = self._embedder if same else None

            def get_embedder() -> Embedder:
                nonlocal embedder
                if embedder is None:
                    embedder = self._load_embedder(name)
                return embedder

            report = embed_missing(
                self.catalog,
                get_embedder,
                name,
                resolve=self._local_source,
                bump=same,
                workers=workers,
                device=pick_device(self.device),
                quiet=quiet,
            )
            projection = self.projection if same else self._projection_for(name)
            index = self._build_index(projection, name)
            raw_dim = self.catalog.vector_dim(name)
            with self._rw.write():
                self.active, self.projection, self.index = name, projection, index
                if not same:
                    self._embedder, self._embedder_name = embedder, name
                    self.epoch += 1
                    self._categories = None
                self.manifest.active_model = name
                self.manifest.raw_dim, self.manifest.dim = raw_dim, projection.out_dim(raw_dim)
                self.manifest.factory = index.factory
                # Written before the index: a crash in between leaves an index marked
                # stale, which the next open rebuilds for the new version.
                self.manifest.catalog_generation = -1
                self.manifest.save(self.paths)
            self._save()
            report.vectors = index.ntotal
            report.switched = not same
        return report

    def reindex(self, name: str | None = None, *, quiet: bool = False, workers: int | None = None) -> ReindexReport:
        """Embed what model version ``name`` (default: the active one) lacks and serve it."""
        return self.use_model(name or self.active, quiet=quiet, workers=workers)

    def remove_model(self, name: str) -> None:
        """Delete a fine-tuned version and its vectors (not the active one, not base)."""
        with self._writer:
            if name == BASE_MODEL:
                raise VersionError("the base model cannot be removed")
            if name == self.active:
                raise VersionError(f"model version {name!r} is active; switch first: vsearch model use base")
            version_dir(self.paths.root, name)
            with self.catalog.transaction(bump=False):
                self.catalog.drop_model_vectors(name)
            remove_version_dir(self.paths.root, name)

    def refresh(self) -> bool:
        """Pick up a switch or write that another process (e.g. ``vsearch reindex``
        next to ``vsearch serve``) saved to the index directory. Returns True if
        something was reloaded. Cheap when nothing changed: one small file read."""
        try:
            disk = IndexManifest.load(self.paths)
        except (IndexFormatError, IndexNotFoundError):
            return False
        mine = self.manifest
        if disk.catalog_generation == -1 or disk.updated_at <= mine.updated_at:
            return False  # mid-save elsewhere, or our own save
        if disk.active_model == self.active and disk.catalog_generation == mine.catalog_generation:
            return False
        with self._writer:
            name = disk.active_model
            embedder = self._embedder if name == self.active else self._load_embedder(name)
            projection = self._projection_for(name)
            index = self._saved_index(disk)
            if index is None:
                index = self._build_index(projection, name)
            with self._rw.write():
                if name != self.active:
                    self.epoch += 1
                    self._embedder, self._embedder_name = embedder, name
                self.manifest, self.active, self.projection, self.index = disk, name, projection, index
                self._categories = None
        return True

    def _local_source(self, row: ImageRow) -> str:
        stored = self.image_store.path(row.sha256)
        return str(stored) if stored is not None else row.source
