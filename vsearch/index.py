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

Sizes. ``choose_factory`` keeps nlist within what the catalog can train (faiss wants
>= 39 training points per list); :meth:`VectorIndex.train_size` says how many points
to train on; :func:`tune_nprobe` picks the smallest nprobe whose recall@10 against an
exact search reaches a target, which the index file keeps (faiss saves nprobe with an
IVF index) and :class:`IndexTuning` records.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .categories import BlockCache
from .errors import ConfigError, IndexFormatError
from .fsutil import atomic_write

__all__ = [
    "SEARCH_PATHS",
    "ExactTopK",
    "IndexTuning",
    "VectorIndex",
    "choose_factory",
    "gpu_available",
    "ivf_nlist",
    "merge_topk",
    "recall_at_k",
    "tune_nprobe",
]

FLAT_MAX = 100_000
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
FILTER_SPREAD = 0.9  # see _Filter.spread
FILTER_CACHE_ENTRIES = 64  # filters whose bitmap and per-list counts are kept
DENSE_IDS_PER_VECTOR = 16  # the id -> list map is an array indexed by id while ids stay below this many per vector
FEW = 32  # changes of up to this many ids update the filter structures in a loop: numpy's calls cost more
TRAIN_MIN_PER_LIST = 39  # faiss warns below this many training points per centroid
TRAIN_PER_LIST = 64  # what train_size asks for (faiss subsamples past 256 per centroid)
TRAIN_BASE = 100_000  # ... and at least this many, where the catalog has them
SEARCH_PATHS = ("all", "empty", "exact", "selector", "selector_more", "exact_fallback")


def choose_factory(n: int, d: int) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d``.

    Exact search while it is cheap; past FLAT_MAX, IVF with 8-bit scalar quantisation,
    nlist ~ 4 sqrt(n) (the faiss rule of thumb), at every size. Not IVF-PQ: on
    clustered data (``scripts/bench_filtered.py --factories``) PQ codes of d/4 bytes
    reach recall@10 0.61-0.67 at any nprobe, and re-ranked from SQ8 codes they reach
    0.95-0.98 but hold d/4 + d bytes a vector, more than SQ8 alone (d bytes, 0.98);
    faiss's IndexRefine cannot hold catalog ids anyway (no add_with_ids or remove_ids,
    and its labels must be below ntotal).
    """
    if n < 0 or d <= 0:
        raise ConfigError(f"bad index size n={n}, d={d}")
    if n <= FLAT_MAX:
        return "IDMap2,Flat"
    return f"IVF{ivf_nlist(n)},SQ8"


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


@dataclass(frozen=True)
class IndexTuning:
    """How :meth:`VectorIndex.tune` set an IVF index's nprobe: the smallest whose
    recall@10 on ``queries`` of its own vectors reached ``target`` (or, where none does,
    99% of what the exhaustive search reaches), ``recall_at_10`` at it, measured with
    ``vectors`` indexed; against an exact search of the vectors (``exact``) or, without
    them, of the index's own codes."""

    nprobe: int
    recall_at_10: float
    vectors: int
    queries: int
    target: float
    exact: bool = True


