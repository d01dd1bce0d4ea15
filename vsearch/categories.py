"""Category filtering, in one place: prefix matching, per-category id blocks, the
neighbours' category vote, the category tree, and the caches behind them; and
where an attribute filter (:mod:`vsearch.attributes`) joins in, the blocks it cuts.

A filter (``category=Fruit``, ``exclude_category=Fruit/Banana``) becomes a set of
*blocks*: the sorted image ids of each leaf category it allows. A small filter is
searched exactly on the blocks' vectors, reconstructed from the index once and
kept in a :class:`BlockCache` bounded in bytes (least recently used out first), so
a broad filter on a big ``Flat`` index can no longer keep a second copy of it.

:class:`CategoryFilter` is owned by one served snapshot; the write path calls
:meth:`CategoryFilter.update` with the images each change touched (from the
catalog's change log), so a write costs the blocks of its own categories only.

An attribute filter's allowed images come from :class:`vsearch.allowed.AllowedSets`
(kept current by writes at the cost of the change); with a category filter too,
each allowed category block is cut to them, and the cut is kept until a write.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from .allowed import ALLOWED_SETS_KEPT, AllowedSets
from .attributes import AttributeFilter
from .catalog import Catalog
from .errors import FilterError

__all__ = [
    "DEFAULT_BLOCK_CACHE_BYTES",
    "VOTE_SAMPLE",
    "BlockCache",
    "CategoryFilter",
    "category_blocks",
    "category_tree",
    "matches_category",
    "suggest_categories",
]

DEFAULT_BLOCK_CACHE_BYTES = 256 * 1024 * 1024
# A filtered search on an exact index votes from about this many images, an even
# sample of every category, instead of a second exhaustive search of the catalog.
VOTE_SAMPLE = 4096
Blocks = dict[str, np.ndarray]


def matches_category(category: str, pattern: str) -> bool:
    """``Fruit`` matches ``Fruit`` and ``Fruit/Apple``, not ``Fruitcake``."""
    pattern = pattern.strip("/")
    return bool(pattern) and (category == pattern or category.startswith(pattern + "/"))


def category_blocks(leaves: Blocks, categories: Sequence[str], exclude: Sequence[str]) -> Blocks | None:
    """The id blocks of the leaf categories a filter allows; None when unfiltered."""
    if not categories and not exclude:
        return None
    chosen = set(leaves)
    if categories:
        chosen = {c for c in leaves if any(matches_category(c, p) for p in categories)}
        unknown = [p for p in categories if not any(matches_category(c, p) for c in leaves)]
        if unknown:
            raise FilterError(f"no category matches {', '.join(map(repr, unknown))}")
    if exclude:
        chosen = {c for c in chosen if not any(matches_category(c, p) for p in exclude)}
    return {c: leaves[c] for c in sorted(chosen)}


def suggest_categories(neighbour_categories: Sequence[str], limit: int = 5) -> list[tuple[str, float]]:
    """Categories voted by nearest neighbours (nearest first), with their share of the vote.

    A neighbour's vote weighs 1 / rank, so the closest matches decide: with one image
    per product, plain counting let a category with many products outvote the best match.
    """
    votes: dict[str, float] = defaultdict(float)
    for rank, category in enumerate(neighbour_categories, start=1):
        if category:
            votes[category] += 1.0 / rank
    total = sum(votes.values())
    best = sorted(votes.items(), key=lambda cv: -cv[1])[:limit]
    return [(c, math.floor(n / total * 10_000) / 10_000) for c, n in best]  # rounded down: shares never sum past 1


def category_tree(counts: dict[str, int]) -> list[dict[str, Any]]:
    """Nested ``{name, path, products, children}`` from product counts per category path;
    a node's count includes its descendants."""
    root: dict[str, Any] = {"children": {}}
    for path, n in sorted(counts.items()):
        node = root
        parts = [p for p in path.split("/") if p]
        for depth, part in enumerate(parts):
            node = node["children"].setdefault(
                part, {"name": part, "path": "/".join(parts[: depth + 1]), "products": 0, "children": {}}
            )
            node["products"] += n
    return _as_lists(root)["children"]


def _as_lists(node: dict[str, Any]) -> dict[str, Any]:
    node["children"] = [_as_lists(child) for child in node["children"].values()]
    return node


class BlockCache:
    """Vectors of id blocks, reconstructed from an index on first use, at most
    ``max_bytes`` of them kept (least recently used evicted). Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_BLOCK_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def vectors(self, key: str, ids: np.ndarray, reconstruct: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The vectors of block ``key`` (whose ids are ``ids``), cached when they fit."""
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and np.array_equal(cached[0], ids):
                self._entries.move_to_end(key)
                return cached[1]
        xb = reconstruct(ids)
        with self._lock:
            self._drop(key)
            if xb.nbytes <= self.max_bytes:
                while self._bytes + xb.nbytes > self.max_bytes:
                    self._drop(next(iter(self._entries)))
                self._entries[key] = (ids, xb)
                self._bytes += xb.nbytes
        return xb

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes


