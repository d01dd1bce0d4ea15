"""The read path: raw query vectors -> projected -> faiss (with category blocks) ->
hits grouped by product, plus the neighbours' category vote; with words
(``SearchOptions.text``), that ranking fused with the keyword ranking
(:mod:`vsearch.keywords`, :mod:`vsearch.fusion`), or the keyword ranking alone.

Pure functions over one :class:`~vsearch.snapshot.Snapshot` and the catalog; the
caller (:class:`vsearch.engine.Engine`) holds the read lock around them.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from . import keywords, variants
from .catalog import Catalog
from .categories import suggest_categories
from .errors import ConfigError
from .faissthreads import BATCH_MIN, one_thread
from .fusion import CANDIDATES, reciprocal_rank_fusion
from .query import Hit, SearchOptions
from .snapshot import Snapshot

__all__ = ["best_per_product", "collect_hits", "region_boxes", "search_keywords", "search_snapshot", "search_with_text"]

Votes = list[tuple[str, float]]


def search_snapshot(
    snap: Snapshot,
    catalog: Catalog,
    raw: np.ndarray,
    options: SearchOptions,
    timings: dict[str, float],
    neighbours: int = 0,
) -> tuple[list[list[Hit]], list[Votes]]:
    """Hits for each row of ``raw`` (unprojected vectors from ``snap``'s model), and
    the categories the ``neighbours`` nearest images vote for.

    Without filters the vote comes from the same faiss search as the hits. The
    search widens (4x at a time) until every row has ``k + offset`` hits after
    grouping by product, the index is exhausted, or ``min_score`` cuts it off.
    """
    index = snap.index
    if index is None or index.ntotal == 0:
        return [[] for _ in raw], [[] for _ in raw]
    want = options.k + options.offset
    xq = snap.projection.apply(raw)
    blocks = snap.filters.blocks(options.categories, options.exclude_categories, options.where)
    ntotal = index.ntotal if blocks is None else sum(len(b) for b in blocks.values())
    k_img = min(ntotal, want * 4 if options.group_by_product or options.exclude_products else want)
    if blocks is None:
        k_img = min(ntotal, max(k_img, neighbours))
    votes: list[Votes] = [[] for _ in raw]
    while True:
        start = time.perf_counter()
        with one_thread(len(xq) < BATCH_MIN):
            D, I = index.search(xq, k_img, blocks, snap.filters.cache)
        middle = time.perf_counter()
        hits = [collect_hits(catalog, d, i, want, options) for d, i in zip(D, I)]
        if neighbours:
            if blocks is not None:
                I = _vote_neighbours(snap, xq, neighbours)
            votes = [snap.filters.vote(row[:neighbours]) for row in I]
        timings["search"] = timings.get("search", 0.0) + (middle - start) * 1000
        timings["lookup"] = timings.get("lookup", 0.0) + (time.perf_counter() - middle) * 1000
        past_min_score = options.min_score is not None and bool((D[:, -1] < options.min_score).all())
        if all(len(h) >= want for h in hits) or k_img >= ntotal or past_min_score:
            return [h[options.offset :] for h in hits], votes
        k_img = min(ntotal, k_img * 4)


def search_with_text(
    snap: Snapshot,
    catalog: Catalog,
    raw: np.ndarray,
    options: SearchOptions,
    timings: dict[str, float],
    neighbours: int = 0,
) -> tuple[list[list[Hit]], list[Votes]]:
    """:func:`search_snapshot`, its ranking fused with the keyword ranking of
    ``options.text`` when the options fuse (words given, ``text_weight`` > 0).

    Each side is a candidate list of ``max(CANDIDATES, k + offset)`` products under
    the same filters; the result is one hit per product, scored by reciprocal rank
    fusion, and ``min_score`` applies to that score. The category vote is the
    vector search's."""
    if not options.fuses or keywords.match_expression(options.text) is None:
        return search_snapshot(snap, catalog, raw, options, timings, neighbours)
    pool = max(CANDIDATES, options.k + options.offset)
    wide = replace(options, k=pool, offset=0, group_by_product=True, min_score=None)
    rows, votes = search_snapshot(snap, catalog, raw, wide, timings, neighbours)
    start = time.perf_counter()
    matches = keywords.search(catalog, options, pool)
    timings["keywords"] = timings.get("keywords", 0.0) + (time.perf_counter() - start) * 1000
    fused = [reciprocal_rank_fusion([(row, 1.0), (matches, options.text_weight)]) for row in rows]
    return [_page(catalog, hits, options) for hits in fused], votes


def search_keywords(
    snap: Snapshot, catalog: Catalog, options: SearchOptions, timings: dict[str, float], neighbours: int = 0
) -> tuple[list[Hit], Votes]:
    """The products matching ``options.text`` alone, best first, and the categories of
    the first ``neighbours`` of them (the vote). A hit's score is its bm25 relevance
    relative to the first hit's (1.0), capped by the score of the hit before it (the
    products with every word come before those with some), so it compares hits of
    one search only.
    ConfigError if the text has no word to search for."""
    if keywords.match_expression(options.text) is None:
        raise ConfigError("text has no words to search for (letters or digits)")
    if options.categories or options.exclude_categories:
        snap.filters.blocks(options.categories, options.exclude_categories)  # unknown categories: FilterError, as ever
    want = options.k + options.offset
    limit = max(want, neighbours)
    while True:  # collapsing may need more matches than k + offset: 4x more at a time
        start = time.perf_counter()
        matches = keywords.search(catalog, options, limit)
        timings["keywords"] = timings.get("keywords", 0.0) + (time.perf_counter() - start) * 1000
        hits: list[Hit] = []
        for hit in matches:  # relative to the first; never above the hit before (every word ranks before some)
            score = min(hit.score / matches[0].score, hits[-1].score if hits else 1.0) if matches[0].score > 0 else 1.0
            hits.append(replace(hit, score=score))
        page = _page(catalog, hits, options)
        if not options.collapse or len(page) == options.k or len(matches) < limit:
            break
        limit *= 4
    votes = suggest_categories([hit.category for hit in hits[:neighbours]]) if neighbours else []
    return page, votes


def _page(catalog: Catalog, hits: list[Hit], options: SearchOptions) -> list[Hit]:
    """``options``' page of a ranking: variant groups filled in (and collapsed if
    asked), scores below ``min_score`` out, then offset and k."""
    if options.collapse:  # the whole ranking needs its groups; else only the page does
        hits = _collapse(with_variants(catalog, hits))
    if options.min_score is not None:
        hits = [hit for hit in hits if hit.score >= options.min_score]
    page = hits[options.offset : options.offset + options.k]
    return page if options.collapse else with_variants(catalog, page)


def _vote_neighbours(snap: Snapshot, xq: np.ndarray, neighbours: int) -> np.ndarray:
    """The neighbours a filtered search's category vote counts, regardless of the
    filter: an IVF index's own (cheap) search; on an exact index, the nearest among an
    even sample of the catalog (a second exhaustive search would cost more than the
    filtered one)."""
    index = snap.index
    assert index is not None
    with one_thread(len(xq) < BATCH_MIN):
        if not index.nlist:
            sampled = snap.filters.sample_neighbours(xq, neighbours, index.reconstruct)
            if sampled is not None:
                return sampled
        return index.search(xq, min(neighbours, index.ntotal))[1]


def collect_hits(catalog: Catalog, D: np.ndarray, I: np.ndarray, k: int, options: SearchOptions) -> list[Hit]:
    """Up to ``k`` hits from one row of faiss output, best first, per the options."""
    valid = [(float(d), int(i)) for d, i in zip(D, I) if i >= 0 and (options.min_score is None or d >= options.min_score)]
    owners = catalog.image_products([i for _, i in valid])
    groups = variants.groups_of(catalog.select, list(owners.values())) if options.collapse else {}
    excluded = set(options.exclude_products)
    picked: list[tuple[float, int, str]] = []
    seen: set[str] = set()
    for score, image_id in valid:
        product_id = owners.get(image_id)
        if product_id is None or product_id in excluded:
            continue
        key = groups[product_id].group_id if product_id in groups else product_id
        if (options.group_by_product or options.collapse) and key in seen:
            continue
        seen.add(key)
        picked.append((score, image_id, product_id))
        if len(picked) == k:
            break
    products = catalog.products([p for _, _, p in picked])
    sources = catalog.image_sources([i for _, i, _ in picked])
    hits = [
        Hit(pid, iid, score, products[pid].title, products[pid].category, products[pid].attributes, sources.get(iid, ""))
        for score, iid, pid in picked
    ]
    return with_variants(catalog, hits, groups or None)


def with_variants(catalog: Catalog, hits: list[Hit], groups: dict[str, variants.Membership] | None = None) -> list[Hit]:
    """``hits`` with their products' variant groups filled in (``groups``: as already
    read for them, so that a page is collapsed and labelled by one reading)."""
    if groups is None:
        groups = variants.groups_of(catalog.select, [h.product_id for h in hits])
    out = []
    for hit in hits:
        group = groups.get(hit.product_id)
        out.append(
            hit if group is None else replace(hit, variant_group=group.group_id, variants=group.members, variant_count=group.size)
        )
    return out


def _collapse(hits: list[Hit]) -> list[Hit]:
    """The first (best) hit of each variant group (products without one stand alone)."""
    seen: set[str] = set()
    out = []
    for hit in hits:
        key = hit.variant_group or hit.product_id
        if key not in seen:
            seen.add(key)
            out.append(hit)
    return out


def region_boxes() -> list[tuple[float, float, float, float]]:
    """Overlapping windows at two scales (R-MAC style) plus a centre window."""
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.2, 0.2, 0.6, 0.6)]
    for size, starts in ((0.6, (0.0, 0.4)), (0.45, (0.0, 0.275, 0.55))):
        boxes += [(x, y, size, size) for y in starts for x in starts]
    return boxes


def best_per_product(rows: list[list[Hit]], options: SearchOptions) -> list[Hit]:
    """One ranking from several hit lists (e.g. one per region of a photo): each
    product scores its best hit; ``options.offset`` and ``k`` apply to the result."""
    best: dict[str, Hit] = {}
    for row in rows:
        for hit in row:
            if hit.product_id not in best or hit.score > best[hit.product_id].score:
                best[hit.product_id] = hit
    ranked = sorted(best.values(), key=lambda h: -h.score)
    if options.collapse:  # each region's list was collapsed; their union is collapsed again
        ranked = _collapse(ranked)
    return ranked[options.offset : options.offset + options.k]
