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
allowed ids until it has scanned as many allowed vectors as it needs: a couple of
lists' worth where the lists an unfiltered query would probe hold allowed ids as
densely as the index does (a filter spread evenly), many where they hold none (the
query's own category excluded: its nearest allowed vectors spread over many lists;
see FILTER_NEAR_LISTS). Rows the probed lists cannot fill are searched again with 4x
the probes, then exactly.

What that needs of a filter (its bitmap, how many allowed ids each list holds) is
built once per filter and kept (FILTER_CACHE_ENTRIES filters): a filter is known by
its blocks' arrays, which are never changed in place (a changed category is a new
array). Every add and remove updates those counts, and the map of which list holds
each id, at the cost of the change. ``VectorIndex.paths`` counts which path each query
row took (SEARCH_PATHS; "all" is unfiltered).

Sizes and nprobe tuning: :mod:`vsearch.sizing`; the lists' bookkeeping:
:mod:`vsearch.ivflists`.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from .categories import BlockCache
from .errors import ConfigError, IndexFormatError
from .fsutil import atomic_write
from .ivflists import FEW, ListFilter, ListMap, ivf_of, nearest_first
from .sizing import TRAIN_BASE, TRAIN_PER_LIST, IndexTuning, tune_nprobe
from .topk import merge_topk

__all__ = ["DEFAULT_NPROBE", "SEARCH_PATHS", "VectorIndex", "gpu_available"]

