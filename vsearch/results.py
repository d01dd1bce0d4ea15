"""Turning faiss answers into results: category filters as id blocks, hits grouped
by product, and neighbours' category votes. Pure functions over the catalog."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .catalog import Catalog
from .errors import FilterError
from .query import Hit, SearchOptions, matches_category, suggest_categories

__all__ = ["category_blocks", "collect_hits", "vote"]


def category_blocks(
    leaves: dict[str, np.ndarray], categories: Sequence[str], exclude: Sequence[str]
) -> dict[object, np.ndarray] | None:
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


def collect_hits(catalog: Catalog, D: np.ndarray, I: np.ndarray, k: int, options: SearchOptions) -> list[Hit]:
    """Up to ``k`` hits from one row of faiss output, best first, per the options."""
    valid = [(float(d), int(i)) for d, i in zip(D, I) if i >= 0 and (options.min_score is None or d >= options.min_score)]
    owners = catalog.image_products([i for _, i in valid])
    excluded = set(options.exclude_products)
    picked: list[tuple[float, int, str]] = []
    seen: set[str] = set()
    for score, image_id in valid:
        product_id = owners.get(image_id)
        if product_id is None or product_id in excluded or (options.group_by_product and product_id in seen):
            continue
        seen.add(product_id)
        picked.append((score, image_id, product_id))
        if len(picked) == k:
            break
    products = catalog.products([p for _, _, p in picked])
    sources = catalog.image_sources([i for _, i, _ in picked])
    return [
        Hit(pid, iid, score, products[pid].title, products[pid].category, products[pid].attributes, sources.get(iid, ""))
        for score, iid, pid in picked
    ]


def vote(catalog: Catalog, image_ids: np.ndarray) -> list[tuple[str, float]]:
    """The categories of these neighbour images (nearest first), with their share of the vote."""
    ranked = [int(i) for i in image_ids if i >= 0]
    owners = catalog.image_products(ranked)
    products = catalog.products(sorted(set(owners.values())))
    return suggest_categories([products[owners[i]].category for i in ranked if owners.get(i) in products])
