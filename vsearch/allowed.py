"""The images each attribute filter allows, read once and kept current by writes.

A filter's allowed set (sorted image ids) costs one indexed SQL query the first
time (:func:`image_ids`), which grows with the
set: ~0.1 s for half of a 100k catalog. Paying that again after every catalog
write would make a busy catalog's broad filters slow, so a write instead re-checks
only the images it changed (the change log names them: new or removed images, and
every image of a product whose attributes or category changed) against each kept
filter, and patches the sets those images enter or leave: the cost of the change,
plus a copy of a set that actually changed.

A set that changes gets a new array and a new ``version``: an IVF index keeps what
it builds of a filter by the arrays' identity, and the block cache keeps vectors by
a key the version is part of, so neither can serve a stale set.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

import numpy as np

from .attributes import AttributeFilter
from .catalog import Catalog

__all__ = ["AllowedSets", "ALLOWED_SETS_KEPT", "image_ids"]

ALLOWED_SETS_KEPT = 32  # filters whose allowed sets are kept (least recently used out first)


class AllowedSets:
    """Attribute filter -> (allowed image ids, version), for one served snapshot."""

    def __init__(self, catalog: Catalog, kept: int = ALLOWED_SETS_KEPT) -> None:
        self.catalog = catalog
        self.kept = kept
        self._sets: OrderedDict[str, tuple[AttributeFilter, np.ndarray, int]] = OrderedDict()
        self._versions = itertools.count(1)
        self._lock = threading.Lock()

    def get(self, where: AttributeFilter) -> tuple[np.ndarray, int]:
        """The sorted image ids ``where`` allows, and the version of that set."""
        key = where.key
        with self._lock:
            found = self._sets.get(key)
            if found is not None:
                self._sets.move_to_end(key)
                return found[1], found[2]
        ids = image_ids(self.catalog, where)
        with self._lock:
            found = self._sets.setdefault(key, (where, ids, next(self._versions)))
            while len(self._sets) > self.kept:
                self._sets.popitem(last=False)
        return found[1], found[2]

    def update(self, changed: np.ndarray) -> bool:
        """Re-check the images a write changed (sorted ids) against every kept
        filter; True if any set changed. The caller holds the write lock."""
        if len(changed) == 0:
            return False
        with self._lock:
            entries = list(self._sets.items())
        any_set = False
        for key, (where, ids, _) in entries:
            now = image_ids(self.catalog, where, among=changed.tolist())
            pos = np.minimum(np.searchsorted(ids, changed), max(len(ids) - 1, 0))
            held = ids[pos] == changed if len(ids) else np.zeros(len(changed), dtype=bool)
            if np.array_equal(changed[held], now):
                continue
            patched = np.delete(ids, pos[held])  # one copy, no sort: the changed ids out, then back in
            patched = np.insert(patched, np.searchsorted(patched, now), now)
            with self._lock:
                if key in self._sets:
                    self._sets[key] = (where, patched, next(self._versions))
            any_set = True
        return any_set

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()


def image_ids(catalog: Catalog, where: AttributeFilter, among: list[int] | None = None) -> np.ndarray:
    """Sorted ids of the images of the products ``where`` holds for (only those in
    ``among``, if given): one indexed query, costing the matching rows, not the catalog."""
    found: list[int] = []
    if among is None:
        sql, params = where.product_sql()
        found = [r[0] for r in catalog.read(f"SELECT id FROM images WHERE product_id IN ({sql})", params)]
    else:  # a few images: test each one's product, never the filter's whole set
        test, params = where.correlated("images.product_id")
        for start in range(0, len(among), 500):
            chunk = among[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found += [r[0] for r in catalog.read(f"SELECT id FROM images WHERE id IN ({marks}) AND {test}", chunk + params)]
    ids = np.array(found, dtype=np.int64)
    ids.sort()
    return ids
