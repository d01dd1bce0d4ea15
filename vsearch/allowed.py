"""The images each attribute filter allows, read once and kept current by writes.

A filter's allowed set (sorted image ids) costs one indexed SQL query the first
time (:meth:`vsearch.catalog.Catalog.attribute_image_ids`), which grows with the
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

__all__ = ["AllowedSets", "ALLOWED_SETS_KEPT"]

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
        ids = self.catalog.attribute_image_ids(where)
        with self._lock:
            found = self._sets.setdefault(key, (where, ids, next(self._versions)))
            while len(self._sets) > self.kept:
                self._sets.popitem(last=False)
        return found[1], found[2]

    def update(self, image_ids: np.ndarray) -> bool:
        """Re-check the images a write changed (sorted ids) against every kept
        filter; True if any set changed. The caller holds the write lock."""
        if len(image_ids) == 0:
            return False
        with self._lock:
            entries = list(self._sets.items())
        changed = False
        for key, (where, ids, _) in entries:
            now = self.catalog.attribute_image_ids(where, among=image_ids.tolist())
            pos = np.minimum(np.searchsorted(ids, image_ids), max(len(ids) - 1, 0))
            held = ids[pos] == image_ids if len(ids) else np.zeros(len(image_ids), dtype=bool)
            if np.array_equal(image_ids[held], now):
                continue
            patched = np.delete(ids, pos[held])  # one copy, no sort: the changed ids out, then back in
            patched = np.insert(patched, np.searchsorted(patched, now), now)
            with self._lock:
                if key in self._sets:
                    self._sets[key] = (where, patched, next(self._versions))
            changed = True
        return changed

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
