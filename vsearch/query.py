"""Search options and results: what a query asks for and what it gets back."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["Hit", "SearchOptions", "category_tree", "matches_category", "region_boxes", "suggest_categories", "MAX_K"]

MAX_K = 1000


@dataclass(frozen=True)
class SearchOptions:
    """Everything about a search except the query itself."""

    k: int = 10
    offset: int = 0
    categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    exclude_products: Sequence[str] = ()
    min_score: float | None = None
    group_by_product: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k must be between 1 and {MAX_K}")
        if self.offset < 0:
            raise ConfigError("offset must not be negative")


@dataclass(frozen=True)
class Hit:
    product_id: str
    image_id: int
    score: float
    title: str
    category: str
    attributes: dict[str, Any] = field(default_factory=dict)
    image: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "score": round(self.score, 6)}


def region_boxes() -> list[tuple[float, float, float, float]]:
    """Overlapping windows at two scales (R-MAC style) plus a centre window."""
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.2, 0.2, 0.6, 0.6)]
    for size, starts in ((0.6, (0.0, 0.4)), (0.45, (0.0, 0.275, 0.55))):
        boxes += [(x, y, size, size) for y in starts for x in starts]
    return boxes


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


def matches_category(category: str, pattern: str) -> bool:
    """``Fruit`` matches ``Fruit`` and ``Fruit/Apple``, not ``Fruitcake``."""
    pattern = pattern.strip("/")
    return bool(pattern) and (category == pattern or category.startswith(pattern + "/"))


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