class CategoryFilter:
    """Category -> image-id blocks of one catalog, read lazily and cached until the
    next write, plus the cache of the blocks' vectors in the served index."""

    def __init__(self, catalog: Catalog, max_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES) -> None:
        self.catalog = catalog
        self.cache = BlockCache(max_cache_bytes)
        self._leaves: Blocks | None = None
        self.allowed = AllowedSets(catalog)
        self._where: OrderedDict[tuple[Any, ...], Blocks] = OrderedDict()  # (categories, exclude, tag) -> blocks
        self._leaves_version = 0  # bumped by a write that changes any block
        self._leaf_versions: dict[str, int] = {}  # per category: bumped when its block changes
        self._lock = threading.Lock()

    def blocks(self, categories: Sequence[str], exclude: Sequence[str], where: AttributeFilter | None = None) -> Blocks | None:
        """The blocks a filter allows (None: unfiltered); FilterError for unknown categories."""
        if where is not None:
            return self._where_blocks(categories, exclude, where)
        if not categories and not exclude:
            return None
        with self._lock:
            if self._leaves is None:
                self._leaves = self.catalog.category_image_ids()
            leaves = self._leaves
        return category_blocks(leaves, categories, exclude)

    def _where_blocks(self, categories: Sequence[str], exclude: Sequence[str], where: AttributeFilter) -> Blocks:
        """The category blocks (or all images) cut to the images ``where`` allows.

        The block cache keys carry the allowed set's version (and a cut's, its
        category's), so a write that changes neither keeps their cached vectors."""
        allowed, version = self.allowed.get(where)
        with self._lock:
            key = (tuple(categories), tuple(exclude), version, self._leaves_version)
            found = self._where.get(key)
            if found is not None:
                self._where.move_to_end(key)
                return found
            leaf_versions = dict(self._leaf_versions)
        base = self.blocks(categories, exclude)
        tag = f"\0where:{version}"
        if base is None:
            found = {tag: allowed}
        else:
            cut = {
                f"{name}{tag}:{leaf_versions.get(name, 0)}": np.intersect1d(ids, allowed, assume_unique=True)
                for name, ids in base.items()
            }
            found = {name: ids for name, ids in cut.items() if len(ids)}
        with self._lock:
            found = self._where.setdefault(key, found)
            while len(self._where) > ALLOWED_SETS_KEPT:
                self._where.popitem(last=False)
        return found

    def invalidate(self) -> None:
        """Forget the blocks and their vectors (after a change not known image by image)."""
        with self._lock:
            self._leaves = None
            self._leaves_version += 1
            self._where.clear()
        self.allowed.clear()
        self.cache.clear()

    def update(self, categories: dict[int, str | None]) -> None:
        """Apply a write: each changed image's category now (None: gone). Only the
        blocks of the categories involved change, and only their cached vectors go,
        at the cost of the change (a block is found by binary search, not a scan)."""
        if not categories:
            return
        self.allowed.update(np.array(sorted(categories), dtype=np.int64))  # a changed set gets a new version
        with self._lock:
            if self._leaves is None:
                return  # nothing read yet: the first filtered search reads it all
            ids = np.array(sorted(categories), dtype=np.int64)
            changed: set[str] = set()
            for name, block in self._leaves.items():
                pos = np.minimum(np.searchsorted(block, ids), max(len(block) - 1, 0))
                hit = block[pos] == ids if len(block) else np.zeros(len(ids), dtype=bool)
                if hit.any():
                    self._leaves[name] = np.delete(block, pos[hit])
                    changed.add(name)
            for category in sorted({c for c in categories.values() if c is not None}):
                new = np.array([i for i, c in categories.items() if c == category], dtype=np.int64)
                self._leaves[category] = np.union1d(self._leaves.get(category, np.zeros(0, dtype=np.int64)), new)
                changed.add(category)
            for name in [n for n in changed if len(self._leaves[n]) == 0]:
                del self._leaves[name]
            for name in changed:  # the attribute cuts of these categories are cut again
                self._leaf_versions[name] = self._leaf_versions.get(name, 0) + 1
            self._leaves_version += bool(changed)
        for name in changed:
            self.cache.drop(name)
            self.cache.drop(_vote_key(name))

    def sample_neighbours(self, xq: np.ndarray, k: int, reconstruct: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
        """Each query's ``k`` nearest image ids among an even sample of the catalog
        (every ``n / VOTE_SAMPLE``-th image of each category, so categories keep their
        shares; the sample's vectors cached like blocks), for the category vote of a
        filtered search: O(sample), not O(catalog). None if the catalog is no bigger
        than the sample (search it all)."""
        with self._lock:
            if self._leaves is None:
                self._leaves = self.catalog.category_image_ids()
            leaves = dict(self._leaves)
        total = sum(len(ids) for ids in leaves.values())
        if total <= VOTE_SAMPLE:
            return None
        step = math.ceil(total / VOTE_SAMPLE)
        found_D, found_I = [], []
        for name, block in leaves.items():
            ids = block[::step]
            xb = self.cache.vectors(_vote_key(name), ids, reconstruct)
            D, pos = faiss.knn(xq, xb, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            found_D.append(D)
            found_I.append(ids[pos])
        D, I = np.concatenate(found_D, axis=1), np.concatenate(found_I, axis=1)
        best = np.argsort(-D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(I, best, axis=1)

    def vote(self, image_ids: np.ndarray) -> list[tuple[str, float]]:
        """The categories of these neighbour images (nearest first), with their share of the vote."""
        ranked = [int(i) for i in image_ids if i >= 0]
        owners = self.catalog.image_products(ranked)
        products = self.catalog.products(sorted(set(owners.values())))
        return suggest_categories([products[owners[i]].category for i in ranked if owners.get(i) in products])


def _vote_key(category: str) -> str:
    return f"\0vote:{category}"  # no category name starts with NUL
