"""The FAISS index: vectors keyed by the catalog's image ids, with filtered search.

Vocabulary follows faiss: ``xb`` database vectors, ``xq`` queries, ``k`` neighbours,
``D`` scores (inner products of L2-normalised vectors, i.e. cosine) and ``I`` ids,
``-1`` where fewer than k exist.

Filtered search. A filter is a set of allowed ids in blocks (one per category, see
:mod:`vsearch.categories`). A ``Flat`` index, or a set small compared with an IVF
index, is searched exactly on the blocks' vectors, reconstructed once and kept in a
bounded :class:`~vsearch.categories.BlockCache`, so a query restricted to a 1%
category touches 1% of the data. A large set on an IVF index goes through faiss with
an ``IDSelector``, each query probing, nearest first, only the lists that hold allowed
ids until it has scanned FILTER_SCAN_FACTOR times as many allowed vectors as an
unfiltered query scans, as long as that costs less than the exact path; rows the
probed lists cannot fill are searched again with 4x the probes, then exactly.
``VectorIndex.paths`` counts which path each query row took ("all", "empty", "exact",
"selector", "selector_more", "exact_fallback").

Sizes. ``choose_factory`` keeps nlist within what the catalog can train (faiss wants
>= 39 training points per list); :meth:`VectorIndex.train_size` says how many points
to train on; :func:`tune_nprobe` picks the smallest nprobe whose recall@10 reaches a
target, which the index file keeps (faiss saves nprobe with an IVF index).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from .categories import BlockCache
from .errors import ConfigError, IndexFormatError
from .fsutil import atomic_write

__all__ = ["VectorIndex", "choose_factory", "gpu_available", "ivf_nlist", "merge_topk", "recall_at_k", "tune_nprobe"]

FLAT_MAX = 100_000
SQ_MAX = 2_000_000
DEFAULT_NPROBE = 16  # until tuned
# a filtered IVF query scans this many times as many allowed vectors as an unfiltered
# query scans vectors (3 gave recall@10 0.93 with 50% of the clusters allowed, 8 0.98)
FILTER_SCAN_FACTOR = 8
TRAIN_MIN_PER_LIST = 39  # faiss warns below this many training points per centroid
TRAIN_PER_LIST = 64  # what train_size asks for (faiss subsamples past 256 per centroid)
TRAIN_BASE = 100_000  # ... and at least this many, where the catalog has them


def choose_factory(n: int, d: int) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d``.

    Exact search while it is cheap; IVF with 8-bit scalar quantisation for medium
    catalogs; IVF-PQ for large ones. nlist ~ 4 sqrt(n), the faiss rule of thumb.
    """
    if n < 0 or d <= 0:
        raise ConfigError(f"bad index size n={n}, d={d}")
    if n <= FLAT_MAX:
        return "IDMap2,Flat"
    nlist = ivf_nlist(n)
    if n <= SQ_MAX:
        return f"IVF{nlist},SQ8"
    m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if d % m == 0)
    return f"IVF{nlist},PQ{m}x8"


def ivf_nlist(n: int) -> int:
    """nlist for ``n`` vectors: the power of two nearest 4 sqrt(n), lowered until the
    catalog holds TRAIN_PER_LIST training points per list (at least 1)."""
    nlist = 1 << max(round(math.log2(4 * math.sqrt(max(n, 1)))), 0)
    while nlist > 1 and nlist * TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each row's true top-k (``truth[:, :k]``, -1 ignored) found in
    ``found[:, :k]``: 10-recall@10 for k=10."""
    hits = total = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = t[t >= 0]
        hits += len(np.intersect1d(f, t))
        total += len(t)
    return hits / total if total else 1.0


def tune_nprobe(index: VectorIndex, xq: np.ndarray, target: float = 0.95, k: int = 10) -> tuple[int, float]:
    """The smallest nprobe whose recall@k reaches ``target``, and that recall.

    ``xq`` are queries drawn from the indexed vectors (e.g. 200 of them): the truth is
    the exhaustive search (nprobe = nlist, i.e. brute force over the index's own
    quantised vectors), each query's own vector (its first hit) left out on both
    sides. Searched at powers of two, then bisected. Leaves nprobe as it found it.
    """
    ivf = _ivf(index.index)
    if ivf is None or index.ntotal == 0 or len(xq) == 0:
        return index.nprobe, 1.0
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    kk = min(k + 1, index.ntotal)
    nlist = int(ivf.nlist)

    def measure(nprobe: int) -> np.ndarray:
        params = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
        return np.asarray(index.index.search(xq, kk, params=params)[1])

    truth = measure(nlist)[:, 1:]  # the query itself comes first

    def recall(nprobe: int) -> float:
        return recall_at_k(measure(nprobe), truth, kk)  # k true others in k+1 slots (one is the query)

    low, high, best = 0, 1, 0.0
    while high < nlist:
        best = recall(high)
        if best >= target:
            break
        low, high = high, high * 2
    if high >= nlist:
        high, best = nlist, 1.0
    while high - low > 1:  # recall grows with nprobe: bisect (low fails, high passes)
        mid = (low + high) // 2
        r = recall(mid)
        if r >= target:
            high, best = mid, r
        else:
            low = mid
    return high, best


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def merge_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best columns per row of concatenated partial results."""
    I = np.where(I < 0, -1, I)
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    if D.shape[1] > k:
        part = np.argpartition(-D, k - 1, axis=1)[:, :k]
        D, I = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
    order = np.argsort(-D, axis=1, kind="stable")
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


