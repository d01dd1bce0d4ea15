"""An IVF index's inverted lists seen from outside faiss: which list holds each id,
and, per filter, its bitmap selector and how many allowed ids each list holds.

Both are read from the lists once and then kept current by every add and remove, at
the cost of the change (:class:`vsearch.filtered.FilteredIVF` does the bookkeeping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["FEW", "ListFilter", "ListMap", "ivf_of", "nearest_first"]

FEW = 32  # changes of up to this many ids update the structures in a loop: numpy's calls cost more
FILTER_SPREAD = 0.9  # see ListFilter.spread


class ListMap:
    """Which inverted list holds each id of an IVF index (-1: none), as an array indexed
    by id, and how many ids each list holds: read from the lists once, then kept
    current by every add and remove."""

    def __init__(self, nlist: int) -> None:
        self.of = np.full(0, -1, dtype=np.int32)
        self.sizes = np.zeros(nlist, dtype=np.int64)

    @classmethod
    def read(cls, ivf: faiss.IndexIVF, limit: int) -> ListMap | None:
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
class ListFilter:
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
    def build(cls, blocks: tuple[np.ndarray, ...], lists: ListMap, nlist: int, limit: int) -> ListFilter | None:
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


def nearest_first(coarse: np.ndarray, counts: np.ndarray, want: np.ndarray) -> np.ndarray:
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


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
