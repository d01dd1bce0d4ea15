"""The index file: building a faiss index from the catalog's stored vectors, and
loading the saved one (``DIR/index.faiss``), which is derived data: a damaged or
mismatched file is rebuilt from the catalog, never trusted and never fatal."""

from __future__ import annotations

import logging

import numpy as np

from .catalog import Catalog
from .errors import IndexFormatError
from .gallery import GalleryWeights
from .index import VectorIndex
from .manifest import IndexManifest, IndexPaths
from .projection import Projection
from .sizing import choose_factory
from .topk import ExactTopK

__all__ = ["FIT_SAMPLE", "TUNE_QUERIES", "build_index", "indexed_vectors", "load_saved_index"]

_log = logging.getLogger("vsearch")
FIT_SAMPLE = 100_000  # vectors used to fit the projection (IVF training: VectorIndex.train_size)
TUNE_QUERIES = 200  # indexed vectors drawn (seeded) to tune an IVF index's nprobe
TUNE_SEED = 1


def build_index(
    catalog: Catalog,
    manifest: IndexManifest,
    projection: Projection,
    model: str,
    gallery: GalleryWeights | None = None,
) -> VectorIndex:
    """A faiss index of ``model``'s stored vectors, reweighted per product by
    ``gallery`` (:mod:`vsearch.gallery`) and projected (no model work).

    An IVF index is trained on as many vectors as its lists need
    (:meth:`VectorIndex.train_size`), then, unless ``manifest.index.tune_recall`` is
    None, its nprobe is tuned to the smallest reaching that recall@10 against an exact
    search, on TUNE_QUERIES of its own vectors (drawn first; their true neighbours are
    found in the pass that adds the vectors). The saved file keeps the nprobe;
    ``index.tuning`` says how it was chosen (None where nothing was tuned), for the
    manifest of whoever serves the index (``manifest`` itself is only read: an upgrade
    builds while another index is served)."""
    config = manifest.index
    n = catalog.counts()["images"]
    dim = projection.out_dim(catalog.vector_dim(model) or manifest.raw_dim)
    factory = config.factory or choose_factory(n, dim)
    index = VectorIndex.create(factory, dim, nprobe=config.nprobe)
    if not index.is_trained:
        index.train(projection.apply(catalog.sample_vectors(index.train_size(), model=model)))
    truth = None
    if index.nlist and config.tune_recall is not None:
        truth = ExactTopK(projection.apply(catalog.sample_vectors(TUNE_QUERIES, seed=TUNE_SEED, model=model)))
    for ids, raw in catalog.iter_vectors(model=model):
        xb = projection.apply(indexed_vectors(catalog, gallery, ids, raw))
        index.add(ids, xb)
        if truth is not None:
            truth.add(ids, xb)
    if truth is not None and config.tune_recall is not None and index.ntotal:
        _tune(index, truth, config.tune_recall)
    index.to_gpu()
    return index


def indexed_vectors(catalog: Catalog, gallery: GalleryWeights | None, ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Stored vectors of images ``ids`` as an index holds them, before the projection."""
    if gallery is None or not len(ids):
        return raw
    owners = catalog.image_products([int(i) for i in ids])
    return gallery.apply([owners.get(int(i)) for i in ids], raw)


def _tune(index: VectorIndex, truth: ExactTopK, target: float) -> None:
    nprobe, recall = index.tune(truth.xq, target, truth=truth.others())
    if recall < target:
        _log.warning(
            "vsearch: %s over %d vectors reaches recall@10 %.3f at most (target %.2f); nprobe %d",
            index.factory, index.ntotal, recall, target, nprobe,
        )  # fmt: skip
    else:
        _log.info("vsearch: %s over %d vectors: nprobe %d gives recall@10 %.3f", index.factory, index.ntotal, nprobe, recall)


def load_saved_index(paths: IndexPaths, manifest: IndexManifest, floor: int, mmap: bool = False) -> VectorIndex | None:
    """The saved index file, if ``manifest`` says it reflects a catalog generation the
    change log still reaches back to (``floor`` or later): the caller catches it up.
    Else None (a stale manifest, a missing or damaged file: rebuild)."""
    if manifest.catalog_generation < max(floor, 0) or not paths.index.exists():
        return None
    try:
        nprobe = manifest.index.nprobe if manifest.index.tune_recall is None else None  # None: the file's (tuned)
        index = VectorIndex.load(paths.index, manifest.factory, nprobe=nprobe, mmap=mmap)
    except IndexFormatError as exc:  # a derived file: every vector is in the catalog
        _log.warning("vsearch: %s is damaged (%s); rebuilt from the catalog", paths.index, str(exc).split(":")[0])
        return None
    if index.d != manifest.dim:
        _log.warning("vsearch: %s has dimension %d, not %d; rebuilt from the catalog", paths.index, index.d, manifest.dim)
        return None
    if manifest.tuning is not None and manifest.tuning.nprobe == index.nprobe:
        index.tuning = manifest.tuning
    index.to_gpu()
    return index
