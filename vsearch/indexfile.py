"""The index file: building a faiss index from the catalog's stored vectors, and
loading the saved one (``DIR/index.faiss``), which is derived data: a damaged or
mismatched file is rebuilt from the catalog, never trusted and never fatal."""

from __future__ import annotations

import logging

from .catalog import Catalog
from .errors import IndexFormatError
from .index import VectorIndex, choose_factory
from .manifest import IndexManifest, IndexPaths
from .projection import Projection

__all__ = ["FIT_SAMPLE", "build_index", "load_saved_index"]

_log = logging.getLogger("vsearch")
FIT_SAMPLE = 100_000  # vectors used to fit the projection and train IVF quantizers


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


def load_saved_index(paths: IndexPaths, manifest: IndexManifest, floor: int, mmap: bool = False) -> VectorIndex | None:
    """The saved index file, if ``manifest`` says it reflects a catalog generation the
    change log still reaches back to (``floor`` or later): the caller catches it up.
    Else None (a stale manifest, a missing or damaged file: rebuild)."""
    if manifest.catalog_generation < max(floor, 0) or not paths.index.exists():
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
