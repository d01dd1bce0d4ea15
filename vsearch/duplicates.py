"""Near-duplicate images and the product variant groups they imply (issue 12).

Two images are near-duplicates when the cosine of their raw vectors, as the catalog
stores them, is at least :attr:`DuplicateConfig.threshold`, or their perceptual hashes
(:func:`phash`) are within :attr:`DuplicateConfig.phash_distance` bits (calibrated by
``scripts/bench_dups.py``; exact duplicates, same sha256, pass both).

A **variant group** is a connected component of the graph whose nodes are products
and whose edges are the near-duplicate image pairs between two products: products
linked by any near-duplicate pair of their images, directly or through others, are
one group. A group's id is its **smallest product id**. Product ids are the caller's
(image ids are not: they are assigned at ingest), so the same catalog ingested again,
in any order, gives the same groups with the same ids.

The graph is never rebuilt whole. After a write, :func:`merge` joins the groups the
new links touch (cost: the members of the groups whose id changes). After a removal,
:func:`regroup` recomputes the one group that lost a member or a link, from its
members' neighbour lists. :class:`VariantGroups` keeps the whole state in memory and
is the reference the tests compare with a from-scratch grouping.

Pure: nothing here reads an index or the catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from .errors import ConfigError

__all__ = ["DuplicateConfig", "VariantGroups", "hamming", "merge", "near_duplicates", "phash", "product_links", "regroup"]

N = TypeVar("N", int, str)  # a node: an image id or a product id (ordered, so a group's id is its smallest)


@dataclass(frozen=True)
class DuplicateConfig:
    """Two images are near-duplicates when the cosine of their raw vectors is >=
    ``threshold`` OR their 64-bit perceptual hashes (:func:`phash`) differ in at most
    ``phash_distance`` bits (None: the embedding alone). Candidates are the ``k``
    nearest images an index search returns for each new image.

    Calibrated by ``scripts/bench_dups.py`` for the default model (efficientnet-lite2;
    another model needs its own threshold) on 881 distinct photos (81 grocery catalog
    shots, 400 grocery shop photos, 400 clothing photos) and 750 synthetic copies:
    at 0.98 / 6, pair precision 0.997 (5 false pairs of 1.33 M) and 0.45 % of the
    distinct photos linked to another product's (0.97 / 8: 0.994 and 1.1 %, which
    would hide more than 1 % of products behind others when results collapse); recall
    of (original, copy) pairs: JPEG q60, 50 % resize and colour shift 1.00, 5 % crop
    0.79, all at once 0.58. A false link hides a product, a missed one only shows a
    copy twice, so the rule leans to precision. The false links left are packaging
    variants (one carton, another flavour): both measures look at the whole image.
    """

    threshold: float = 0.98
    phash_distance: int | None = 6
    k: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or self.k < 1:
            raise ConfigError("duplicates threshold must be in (0, 1] and k >= 1")
        if self.phash_distance is not None and not 0 <= self.phash_distance <= 64:
            raise ConfigError("duplicates phash_distance must be in [0, 64] or None")

    def matches(self, similarity: float, distance: int | None = None) -> bool:
        """Whether a pair with this raw-vector cosine and phash distance is a near-duplicate."""
        by_hash = self.phash_distance is not None and distance is not None and distance <= self.phash_distance
        return similarity >= self.threshold or by_hash


def phash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``image`` as ImageHash's ``phash`` computes it
    (grey 32 x 32, the 8 x 8 lowest frequencies above their median, first bit highest),
    with numpy alone; as an int, so ``int(str(imagehash.phash(image)), 16)``."""
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT8 @ pixels @ _DCT8.T
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


_DCT8 = np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)  # DCT-II rows 0-7, unscaled


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return (a ^ b).bit_count()


def near_duplicates(
    image: int, ids: Sequence[int], similarities: Sequence[float], config: DuplicateConfig, distances: Sequence[int] | None = None
) -> list[int]:
    """The candidates of one k-NN search for ``image`` that are its near-duplicates, by
    :meth:`DuplicateConfig.matches` on each candidate's raw-vector cosine and, if given,
    phash distance; the image itself and faiss' padding (-1) left out."""
    dist: Sequence[int | None] = [None] * len(ids) if distances is None else distances
    return [i for i, s, d in zip(ids, similarities, dist) if i != image and i >= 0 and config.matches(s, d)]


def product_links(image_links: Mapping[int, Iterable[int]], product_of: Callable[[int], str]) -> dict[str, set[str]]:
    """Product-level edges from image-level near-duplicate links: product -> linked
    products (both directions; a link between two images of one product is no edge)."""
    out: dict[str, set[str]] = {}
    for image, neighbours in image_links.items():
        p = product_of(image)
        for q in map(product_of, neighbours):
            if q != p:
                out.setdefault(p, set()).add(q)
                out.setdefault(q, set()).add(p)
    return out


