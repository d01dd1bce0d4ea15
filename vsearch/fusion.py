"""Fusing rankings: a photo (or a text tower's) ranking with a keyword ranking.

Reciprocal rank fusion: each ranking gives a product ``weight / (RRF_K + rank)``
(rank 1 first), and a product's score is the sum over the rankings it is in::

    score = 1 / (60 + rank_photo) + text_weight / (60 + rank_keywords)

It needs no calibration between a cosine similarity and a bm25 relevance (their
scales have nothing in common), and the constant 60 (Cormack et al., 2009) keeps
the first few places of one ranking from outweighing agreement between both. Each
ranking is a bounded candidate list (:data:`CANDIDATES` products, or ``k +
offset`` if more): a product outside a list gets nothing from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .query import Hit

__all__ = ["CANDIDATES", "DEFAULT_TEXT_WEIGHT", "RRF_K", "reciprocal_rank_fusion"]

RRF_K = 60
CANDIDATES = 100  # products each ranking contributes to a fusion
# Measured on the grocery val photos with their type word (scripts/bench_keywords.py):
# 0.5 ranks the right product first most often; at 1 or 2 the keyword order among
# products of one type (bm25 on near-identical descriptions) outvotes the photo.
DEFAULT_TEXT_WEIGHT = 0.5


def reciprocal_rank_fusion(rankings: Sequence[tuple[Sequence[Hit], float]], rrf_k: int = RRF_K) -> list[Hit]:
    """One ranking from ``(hits, weight)`` pairs, each hit list best first and one hit
    per product. A fused hit is the product's hit from the first list that has it (its
    image: the photo's best match when the photo ranking comes first), scored by RRF;
    ties keep that first-seen order."""
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for hits, weight in rankings:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.product_id] = scores.get(hit.product_id, 0.0) + weight / (rrf_k + rank)
            first.setdefault(hit.product_id, hit)
    ranked = sorted(first, key=lambda product_id: -scores[product_id])  # stable
    return [replace(first[product_id], score=scores[product_id]) for product_id in ranked]
