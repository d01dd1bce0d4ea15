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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss

from .errors import VsearchError
from .index import VectorIndex
from .manifest import IndexManifest

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["IndexImage", "copy_index", "log_save_failure", "superseded"]

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