def merge(
    links: Mapping[N, Iterable[N]], group_of: Callable[[N], N | None], members_of: Callable[[N], Iterable[N]]
) -> dict[N, N]:
    """The group changes after new links: ``links`` maps nodes to the nodes they are
    now linked to (new or existing). ``group_of`` gives a node's stored group id, None
    for a node not stored (a singleton, its own group); ``members_of(g)`` every node
    stored with group ``g``. Returns node -> new group id for every node whose stored
    group differs from it (None included). Only merged groups are read."""
    stored: dict[N, N | None] = {}
    parent: dict[N, N] = {}

    def find(g: N) -> N:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    def group(n: N) -> N:
        if n not in stored:
            stored[n] = group_of(n)
        g = stored[n]
        return n if g is None else g

    for node, neighbours in links.items():
        for other in neighbours:
            a, b = find(group(node)), find(group(other))
            parent[max(a, b)] = min(a, b)  # a root is its cluster's smallest group id
        group(node)
    changes: dict[N, N] = {}
    for old in {group(n) for n in stored}:
        if find(old) != old:
            changes.update((m, find(old)) for m in members_of(old))
    for n, was in stored.items():
        if was != find(group(n)):
            changes[n] = find(group(n))
    return changes


def regroup(members: Iterable[N], neighbours: Callable[[N], Iterable[N]]) -> dict[N, N]:
    """Connected components of ``members`` (e.g. what is left of one group after a
    removal) through ``neighbours``, restricted to ``members``: node -> its
    component's smallest node. From scratch when ``members`` is every node."""
    pending = set(members)
    out: dict[N, N] = {}
    while pending:
        start = min(pending)
        pending.discard(start)
        stack, component = [start], [start]
        while stack:
            for other in neighbours(stack.pop()):
                if other in pending:
                    pending.discard(other)
                    stack.append(other)
                    component.append(other)
        out.update((n, start) for n in component)
    return out


class VariantGroups:
    """Image-level near-duplicate links and the product variant groups they imply, all
    in memory, kept up to date with :func:`merge` and :func:`regroup` (what a catalog
    would store: the links, each image's product and each product's group id)."""

    def __init__(self) -> None:
        self.product_of: dict[int, str] = {}
        self.links: dict[int, set[int]] = {}
        self.images_of: dict[str, set[int]] = {}
        self.group: dict[str, str] = {}  # every product, a singleton's group is itself
        self.members: dict[str, set[str]] = {}

    def add_image(self, image: int, product: str, neighbours: Iterable[int]) -> dict[str, str]:
        """Add ``image`` of ``product``, a near-duplicate of the known images ``neighbours``;
        returns the group changes (product -> new group id, new products included)."""
        self.product_of[image] = product
        self.images_of.setdefault(product, set()).add(image)
        self.links[image] = set()
        for other in neighbours:
            self.links[image].add(other)
            self.links[other].add(image)
        edges = product_links({image: self.links[image]}, self.product_of.__getitem__)
        return self._apply(merge({product: edges.get(product, set())}, self.group.get, self._members))

    def remove_image(self, image: int) -> dict[str, str]:
        """Drop ``image`` and its links (its product stays, even with no image left)."""
        product = self.product_of[image]
        self.images_of[product].discard(image)
        return self._regroup(self.group[product]) if self._unlink(image) else {}

    def remove_product(self, product: str) -> dict[str, str]:
        """Drop ``product`` and all its images; its group, if shared, is recomputed once.
        The changes name the remaining products only."""
        crossing = [self._unlink(image) for image in self.images_of.pop(product)]
        group = self.group.pop(product)
        self.members[group].discard(product)
        if not self.members[group]:
            del self.members[group]
        return self._regroup(group) if any(crossing) else {}

    def product_neighbours(self, product: str) -> set[str]:
        return {self.product_of[o] for i in self.images_of.get(product, ()) for o in self.links[i]} - {product}

    def _unlink(self, image: int) -> bool:
        """Forget ``image`` and its links; whether any linked it to another product."""
        product = self.product_of.pop(image)
        crossing = any(self.product_of[o] != product for o in self.links[image])
        for other in self.links.pop(image):
            self.links[other].discard(image)
        return crossing

    def _members(self, group: str) -> set[str]:
        return set(self.members.get(group, ()))

    def _regroup(self, group: str) -> dict[str, str]:
        fresh = regroup(self._members(group), self.product_neighbours)
        return self._apply({p: g for p, g in fresh.items() if self.group.get(p) != g})

    def _apply(self, changes: dict[str, str]) -> dict[str, str]:
        for product, group in changes.items():
            old = self.group.get(product)
            if old is not None:
                self.members[old].discard(product)
                if not self.members[old]:
                    del self.members[old]
            self.group[product] = group
            self.members.setdefault(group, set()).add(product)
        return changes