DEFAULT_NPROBE = 16  # until tuned
# A filtered IVF query probes, nearest first, the lists holding allowed ids until it
# has scanned this many lists' worth (ntotal / nlist each) of allowed vectors: NEAR
# where its nprobe nearest lists hold allowed ids as densely as the whole index does
# (or more), FAR where half as densely or less, in proportion between; and at least
# FILTER_SCAN_FACTOR times the allowed ids those nprobe lists hold. Measured on 100k
# and 1M vectors of a Gaussian mixture (scripts/bench_filtered.py): filters spread at
# random reach recall@10 0.98 at 2 lists' worth; filters of whole clusters, for
# queries outside them, 0.95-0.98 at 32-64 lists' worth (0.48-0.77 at 2).
FILTER_NEAR_LISTS = 2
FILTER_FAR_LISTS = 64
FILTER_SCAN_FACTOR = 2.0
FILTER_CACHE_ENTRIES = 64  # filters whose bitmap and per-list counts are kept
DENSE_IDS_PER_VECTOR = 16  # the id -> list map is an array indexed by id while ids stay below this many per vector
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
        self._lock = threading.Lock()  # the structures below, built lazily by concurrent searches
        self._lists: ListMap | None = None
        self._sparse_ids = False  # ids too far apart for the dense list map: filtered IVF searches go exact
        self._filters: OrderedDict[tuple[int, ...], ListFilter] = OrderedDict()
        self._centroid_cache: np.ndarray | None = None
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
        ivf = self.index if isinstance(self.index, faiss.IndexIVF) else None
        if ivf is None:
            self.index.add_with_ids(xb, ids)
            self._forget_lists()
        else:  # assigned here (what add_with_ids does) so that the filter structures learn the lists
            lists = np.ascontiguousarray(ivf.quantizer.assign(xb, 1).ravel(), dtype=np.int64)
            ivf.add_core(len(ids), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            self._moved(ids, None, lists)
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
            if isinstance(self.index, faiss.IndexIVF):
                self._moved(ids, self._lists.clear(ids) if self._lists is not None else None, None)
            else:
                self._forget_lists()
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
        found = self._filter(blocks) if self._probing_pays(allowed) else None
        if found is None or found.present == 0:  # Flat, or the exact scan of the set costs less than probing
            self.paths["exact"] += len(xq)
            return self._search_exact(xq, k, blocks, cache)
        lists = self._lists
        assert lists is not None  # found: the map exists
        if found.spread(lists.sizes):  # every query is near allowed ids: faiss's own probing does
            D, I = self._search_spread(xq, k, found)
        else:
            coarse = xq @ self._centroids().T  # inner products with every list's centroid
            D, I = self._search_lists(xq, k, found, coarse, self._scan_targets(coarse, found))
        short = np.flatnonzero(I[:, min(k, found.present) - 1] < 0)  # the probed lists held too few allowed ids
        self.paths["selector"] += len(xq) - len(short)
        if len(short):
            coarse = xq[short] @ self._centroids().T
            D2, I2 = self._search_lists(xq[short], k, found, coarse, 4 * self._scan_targets(coarse, found))
            D[short], I[short] = D2, I2
            filled = I2[:, min(k, found.present) - 1] >= 0
            self.paths["selector_more"] += int(filled.sum())
            short = short[~filled]
        if len(short):
            self.paths["exact_fallback"] += len(short)
            D[short], I[short] = self._search_exact(xq[short], k, blocks, cache)
        return D, I

    def _probing_pays(self, allowed: int) -> bool:
        """Whether an IVF index should probe its lists for a filter of ``allowed`` ids.

        Unfiltered, a query scans nprobe lists, about nprobe * ntotal / nlist vectors.
        Filtered, it probes the lists holding allowed ids nearest first until it has
        scanned enough *allowed* vectors (:meth:`_scan_targets`): for a filter spread
        evenly, FILTER_NEAR_LISTS lists' worth, about that over the filter's share of
        the index in all. Where that is more vectors than the filter allows, the exact
        scan of the allowed vectors is cheaper."""
        if self.nlist == 0 or self.ntotal == 0 or self._sparse_ids:
            return False
        share = allowed / self.ntotal
        want = max(FILTER_NEAR_LISTS, FILTER_SCAN_FACTOR * self.nprobe * share) * self.ntotal / self.nlist
        return want / share < allowed

    def _search_spread(self, xq: np.ndarray, k: int, found: ListFilter) -> tuple[np.ndarray, np.ndarray]:
        """A filter spread evenly over the lists (:meth:`ListFilter.spread`): what
        :meth:`_scan_targets` asks of every query, FILTER_NEAR_LISTS lists' worth of
        allowed ids and FILTER_SCAN_FACTOR times those in its nprobe nearest lists, is
        its nearest max(NEAR / share, FACTOR * nprobe) lists: faiss probes them itself."""
        share = found.present / self.ntotal
        nprobe = min(self.nlist, math.ceil(max(FILTER_NEAR_LISTS / share, FILTER_SCAN_FACTOR * self.nprobe)))
        params = faiss.SearchParametersIVF(sel=found.selector, nprobe=nprobe)  # type: ignore[call-arg]
        kk = min(k, self.ntotal)
        D, I = self.index.search(xq, kk, params=params)
        D[I < 0] = -np.inf
        return merge_topk(D, I, k) if kk < k else (D, I)

    def _scan_targets(self, coarse: np.ndarray, found: ListFilter) -> np.ndarray:
        """Per query row (``coarse``: its scores for every list), how many allowed
        vectors to scan: FILTER_NEAR_LISTS lists' worth where the nprobe lists nearest
        to it hold allowed ids as densely as the whole index (or more), FILTER_FAR_LISTS
        where half as densely or less (far), in proportion between; and at least
        FILTER_SCAN_FACTOR times as many as those lists hold."""
        lists = self._lists
        assert lists is not None
        nlist = coarse.shape[1]
        local = min(self.nprobe, nlist)
        if local == 1:
            near = coarse.argmax(axis=1)[:, None]
        else:  # the local largest, in no order
            near = np.argpartition(coarse, nlist - local, axis=1)[:, nlist - local :]
        allowed = found.per_list[near].sum(axis=1)
        density = allowed / np.maximum(lists.sizes[near].sum(axis=1), 1)
        far = np.clip(2 - 2 * density * (self.ntotal / found.present), 0, 1)  # half as dense or less: far
        worth = (FILTER_NEAR_LISTS + (FILTER_FAR_LISTS - FILTER_NEAR_LISTS) * far) * (self.ntotal / nlist)
        return np.maximum(worth, FILTER_SCAN_FACTOR * allowed)

    def _filter(self, blocks: dict[str, np.ndarray]) -> ListFilter | None:
        """The filter of ``blocks``, built on first use and kept; None if this index
        cannot map its ids to lists (not IVF at the top, or ids too sparse)."""
        key = tuple(map(id, blocks.values()))  # the arrays, held by the filter: never another's
        with self._lock:
            found = self._filters.get(key)
            if found is not None:
                self._filters.move_to_end(key)
                return found
            lists = self._list_map()
        if lists is None:
            return None
        found = ListFilter.build(tuple(blocks.values()), lists, self.nlist, self._id_limit())
        if found is None:
            return None
        with self._lock:
            found = self._filters.setdefault(key, found)
            while len(self._filters) > FILTER_CACHE_ENTRIES:
                self._filters.popitem(last=False)
        return found

    def _list_map(self) -> ListMap | None:
        """Which list holds each id (under self._lock): read on first use, then kept
        current by add and remove; None for ids too sparse for an array."""
        if self._lists is None and not self._sparse_ids and isinstance(self.index, faiss.IndexIVF):
            self._lists = ListMap.read(self.index, self._id_limit())
            self._sparse_ids = self._lists is None
        return self._lists

    def _id_limit(self) -> int:
        return max(DENSE_IDS_PER_VECTOR * self.ntotal, 1 << 20)

    def _moved(self, ids: np.ndarray, old: np.ndarray | None, new: np.ndarray | None) -> None:
        """Keep the list map and the kept filters' counts current: ``ids`` left lists
        ``old`` and/or joined lists ``new`` (at the cost of the change)."""
        if self._lists is None:
            return  # nothing built yet: built from the lists when first needed
        if new is not None and not self._lists.set(ids, new, self._id_limit()):
            self._forget_lists()
            self._sparse_ids = True
            return
        if len(ids) <= FEW:
            none = [-1] * len(ids)
            few = list(zip(ids.tolist(), none if old is None else old.tolist(), none if new is None else new.tolist()))
            for found in self._filters.values():
                found.moved_few(few)
            return
        for found in self._filters.values():
            found.moved(ids, old, new)

    def _forget_lists(self) -> None:
        with self._lock:
            self._lists = None
            self._filters.clear()

    def _centroids(self) -> np.ndarray:
        if self._centroid_cache is None:
            ivf = ivf_of(self.index)
            assert ivf is not None
            self._centroid_cache = np.asarray(ivf.quantizer.reconstruct_n(0, int(ivf.nlist)), dtype=np.float32)
        return self._centroid_cache

    def _search_lists(
        self, xq: np.ndarray, k: int, found: ListFilter, coarse: np.ndarray, want: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search among the filter's ids, each query row probing its nearest of the
        lists that hold them (``coarse``: its scores for every list) until it has
        scanned its ``want`` allowed vectors."""
        ivf = self._ivf_index
        assert ivf is not None
        lists, counts = found.nonzero()
        sub = coarse[:, lists]
        order = nearest_first(sub, counts, want)
        held = counts[order]
        probe = np.cumsum(held, axis=1) - held < want[:, None]  # a prefix of each row
        nprobe = int(probe.sum(axis=1).max())
        order, probe = order[:, :nprobe], probe[:, :nprobe]
        Iq = np.where(probe, lists[order], -1)  # -1: not probed
        Dq = np.ascontiguousarray(sub[np.arange(len(sub))[:, None], order], dtype=np.float32)
        params = faiss.SearchParametersIVF(sel=found.selector, nprobe=nprobe)  # type: ignore[call-arg]
        kk = min(k, self.ntotal)
        D = np.empty((len(xq), kk), dtype=np.float32)
        I = np.empty((len(xq), kk), dtype=np.int64)
        # the python wrapper of search_preassigned takes no params (the selector): the C++ call does
        ivf.search_preassigned_c(  # type: ignore[attr-defined]
            len(xq), faiss.swig_ptr(xq), kk, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
            faiss.swig_ptr(D), faiss.swig_ptr(I), False, params,
        )  # fmt: skip
        D[I < 0] = -np.inf  # faiss sorts each row, best first, and pads with id -1
        if kk < k:
            return merge_topk(D, I, k)
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
            held = self._held(blocks)
            if held is not None:
                return self._search_blocks(xq, k, held, None)
            return self._search_selected(xq, k, np.concatenate(list(blocks.values())))

    def _held(self, blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The blocks less the ids this IVF index lacks; None where it cannot tell
        (then :meth:`_search_selected`, exact on a Flat index, only at nprobe on IVF)."""
        with self._lock:
            lists = self._list_map()
        if lists is None:
            return None
        return {key: ids[lists.lookup(ids) >= 0] for key, ids in blocks.items()}

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