class VectorIndex:
    """A faiss index whose ids are catalog image ids."""

    def __init__(self, index: faiss.Index, factory: str, nprobe: int | None = DEFAULT_NPROBE) -> None:
        """``nprobe`` None keeps the one the faiss index holds (a loaded file's: tuned)."""
        self.index = index
        self.factory = factory
        ivf = _ivf(index)
        self.nprobe = nprobe if nprobe is not None else int(ivf.nprobe) if ivf is not None else DEFAULT_NPROBE
        self.recall_at_10: float | None = None  # measured by tune(), at self.nprobe
        # which path each query row took (see search); read by the metrics layer
        self.paths: Counter[str] = Counter()
        self._gpu: faiss.Index | None = None
        self._gpu_wanted = False
        self._lists: tuple[np.ndarray, np.ndarray] | None = None  # _list_map
        self._centroid_cache: np.ndarray | None = None
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
        ivf = _ivf(self.index)
        return int(ivf.nlist) if ivf is not None else 0

    @classmethod
    def create(cls, factory: str, d: int, nprobe: int | None = DEFAULT_NPROBE) -> VectorIndex:
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid faiss factory string {factory!r}: {exc}") from exc
        ivf = _ivf(index)
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
        ivf = _ivf(self.index)
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

    def tune(self, xq: np.ndarray, target: float = 0.95) -> tuple[int, float]:
        """Set nprobe to the smallest reaching recall@10 >= ``target`` on ``xq``
        (queries drawn from the indexed vectors): see :func:`tune_nprobe`."""
        if self.nlist == 0:
            return self.nprobe, 1.0
        nprobe, recall = tune_nprobe(self, xq, target)
        self.nprobe, self.recall_at_10 = nprobe, recall
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
        if not new:
            self.remove(ids)
        self.index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), ids)
        self._changed()

    def remove(self, ids: np.ndarray | Sequence[int]) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0 or self.ntotal == 0:
            return 0
        # An IVF index's hashtable direct map removes only by IDSelectorArray (it looks
        # each id up); a flat IDMap scans its ids, where a batch's hash set is faster.
        selector = faiss.IDSelectorArray(ids) if _ivf(self.index) is not None else faiss.IDSelectorBatch(ids)
        removed = int(self.index.remove_ids(selector))
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
        padded with id -1 / score -inf past the last hit.
        """
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if blocks is None:
            self.paths["all"] += len(xq)
            return self._search_all(xq, k)
        allowed = sum(len(ids) for ids in blocks.values())
        if allowed == 0:
            self.paths["empty"] += len(xq)
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        ids = np.concatenate(list(blocks.values()))
        plan = self._filtered_plan(ids)
        if plan is None:  # Flat, or the exact scan of the set costs less than probing
            self.paths["exact"] += len(xq)
            try:
                return self._search_blocks(xq, k, blocks, cache)
            except RuntimeError:  # a block names ids this index lacks (it was retired by a swap)
                return self._search_selected(xq, k, ids)
        D, I = self._search_lists(xq, k, ids, plan)
        short = np.flatnonzero(I[:, min(k, allowed) - 1] < 0)  # the probed lists held too few allowed ids
        self.paths["selector"] += len(xq) - len(short)
        if len(short):
            D2, I2 = self._search_lists(xq[short], k, ids, (plan[0], plan[1], 4 * plan[2]))
            D[short], I[short] = D2, I2
            filled = I2[:, min(k, allowed) - 1] >= 0
            self.paths["selector_more"] += int(filled.sum())
            short = short[~filled]
        if len(short):
            self.paths["exact_fallback"] += len(short)
            try:
                D[short], I[short] = self._search_blocks(xq[short], k, blocks, cache)
            except RuntimeError:  # ids this index lacks: what the selector found is all there is
                pass
        return D, I

    def _filtered_plan(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """For a search among ``ids`` on an IVF index: the lists holding any of them,
        how many of them each holds, and how many allowed vectors a query should scan;
        None for the exact path.

        Unfiltered, a query scans nprobe lists, about nprobe * ntotal / nlist vectors.
        Filtered, it probes the lists holding allowed ids nearest first until it has
        scanned that many *allowed* vectors (a category's vectors cluster: the plain
        nearest lists may hold none of them). Where that means scanning more vectors
        than the filter allows, the exact scan of the allowed vectors is cheaper.
        """
        ivf = _ivf(self.index)
        if ivf is None or self.ntotal == 0:
            return None
        all_ids, list_of = self._list_map()
        pos = np.minimum(np.searchsorted(all_ids, ids), len(all_ids) - 1)
        present = pos[all_ids[pos] == ids]
        if len(present) == 0:
            return None
        per_list = np.bincount(list_of[present], minlength=int(ivf.nlist))
        lists = np.flatnonzero(per_list)
        want = FILTER_SCAN_FACTOR * self.nprobe * self.ntotal / int(ivf.nlist)
        share = len(present) / self.ntotal  # lists hold allowed ids at this rate on average
        if want / share >= len(present):  # probing would scan about want / share vectors
            return None
        return lists, per_list[lists], math.ceil(want)

    def _list_map(self) -> tuple[np.ndarray, np.ndarray]:
        """An IVF index's ids, sorted, and the list holding each; kept until a change."""
        cached = self._lists
        if cached is None:
            ivf = _ivf(self.index)
            assert ivf is not None
            invlists, parts, owners = ivf.invlists, [], []
            assert invlists is not None
            for n in range(int(ivf.nlist)):
                size = invlists.list_size(n)
                if size:
                    ptr = invlists.get_ids(n)
                    parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                    invlists.release_ids(n, ptr)  # type: ignore[attr-defined]
                    owners.append(np.full(size, n, dtype=np.int32))
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            lists = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int32)
            order = np.argsort(ids, kind="stable")
            cached = self._lists = (ids[order], lists[order])
        return cached

    def _centroids(self) -> np.ndarray:
        if self._centroid_cache is None:
            ivf = _ivf(self.index)
            assert ivf is not None
            self._centroid_cache = np.asarray(ivf.quantizer.reconstruct_n(0, int(ivf.nlist)), dtype=np.float32)
        return self._centroid_cache

    def _search_lists(
        self, xq: np.ndarray, k: int, ids: np.ndarray, plan: tuple[np.ndarray, np.ndarray, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search among ``ids``, each query probing its nearest of the plan's lists
        until it has scanned the plan's number of allowed vectors."""
        ivf = _ivf(self.index)
        assert ivf is not None
        lists, counts, want = plan
        coarse = xq @ self._centroids()[lists].T  # inner products with the list centroids
        order = np.argsort(-coarse, axis=1, kind="stable")
        scanned = np.cumsum(counts[order], axis=1)
        nprobe = int(min(len(lists), 1 + (scanned < want).sum(axis=1).max()))
        order = order[:, :nprobe]
        Dq = np.ascontiguousarray(np.take_along_axis(coarse, order, 1), dtype=np.float32)
        Iq = np.where(scanned[:, :nprobe] - counts[order] < want, lists[order], -1).astype(np.int64)  # -1: not probed
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]
        kk = min(k, self.ntotal)
        D = np.empty((len(xq), kk), dtype=np.float32)
        I = np.empty((len(xq), kk), dtype=np.int64)
        # the python wrapper of search_preassigned takes no params (the selector): the C++ call does
        ivf.search_preassigned_c(  # type: ignore[attr-defined]
            len(xq), faiss.swig_ptr(xq), kk, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
            faiss.swig_ptr(D), faiss.swig_ptr(I), False, params,
        )  # fmt: skip
        return merge_topk(D, I, k)

    def _search_all(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ntotal == 0:
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        if self._gpu_wanted and self._gpu is None:
            self._mirror_to_gpu()
        index = self._gpu if self._gpu is not None else self.index
        D, I = index.search(xq, min(k, self.ntotal))
        return merge_topk(D, I, k)

    def _search_selected(self, xq: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search among ``ids`` with an ``IDSelector``; IVF: at the index's nprobe."""
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        ivf = _ivf(self.index)
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
        self._lists = None
        self._gpu = None  # re-mirrored lazily on the next search, not on every added batch

    def _apply_nprobe(self) -> None:
        ivf = _ivf(self.index)
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


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
