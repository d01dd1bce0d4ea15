"""The FAISS index: vectors keyed by the catalog's image ids, with filtered search.

Vocabulary follows faiss: ``xb`` database vectors, ``xq`` queries, ``k`` neighbours,
``D`` scores (inner products of L2-normalised vectors, i.e. cosine) and ``I`` ids,
``-1`` where fewer than k exist.

Filtered search. A filter is a set of allowed ids in blocks (one per category, see
:mod:`vsearch.categories`). A ``Flat`` index, or a set small compared with an IVF
index, is searched exactly on the blocks' vectors, reconstructed once and kept in a
bounded :class:`~vsearch.categories.BlockCache`, so a query restricted to a 1%
category touches 1% of the data. A large set on an IVF index goes through faiss with
an ``IDSelector`` and falls back to the exact path if the probed lists cannot fill k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from .categories import BlockCache
from .errors import ConfigError, IndexFormatError
from .fsutil import atomic_write

__all__ = ["VectorIndex", "choose_factory", "gpu_available", "merge_topk"]

FLAT_MAX = 100_000
SQ_MAX = 2_000_000
SMALL_SUBSET_FRACTION = 0.05


def choose_factory(n: int, d: int) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d``.

    Exact search while it is cheap; IVF with 8-bit scalar quantisation for medium
    catalogs; IVF-PQ for large ones. nlist ~ 4 sqrt(n), the faiss rule of thumb.
    """
    if n < 0 or d <= 0:
        raise ConfigError(f"bad index size n={n}, d={d}")
    if n <= FLAT_MAX:
        return "IDMap2,Flat"
    nlist = 1 << round(math.log2(4 * math.sqrt(n)))
    if n <= SQ_MAX:
        return f"IVF{nlist},SQ8"
    m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if d % m == 0)
    return f"IVF{nlist},PQ{m}x8"


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

    def __init__(self, index: faiss.Index, factory: str, nprobe: int = 16) -> None:
        self.index = index
        self.factory = factory
        self.nprobe = nprobe
        self._gpu: faiss.Index | None = None
        self._gpu_wanted = False
        self._apply_nprobe()

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def create(cls, factory: str, d: int, nprobe: int = 16) -> VectorIndex:
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid faiss factory string {factory!r}: {exc}") from exc
        ivf = _ivf(index)
        if ivf is not None:
            # Reconstruct and remove by id need a direct map from ids to list entries.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        return cls(index, factory, nprobe)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, xb: np.ndarray) -> None:
        if not self.index.is_trained:
            self.index.train(np.ascontiguousarray(xb, dtype=np.float32))

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
            return self._search_all(xq, k)
        allowed = sum(len(ids) for ids in blocks.values())
        if allowed == 0:
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        if allowed <= max(k, SMALL_SUBSET_FRACTION * self.ntotal) or _ivf(self.index) is None:
            try:
                return self._search_blocks(xq, k, blocks, cache)
            except RuntimeError:  # a block names ids this index lacks (it was retired by a swap)
                return self._search_selected(xq, k, np.concatenate(list(blocks.values())))
        D, I = self._search_selected(xq, k, np.concatenate(list(blocks.values())))
        if (I[:, -1] < 0).any():  # the probed lists held too few allowed ids
            return self._search_blocks(xq, k, blocks, cache)
        return D, I

    def _search_all(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ntotal == 0:
            return merge_topk(np.zeros((len(xq), 0)), np.zeros((len(xq), 0), dtype=np.int64), k)
        if self._gpu_wanted and self._gpu is None:
            self._mirror_to_gpu()
        index = self._gpu if self._gpu is not None else self.index
        D, I = index.search(xq, min(k, self.ntotal))
        return merge_topk(D, I, k)

    def _search_selected(self, xq: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    def load(cls, path: Path, factory: str, nprobe: int = 16, mmap: bool = False) -> VectorIndex:
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
