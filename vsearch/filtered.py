"""Filtered search on an IVF index: probing, nearest first, only the lists that hold
allowed ids.

A filter is a set of allowed ids in blocks (one per category). Each query probes the
lists holding allowed ids, nearest first, until it has scanned as many allowed vectors
as it needs: a couple of lists' worth where the lists an unfiltered query would probe
hold allowed ids as densely as the index does (a filter spread evenly), many where
they hold none (the query's own category excluded: its nearest allowed vectors spread
over many lists; see FILTER_NEAR_LISTS). Rows the probed lists cannot fill are probed
again with 4x the targets; :class:`vsearch.index.VectorIndex` searches what is still
short exactly.

What that needs of a filter (its bitmap, how many allowed ids each list holds) is
built once per filter and kept (FILTER_CACHE_ENTRIES filters): a filter is known by
its blocks' arrays, which are never changed in place (a changed category is a new
array). Every add and remove updates those counts, and the map of which list holds
each id, at the cost of the change (:mod:`vsearch.ivflists`).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict

import faiss
import numpy as np

from .ivflists import FEW, ListFilter, ListMap, ivf_of, nearest_first
from .topk import merge_topk

__all__ = ["FilteredIVF"]

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


class FilteredIVF:
    """What filtered search keeps of one faiss index: which list holds each id, the
    kept filters and the lists' centroids, all built lazily by concurrent searches
    (under one lock) and kept current by :meth:`added` and :meth:`removed`."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self.ivf = index if isinstance(index, faiss.IndexIVF) else None  # IVF at the top: ids map to lists
        self._inner = ivf_of(index)  # the IVF inside, wherever it is (a view: index owns it)
        self.lists: ListMap | None = None
        self.sparse_ids = False  # ids too far apart for the dense list map: filtered searches go exact
        self.filters: OrderedDict[tuple[int, ...], ListFilter] = OrderedDict()
        self._lock = threading.Lock()
        self._centroid_cache: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        return int(self._inner.nlist) if self._inner is not None else 0

    def id_limit(self) -> int:
        return max(DENSE_IDS_PER_VECTOR * self.ntotal, 1 << 20)

    def pays(self, allowed: int, nprobe: int) -> bool:
        """Whether probing the lists beats the exact scan for a filter of ``allowed`` ids.

        Unfiltered, a query scans nprobe lists, about nprobe * ntotal / nlist vectors.
        Filtered, it probes the lists holding allowed ids nearest first until it has
        scanned enough *allowed* vectors (:meth:`_scan_targets`): for a filter spread
        evenly, FILTER_NEAR_LISTS lists' worth, about that over the filter's share of
        the index in all. Where that is more vectors than the filter allows, the exact
        scan of the allowed vectors is cheaper."""
        nlist, ntotal = self.nlist, self.ntotal
        if nlist == 0 or ntotal == 0 or self.sparse_ids:
            return False
        share = allowed / ntotal
        want = max(FILTER_NEAR_LISTS, FILTER_SCAN_FACTOR * nprobe * share) * ntotal / nlist
        return want / share < allowed

    def search(
        self, xq: np.ndarray, k: int, found: ListFilter, nprobe: int, paths: Counter[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(D, I, short): the top k of ``found``'s ids by probing, and the rows the
        probed lists could not fill (for the caller's exact scan). ``paths`` counts the
        rows served by the first probes ("selector") and by the second ("selector_more")."""
        lists = self.lists
        assert lists is not None  # found: the map exists
        if found.spread(lists.sizes):  # every query is near allowed ids: faiss's own probing does
            D, I = self._search_spread(xq, k, found, nprobe)
        else:
            coarse = xq @ self._centroids().T  # inner products with every list's centroid
            D, I = self._search_lists(xq, k, found, coarse, self._scan_targets(coarse, found, nprobe))
        short = np.flatnonzero(I[:, min(k, found.present) - 1] < 0)  # the probed lists held too few allowed ids
        paths["selector"] += len(xq) - len(short)
        if len(short):
            coarse = xq[short] @ self._centroids().T
            D2, I2 = self._search_lists(xq[short], k, found, coarse, 4 * self._scan_targets(coarse, found, nprobe))
            D[short], I[short] = D2, I2
            filled = I2[:, min(k, found.present) - 1] >= 0
            paths["selector_more"] += int(filled.sum())
            short = short[~filled]
        return D, I, short

    def filter(self, blocks: dict[str, np.ndarray]) -> ListFilter | None:
        """The filter of ``blocks``, built on first use and kept; None if this index
        cannot map its ids to lists (not IVF at the top, or ids too sparse)."""
        key = tuple(map(id, blocks.values()))  # the arrays, held by the filter: never another's
        with self._lock:
            found = self.filters.get(key)
            if found is not None:
                self.filters.move_to_end(key)
                return found
            lists = self._list_map()
        if lists is None:
            return None
        found = ListFilter.build(tuple(blocks.values()), lists, self.nlist, self.id_limit())
        if found is None:
            return None
        with self._lock:
            found = self.filters.setdefault(key, found)
            while len(self.filters) > FILTER_CACHE_ENTRIES:
                self.filters.popitem(last=False)
        return found

    def held(self, blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The blocks less the ids the index lacks; None where it cannot tell."""
        with self._lock:
            lists = self._list_map()
        if lists is None:
            return None
        return {key: ids[lists.lookup(ids) >= 0] for key, ids in blocks.items()}

    def added(self, ids: np.ndarray, lists: np.ndarray) -> None:
        """``ids`` (none of them held before) joined ``lists``."""
        self._moved(ids, None, lists)

    def removed(self, ids: np.ndarray) -> None:
        """``ids`` left the index (those it held); nothing to do where no list map
        was built (none is for an index without IVF at the top)."""
        self._moved(ids, self.lists.clear(ids) if self.lists is not None else None, None)

    def _forget(self) -> None:
        """Drop what was built: read again from the lists when next needed."""
        with self._lock:
            self.lists = None
            self.filters.clear()

    def _list_map(self) -> ListMap | None:
        """Which list holds each id (under self._lock): read on first use, then kept
        current by add and remove; None for ids too sparse for an array."""
        if self.lists is None and not self.sparse_ids and self.ivf is not None:
            self.lists = ListMap.read(self.ivf, self.id_limit())
            self.sparse_ids = self.lists is None
        return self.lists

    def _moved(self, ids: np.ndarray, old: np.ndarray | None, new: np.ndarray | None) -> None:
        """Keep the list map and the kept filters' counts current: ``ids`` left lists
        ``old`` and/or joined lists ``new`` (at the cost of the change)."""
        if self.lists is None:
            return  # nothing built yet: built from the lists when first needed
        if new is not None and not self.lists.set(ids, new, self.id_limit()):
            self._forget()
            self.sparse_ids = True
            return
        if len(ids) <= FEW:
            none = [-1] * len(ids)
            few = list(zip(ids.tolist(), none if old is None else old.tolist(), none if new is None else new.tolist()))
            for found in self.filters.values():
                found.moved_few(few)
            return
        for found in self.filters.values():
            found.moved(ids, old, new)

    def _centroids(self) -> np.ndarray:
        if self._centroid_cache is None:
            ivf = self._inner
            assert ivf is not None
            self._centroid_cache = np.asarray(ivf.quantizer.reconstruct_n(0, int(ivf.nlist)), dtype=np.float32)
        return self._centroid_cache

    def _search_spread(self, xq: np.ndarray, k: int, found: ListFilter, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """A filter spread evenly over the lists (:meth:`ListFilter.spread`): what
        :meth:`_scan_targets` asks of every query, FILTER_NEAR_LISTS lists' worth of
        allowed ids and FILTER_SCAN_FACTOR times those in its nprobe nearest lists, is
        its nearest max(NEAR / share, FACTOR * nprobe) lists: faiss probes them itself."""
        share = found.present / self.ntotal
        probes = min(self.nlist, math.ceil(max(FILTER_NEAR_LISTS / share, FILTER_SCAN_FACTOR * nprobe)))
        params = faiss.SearchParametersIVF(sel=found.selector, nprobe=probes)  # type: ignore[call-arg]
        kk = min(k, self.ntotal)
        D, I = self.index.search(xq, kk, params=params)
        D[I < 0] = -np.inf
        return merge_topk(D, I, k) if kk < k else (D, I)

    def _scan_targets(self, coarse: np.ndarray, found: ListFilter, nprobe: int) -> np.ndarray:
        """Per query row (``coarse``: its scores for every list), how many allowed
        vectors to scan: FILTER_NEAR_LISTS lists' worth where the nprobe lists nearest
        to it hold allowed ids as densely as the whole index (or more), FILTER_FAR_LISTS
        where half as densely or less (far), in proportion between; and at least
        FILTER_SCAN_FACTOR times as many as those lists hold."""
        lists = self.lists
        assert lists is not None
        nlist = coarse.shape[1]
        local = min(nprobe, nlist)
        if local == 1:
            near = coarse.argmax(axis=1)[:, None]
        else:  # the local largest, in no order
            near = np.argpartition(coarse, nlist - local, axis=1)[:, nlist - local :]
        allowed = found.per_list[near].sum(axis=1)
        density = allowed / np.maximum(lists.sizes[near].sum(axis=1), 1)
        far = np.clip(2 - 2 * density * (self.ntotal / found.present), 0, 1)  # half as dense or less: far
        worth = (FILTER_NEAR_LISTS + (FILTER_FAR_LISTS - FILTER_NEAR_LISTS) * far) * (self.ntotal / nlist)
        return np.maximum(worth, FILTER_SCAN_FACTOR * allowed)

    def _search_lists(
        self, xq: np.ndarray, k: int, found: ListFilter, coarse: np.ndarray, want: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search among the filter's ids, each query row probing its nearest of the
        lists that hold them (``coarse``: its scores for every list) until it has
        scanned its ``want`` allowed vectors."""
        ivf = self._inner
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
