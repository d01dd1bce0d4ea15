"""Checkpoints: the index file and manifest as a copy of the served state.

Every write is durable once the catalog commits it (the change log lets an open
replay it), so saving the index only bounds that replay. A save copies the served
index in memory under the engine's read lock (writes wait for a memory copy, not for
the disk), then writes the copy and a manifest naming the catalog generation it
reflects, holding only the directory lock (:meth:`vsearch.writer.IndexWriter.capture`,
:meth:`vsearch.engine.Engine.checkpoint`).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss

from .errors import VsearchError
from .index import VectorIndex
from .indexfile import build_index
from .manifest import IndexManifest
from .sizing import choose_factory

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["IndexImage", "checkpoint", "copy_index", "log_save_failure", "superseded", "upgrade_index"]

_log = logging.getLogger("vsearch")


@dataclass
class IndexImage:
    """A copy of the served index and what the manifest will say of it, taken by
    :meth:`IndexWriter.capture`; :meth:`write` puts it on disk without the engine's
    locks (the caller holds the directory lock from capture to write)."""

    engine: Engine
    manifest: IndexManifest  # the one the copy was taken under: a refresh that replaced it meanwhile wins
    index: VectorIndex | None
    generation: int
    vectors: int

    def write(self) -> None:
        engine, paths = self.engine, self.engine.paths
        if self.index is not None:
            self.index.save(paths.index)
        counts = engine.catalog.counts()
        if engine.manifest is not self.manifest:
            return  # a refresh adopted another process's state while we wrote; the index file is its to describe
        self.manifest.counts = {**counts, "vectors": self.vectors}
        self.manifest.catalog_generation = self.generation
        self.manifest.save(paths)
        if self.index is not None:
            engine.catalog.prune_changes(self.generation)


def log_save_failure(path: Path, exc: BaseException) -> None:
    _log.warning("vsearch: could not save %s (%s); the catalog has every change; will retry", path, exc)


def copy_index(index: VectorIndex) -> VectorIndex:
    """An in-memory copy of ``index`` (faiss.clone_index: a memory copy, 30 ms for
    1M 64-d SQ8 vectors where writing the file took 0.1-0.5 s)."""
    try:
        copy = faiss.clone_index(index.index)
    except RuntimeError:  # a type clone_index does not know (a memory-mapped index): its bytes
        copy = faiss.deserialize_index(faiss.serialize_index(index.index))
    return VectorIndex(copy, index.factory, index.nprobe)


def superseded(engine: Engine) -> bool:
    """Whether another process has switched the directory to another model version or
    projection since ``engine`` loaded it: its state wins (``vsearch.versions.refresh``
    adopts it), so ours is not saved over it."""
    try:
        disk = IndexManifest.load(engine.paths)
    except VsearchError:
        return False  # none yet, or damaged: ours replaces it
    ours = engine.manifest
    if disk.state_id == ours.state_id or disk.updated_at <= ours.updated_at:
        return False
    _log.warning("vsearch: another process switched %s to another model or projection; not saved", engine.paths.root)
    return True


def checkpoint(engine: Engine, every: int = 1) -> bool:
    """Save the index if it lags the catalog by ``every`` generations or more (see
    :meth:`IndexWriter.checkpoint`); True if it saved. Writes go on while the file
    is written: they wait only for the in-memory copy (:meth:`IndexWriter.capture`).
    A failed save is logged and left to the next checkpoint."""
    try:
        with ExitStack() as files:
            with engine.writer() as writer:
                if not writer.checkpoint_due(every):
                    return False
                files.enter_context(engine.dir_lock.hold())  # lock order: writer, then directory
                image = writer.capture()
            if image is not None:  # None: superseded, or rebuilt and saved already
                image.write()
            return image is not None
    except (OSError, VsearchError) as exc:
        log_save_failure(engine.paths.index, exc)
        return False


def upgrade_index(engine: Engine) -> bool:
    """Move to the index type the catalog has grown into (Flat -> IVF -> IVF-PQ,
    :func:`~vsearch.sizing.choose_factory`; never with a configured factory). The new
    index is built aside from the stored vectors while searches and writes go on,
    then swapped in and caught up with the writes made meanwhile (the change log).
    False if the current type still fits. A server runs it after its background
    checkpoints, an ingest at its end: never inside a request."""
    snap, manifest = engine.snapshot, engine.manifest
    if manifest.index.factory or snap.index is None or choose_factory(snap.index.ntotal, manifest.dim) == manifest.factory:
        return False
    generation = engine.catalog.generation  # read before the build: later writes are caught up at the swap
    index = build_index(engine.catalog, manifest, snap.projection, snap.model, snap.gallery)
    with engine.writer() as writer:
        if engine.snapshot.model != snap.model or engine.snapshot.projection is not snap.projection:
            return False  # switched or refitted meanwhile: that swap built its own index
        writer.swap(engine.new_snapshot(snap.model, snap.projection, index, like=engine.snapshot), generation)
    _log.info("vsearch: %s now serves %s (%d vectors)", engine.paths.root, index.factory, index.ntotal)
    return True
