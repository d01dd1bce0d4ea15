"""The FAISS index: vectors keyed by the catalog's image ids, with filtered search.

Vocabulary follows faiss: ``xb`` database vectors, ``xq`` queries, ``k`` neighbours,
``D`` scores (inner products of L2-normalised vectors, i.e. cosine) and ``I`` ids,
``-1`` where fewer than k exist.

Filtered search. A filter is a set of allowed ids in blocks (one per category, see
:mod:`vsearch.categories`). A ``Flat`` index, or a set small compared with an IVF
index, is searched exactly on the blocks' vectors, reconstructed once and kept in a
bounded :class:`~vsearch.categories.BlockCache`, so a query restricted to a 1%
category touches 1% of the data. A larger set on an IVF index goes through faiss with
an ``IDSelectorBitmap``, each query probing, nearest first, only the lists that hold
allowed ids (:mod:`vsearch.filtered`); rows the probes cannot fill are searched
exactly. ``VectorIndex.paths`` counts which path each query row took (SEARCH_PATHS;
"all" is unfiltered).

Sizes and nprobe tuning: :mod:`vsearch.sizing`; the lists' bookkeeping:
:mod:`vsearch.ivflists`; filtered probing: :mod:`vsearch.filtered`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from .categories import BlockCache
from .errors import ConfigError, IndexFormatError
from .filtered import FilteredIVF
from .fsutil import atomic_write
from .ivflists import ivf_of
from .sizing import TRAIN_BASE, TRAIN_PER_LIST, IndexTuning, tune_nprobe
from .topk import merge_topk

__all__ = ["DEFAULT_NPROBE", "SEARCH_PATHS", "VectorIndex", "gpu_available"]

DEFAULT_NPROBE = 16  # until tuned
SEARCH_PATHS = ("all", "empty", "exact", "selector", "selector_more", "exact_fallback")


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A faiss index whose ids are catalog image ids."""

    def __init__(self, index: faiss.Index, factory: str, nprobe: int | None = DEFAULT_NPROBE) -> None:
        """``nprobe`` None keeps the one the faiss index holds (a loaded file's: tuned)."""
        self.index = index
        self.factory = factory
        ivf = ivf_of(index)
        self.nprobe = nprobe if nprobe is not None else int(ivf.nprobe) if ivf is not None else DEFAULT_NPROBE
        self.tuning: IndexTuning | None = None  # set by tune(), or by whoever loads a tuned index
        # which path each query row took (see search); read by the metrics layer
        self.paths: Counter[str] = Counter()
        self._gpu: faiss.Index | None = None
        self._gpu_wanted = False
        self.filtered = FilteredIVF(index)  # what filtered IVF searches keep
        self._ivf_index = ivf  # the IVF inside (a view: self.index owns it)
        self._apply_nprobe()

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        """The number of inverted lists; 0 for an exact (non-IVF) index."""
        return int(self._ivf_index.nlist) if self._ivf_index is not None else 0

    @property
    def recall_at_10(self) -> float | None:
        """The recall@10 :meth:`tune` measured at the tuned nprobe (None: not tuned here)."""
        return self.tuning.recall_at_10 if self.tuning is not None else None

    @classmethod
    def create(cls, factory: str, d: int, nprobe: int | None = DEFAULT_NPROBE) -> VectorIndex:
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid faiss factory string {factory!r}: {exc}") from exc
        ivf = ivf_of(index)
        if ivf is not None:
            # Reconstruct and remove by id need a direct map from ids to list entries.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
            pq = faiss.downcast_index(ivf)
            if hasattr(pq, "do_polysemous_training"):  # IVF-PQ: minutes of training for codes we never compare
                pq.do_polysemous_training = False
        return cls(index, factory, nprobe)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train_size(self) -> int:
        """How many vectors :meth:`train` wants: TRAIN_PER_LIST per IVF list (and per
        PQ centroid), at least TRAIN_BASE, at most 256 per list (faiss's own cap)."""
        ivf = ivf_of(self.index)
        if ivf is None or self.index.is_trained:
            return 0
        centroids = int(ivf.nlist)
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            centroids = max(centroids, int(pq.ksub))
        return max(min(256 * centroids, TRAIN_BASE), TRAIN_PER_LIST * centroids)

    def train(self, xb: np.ndarray) -> None:
        if not self.index.is_trained:
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            nlist = self.nlist
            if len(xb) < nlist:
                raise ConfigError(f"{self.factory}: {len(xb)} vectors cannot train {nlist} lists; use a smaller nlist")
            self.index.train(xb)

    def tune(self, xq: np.ndarray, target: float = 0.95, truth: np.ndarray | None = None) -> tuple[int, float]:
        """Set nprobe to the smallest reaching recall@10 >= ``target`` on ``xq``
        (queries drawn from the indexed vectors; ``truth`` their exact neighbours):
        see :func:`tune_nprobe`. :attr:`tuning` records it."""
        if self.nlist == 0:
            return self.nprobe, 1.0
        nprobe, recall = tune_nprobe(self, xq, target, truth=truth)
        self.nprobe = nprobe
        self.tuning = IndexTuning(nprobe, round(recall, 4), self.ntotal, len(xq), target, truth is not None)
        self._apply_nprobe()
        self._gpu = None
        return nprobe, recall

    def add(self, ids: np.ndarray, xb: np.ndarray, new: bool = False) -> None:
        """Add (or replace) vectors under ``ids``; replacing keeps the id. ``new``:
        the caller knows none of ``ids`` is in the index, which skips the removal
        (a flat IDMap finds ids by scanning all of them: O(index) per add)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if not new:
            self.remove(ids)
        ivf = self.filtered.ivf
        if ivf is None:  # no lists at the top: filtered search keeps nothing to update
            self.index.add_with_ids(xb, ids)
        else:  # assigned here (what add_with_ids does) so that the filter structures learn the lists
            lists = np.ascontiguousarray(ivf.quantizer.assign(xb, 1).ravel(), dtype=np.int64)
            ivf.add_core(len(ids), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            self.filtered.added(ids, lists)
        self._changed()

    def remove(self, ids: np.ndarray | Sequence[int]) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0 or self.ntotal == 0:
            return 0
        # An IVF index's hashtable direct map removes only by IDSelectorArray (it looks
        # each id up); a flat IDMap scans its ids, where a batch's hash set is faster.
        selector = faiss.IDSelectorArray(ids) if self._ivf_index is not None else faiss.IDSelectorBatch(ids)
        removed = int(self.index.remove_ids(selector))
        if removed:
            self.filtered.removed(ids)
        self._changed()
        return removed

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.d), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)

    def search(
        self, xq: np.ndarray, k: int, blocks: dict[str, np.ndarray] | None = None, cache: BlockCache | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and scores, optionally only among the ids in ``blocks``.

        ``blocks`` maps a cache key (e.g. a category) to sorted image ids; results come
        from their union. ``cache`` keeps the blocks' vectors between searches. Rows are
        padded with id -1 / score -inf past the last hit. A filter's arrays must not be
        changed in place afterwards: what a filtered IVF search builds of them is kept
        by their identity.
        """
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if blocks is None:
            self.paths["all"] += len(xq)
            return self._search_all(xq, k)
        allowed = sum(map(len, blocks.values()))
        if allowed == 0:
            self.paths["empty"] += len(xq)
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        found = self.filtered.filter(blocks) if self.filtered.pays(allowed, self.nprobe) else None
        if found is None or found.present == 0:  # Flat, or the exact scan of the set costs less than probing
            self.paths["exact"] += len(xq)
            return self._search_exact(xq, k, blocks, cache)
        D, I, short = self.filtered.search(xq, k, found, self.nprobe, self.paths)
        if len(short):
            self.paths["exact_fallback"] += len(short)
            D[short], I[short] = self._search_exact(xq[short], k, blocks, cache)
        return D, I

    def _search_all(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ntotal == 0:
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        if self._gpu_wanted and self._gpu is None:
            self._mirror_to_gpu()
        index = self._gpu if self._gpu is not None else self.index
        D, I = index.search(xq, min(k, self.ntotal))
        return merge_topk(D, I, k)

    def _search_exact(
        self, xq: np.ndarray, k: int, blocks: dict[str, np.ndarray], cache: BlockCache | None
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._search_blocks(xq, k, blocks, cache)
        except RuntimeError:  # a block names ids this index lacks (a swap retired it, or the blocks are newer)
            held = self.filtered.held(blocks)
            if held is not None:
                return self._search_blocks(xq, k, held, None)
            return self._search_selected(xq, k, np.concatenate(list(blocks.values())))

    def _search_selected(self, xq: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search among ``ids`` with an ``IDSelector``; IVF: at the index's nprobe."""
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        ivf = ivf_of(self.index)
        if ivf is not None:
            params: faiss.SearchParameters = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)  # type: ignore[call-arg]
        else:
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        D, I = self.index.search(xq, min(k, self.ntotal), params=params)
        return merge_topk(D, I, k)

    def _search_blocks(
        self, xq: np.ndarray, k: int, blocks: dict[str, np.ndarray], cache: BlockCache | None
    ) -> tuple[np.ndarray, np.ndarray]:
        parts_D, parts_I = [], []
        for key, ids in blocks.items():
            if len(ids) == 0:
                continue
            xb = cache.vectors(key, ids, self.reconstruct) if cache is not None else self.reconstruct(ids)
            D, pos = faiss.knn(xq, xb, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            parts_D.append(D)
            parts_I.append(ids[pos])
        if not parts_D:
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        return merge_topk(np.concatenate(parts_D, 1), np.concatenate(parts_I, 1), k)

    def _changed(self) -> None:
        self._gpu = None  # re-mirrored lazily on the next search, not on every added batch

    def _apply_nprobe(self) -> None:
        ivf = ivf_of(self.index)
        if ivf is not None:
            ivf.nprobe = self.nprobe

    def to_gpu(self) -> bool:
        """Serve unfiltered searches from a GPU mirror when faiss sees a GPU."""
        self._gpu_wanted = gpu_available()
        return self._gpu_wanted and self._mirror_to_gpu()

    def _mirror_to_gpu(self) -> bool:
        try:
            self._gpu_resources = faiss.StandardGpuResources()  # must outlive the GPU index
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        except RuntimeError:  # not every index type has a GPU version: stay on the CPU
            self._gpu, self._gpu_wanted = None, False
            return False
        return True

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))

    @classmethod
    def load(cls, path: Path, factory: str, nprobe: int | None = None, mmap: bool = False) -> VectorIndex:
        try:
            if mmap:
                try:
                    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                except RuntimeError:  # this index type cannot be memory-mapped
                    index = faiss.read_index(str(path))
            else:
                index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexFormatError(f"cannot read faiss index {path}: {exc}") from exc
        return cls(index, factory, nprobe)