def tune_nprobe(
    index: VectorIndex, xq: np.ndarray, target: float = 0.95, k: int = 10, truth: np.ndarray | None = None
) -> tuple[int, float]:
    """The smallest nprobe whose recall@k reaches ``target``, and that recall.

    ``xq`` are queries drawn from the indexed vectors (e.g. 200 of them), each one's own
    vector its first hit, left out on both sides. ``truth``: each query's k nearest
    others by an exact search of the indexed vectors (:class:`ExactTopK`);
    without it, the exhaustive search of the index's own codes (nprobe = nlist), which
    hides what quantisation loses. Where no nprobe reaches ``target``, the target is 99%
    of the exhaustive search's recall. Searched at powers of two, then bisected. Leaves
    nprobe as it found it.
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

    others = measure(nlist)[:, 1:] if truth is None else truth  # the query itself comes first
    seen: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in seen:  # k true others in k+1 slots (one is the query)
            seen[nprobe] = 1.0 if truth is None and nprobe == nlist else recall_at_k(measure(nprobe), others, kk)
        return seen[nprobe]

    nprobe = _smallest_reaching(recall, target, nlist)
    if nprobe is None:
        nprobe = _smallest_reaching(recall, 0.99 * recall(nlist), nlist)
        assert nprobe is not None
    return nprobe, recall(nprobe)


def _smallest_reaching(recall: Callable[[int], float], target: float, nlist: int) -> int | None:
    """The smallest nprobe in [1, nlist] with recall(nprobe) >= target (recall grows with
    nprobe): powers of two, then bisection; None if nlist falls short."""
    low, high = 0, 1
    while recall(min(high, nlist)) < target:
        if high >= nlist:
            return None
        low, high = high, high * 2
    high = min(high, nlist)
    while high - low > 1:
        mid = (low + high) // 2
        if recall(mid) >= target:
            high = mid
        else:
            low = mid
    return high


class ExactTopK:
    """The exact top-k ids of some queries over vectors fed a batch at a time (an
    index build's own pass over the catalog), for :func:`tune_nprobe`'s truth."""

    def __init__(self, xq: np.ndarray, k: int = 11) -> None:
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k = k
        self.D = np.full((len(xq), 0), -np.inf, dtype=np.float32)
        self.I = np.zeros((len(xq), 0), dtype=np.int64)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        if len(ids) == 0 or len(self.xq) == 0:
            return
        scores = self.xq @ np.ascontiguousarray(xb, dtype=np.float32).T
        self.D, self.I = merge_topk(
            np.concatenate([self.D, scores], 1), np.concatenate([self.I, np.broadcast_to(ids, scores.shape)], 1), self.k
        )

    def others(self) -> np.ndarray:
        """Each query's nearest ids but the first (the query's own vector)."""
        return self.I[:, 1:]


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


class _ListMap:
    """Which inverted list holds each id of an IVF index (-1: none), as an array indexed
    by id, and how many ids each list holds: read from the lists once, then kept
    current by every add and remove."""

    def __init__(self, nlist: int) -> None:
        self.of = np.full(0, -1, dtype=np.int32)
        self.sizes = np.zeros(nlist, dtype=np.int64)

    @classmethod
    def read(cls, ivf: faiss.IndexIVF, limit: int) -> _ListMap | None:
        """The map of ``ivf``'s lists; None if an id is negative or past ``limit``."""
        invlists, parts, owners = ivf.invlists, [], []
        assert invlists is not None
        for n in range(int(ivf.nlist)):
            size = invlists.list_size(n)
            if size:
                ptr = invlists.get_ids(n)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(n, ptr)  # type: ignore[attr-defined]
                owners.append(np.full(size, n, dtype=np.int32))
        lists = cls(int(ivf.nlist))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        ok = lists.set(ids, np.concatenate(owners) if owners else np.zeros(0, dtype=np.int32), limit)
        return lists if ok else None

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        inside = (ids >= 0) & (ids < len(self.of))
        out = np.full(len(ids), -1, dtype=np.int32)
        out[inside] = self.of[ids[inside]]
        return out

    def set(self, ids: np.ndarray, lists: np.ndarray, limit: int) -> bool:
        """Record ``ids`` (none of them held) in ``lists``; False (nothing recorded)
        if an id does not fit."""
        if len(ids) == 0:
            return True
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            return False
        if high >= len(self.of):
            grown = np.full(max(high + 1, len(self.of) * 5 // 4), -1, dtype=np.int32)
            grown[: len(self.of)] = self.of
            self.of = grown
        if len(ids) <= FEW:
            for i, n in zip(ids.tolist(), lists.tolist()):
                self.of[i] = n
                self.sizes[n] += 1
            return True
        self.of[ids] = lists
        self.sizes += np.bincount(lists, minlength=len(self.sizes))
        return True

    def clear(self, ids: np.ndarray) -> np.ndarray:
        """Forget ``ids``; returns the lists that held them (-1: none)."""
        if len(ids) <= FEW:
            out, of, end = [], self.of, len(self.of)
            for i in ids.tolist():
                n = int(of[i]) if 0 <= i < end else -1
                out.append(n)
                if n >= 0:
                    of[i] = -1
                    self.sizes[n] -= 1
            return np.array(out, dtype=np.int32)
        old = self.lookup(ids)
        held = old >= 0
        self.of[ids[held]] = -1
        self.sizes -= np.bincount(old[held], minlength=len(self.sizes))
        return old


@dataclass
class _Filter:
    """What a filtered IVF search needs of one filter, built once: the bitmap selector
    of its ids, and how many of them each list holds (kept current by adds/removes)."""

    blocks: tuple[np.ndarray, ...]  # the caller's arrays: held, so that the ids in the cache key stay theirs
    bits: np.ndarray  # bit i of byte i >> 3: id i is allowed
    selector: faiss.IDSelector
    per_list: np.ndarray
    view: memoryview  # of bits, for quick lookups one id at a time
    _nonzero: tuple[np.ndarray, np.ndarray] | None = None
    _spread: bool | None = None

    @classmethod
    def build(cls, blocks: tuple[np.ndarray, ...], lists: _ListMap, nlist: int, limit: int) -> _Filter | None:
        """The filter of ``blocks``; None if an id is negative or past ``limit``."""
        allowed = np.concatenate(blocks)
        if int(allowed.min()) < 0 or int(allowed.max()) >= limit:
            return None
        bits = np.zeros(int(allowed.max()) + 1, dtype=bool)
        bits[allowed] = True
        packed = np.packbits(bits, bitorder="little")
        where = lists.lookup(allowed)
        per_list = np.bincount(where[where >= 0], minlength=nlist).astype(np.int64)
        selector = faiss.IDSelectorBitmap(packed)  # type: ignore[call-arg,arg-type]
        return cls(blocks, packed, selector, per_list, packed.data)

    @property
    def present(self) -> int:
        return int(self.per_list.sum())

    def spread(self, sizes: np.ndarray) -> bool:
        """Whether the lists holding FILTER_SPREAD of the vectors (``sizes``: per list)
        each hold allowed ids at least half as densely as the whole index does: then
        no query is far from allowed ids (a filter at random, not whole categories)."""
        if self._spread is None:
            dense = self.per_list >= 0.5 * (self.present / max(int(sizes.sum()), 1)) * sizes
            self._spread = bool(sizes[dense].sum() >= FILTER_SPREAD * sizes.sum())
        return self._spread

    def nonzero(self) -> tuple[np.ndarray, np.ndarray]:
        """The lists holding allowed ids, and how many each holds."""
        cached = self._nonzero
        if cached is None:
            lists = np.flatnonzero(self.per_list)
            cached = self._nonzero = (lists, self.per_list[lists])
        return cached

    def moved(self, ids: np.ndarray, old: np.ndarray | None, new: np.ndarray | None) -> None:
        """``ids`` left lists ``old`` and/or joined lists ``new`` (-1: none)."""
        inside = (ids >= 0) & (ids < 8 * len(self.bits))
        member = np.zeros(len(ids), dtype=bool)
        member[inside] = (self.bits[ids[inside] >> 3] >> (ids[inside] & 7)) & 1 == 1
        if not member.any():
            return
        for lists, sign in ((old, -1), (new, 1)):
            if lists is not None:
                self.per_list += sign * np.bincount(lists[member & (lists >= 0)], minlength=len(self.per_list))
        self._nonzero = self._spread = None

    def moved_few(self, changes: list[tuple[int, int, int]]) -> None:
        """:meth:`moved` for a few (id, old list, new list): a loop beats numpy's calls."""
        bits, end, hit = self.view, 8 * len(self.view), False
        for i, old, new in changes:
            if 0 <= i < end and (bits[i >> 3] >> (i & 7)) & 1:
                hit = True
                if old >= 0:
                    self.per_list[old] -= 1
                if new >= 0:
                    self.per_list[new] += 1
        if hit:
            self._nonzero = self._spread = None


class VectorIndex:
    """A faiss index whose ids are catalog image ids."""

    def __init__(self, index: faiss.Index, factory: str, nprobe: int | None = DEFAULT_NPROBE) -> None:
        """``nprobe`` None keeps the one the faiss index holds (a loaded file's: tuned)."""
        self.index = index
        self.factory = factory
        ivf = _ivf(index)
        self.nprobe = nprobe if nprobe is not None else int(ivf.nprobe) if ivf is not None else DEFAULT_NPROBE
        self.tuning: IndexTuning | None = None  # set by tune(), or by whoever loads a tuned index
        # which path each query row took (see search); read by the metrics layer
        self.paths: Counter[str] = Counter()
        self._gpu: faiss.Index | None = None
        self._gpu_wanted = False
        self._lock = threading.Lock()  # the structures below, built lazily by concurrent searches
        self._lists: _ListMap | None = None
        self._sparse_ids = False  # ids too far apart for the dense list map: filtered IVF searches go exact
        self._filters: OrderedDict[tuple[int, ...], _Filter] = OrderedDict()
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

    def _search_spread(self, xq: np.ndarray, k: int, found: _Filter) -> tuple[np.ndarray, np.ndarray]:
        """A filter spread evenly over the lists (:meth:`_Filter.spread`): what
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

    def _scan_targets(self, coarse: np.ndarray, found: _Filter) -> np.ndarray:
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

    def _filter(self, blocks: dict[str, np.ndarray]) -> _Filter | None:
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
        found = _Filter.build(tuple(blocks.values()), lists, self.nlist, self._id_limit())
        if found is None:
            return None
        with self._lock:
            found = self._filters.setdefault(key, found)
            while len(self._filters) > FILTER_CACHE_ENTRIES:
                self._filters.popitem(last=False)
        return found

    def _list_map(self) -> _ListMap | None:
        """Which list holds each id (under self._lock): read on first use, then kept
        current by add and remove; None for ids too sparse for an array."""
        if self._lists is None and not self._sparse_ids and isinstance(self.index, faiss.IndexIVF):
            self._lists = _ListMap.read(self.index, self._id_limit())
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
            ivf = _ivf(self.index)
            assert ivf is not None
            self._centroid_cache = np.asarray(ivf.quantizer.reconstruct_n(0, int(ivf.nlist)), dtype=np.float32)
        return self._centroid_cache

    def _search_lists(
        self, xq: np.ndarray, k: int, found: _Filter, coarse: np.ndarray, want: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search among the filter's ids, each query row probing its nearest of the
        lists that hold them (``coarse``: its scores for every list) until it has
        scanned its ``want`` allowed vectors."""
        ivf = self._ivf_index
        assert ivf is not None
        lists, counts = found.nonzero()
        sub = coarse[:, lists]
        order = _nearest_first(sub, counts, want)
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


def _nearest_first(coarse: np.ndarray, counts: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Each row's columns of ``coarse`` (scores of lists holding ``counts`` allowed
    ids), best first, at least as many as each row needs to scan its ``want`` ids: a
    partial sort of the likely few, a full one where they fall short."""
    n = coarse.shape[1]
    guess = min(n, 2 * math.ceil(float(want.max()) / max(float(counts.mean()), 1.0)) + 8)
    if guess < n:
        part = np.argpartition(coarse, n - guess, axis=1)[:, n - guess :]  # the guess best, in no order
        rows = np.arange(len(coarse))[:, None]
        order = part[rows, np.argsort(-coarse[rows, part], axis=1, kind="stable")]
        if (counts[order].sum(axis=1) >= want).all():
            return order
    return np.argsort(-coarse, axis=1, kind="stable")


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
