#!/usr/bin/env python3
"""Attribute-filtered search at catalog scale (a benchmark, not a test; issue 12).

Builds a catalog of N products (one image each) in a real vsearch SQLite catalog
(its triggers mirror the attributes into ``product_attributes``) and the IVF index
``scripts/bench_filtered.py`` builds for N synthetic 64-d vectors (a mixture of
1,000 clusters; ids with gaps). Each product has ``bucket`` (a number drawn
independently of its vector), ``cluster`` (its vector's cluster: a filter on it
selects whole regions of the space, as a brand or a type does) and ``in_stock``.

For filters allowing about 1%, 10% and 50% of the catalog, of each kind, it times
what a search through ``CategoryFilter.blocks`` + ``VectorIndex.search`` (the
engine's read path) costs:

- ``set ms``: the allowed set from SQLite (one indexed query + sort), which the
  first search after a catalog write pays;
- ``first ms``: the first search with a new set (the index builds its per-list
  counts of it);
- ``query ms`` and ``x unfiltered``: the median of single queries with the set
  cached, against the median unfiltered query measured in the same run;
- ``recall@10`` against numpy's exact search over the allowed vectors;
- ``write ms`` and ``after ms``: one product's attributes change so that it leaves
  the set: what the write path spends patching the kept set (``CategoryFilter.update``
  with the changed image, as the engine calls it), and the next search;
- ``facet ms``: the ``in_stock`` facet's counts over the whole filtered set.

    python scripts/bench_attributes.py --work /tmp/attrbench            # 1M
    python scripts/bench_attributes.py --work /tmp/attrbench --n 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_filtered as bf  # noqa: E402 - the index and data set of the filtered-search benchmark

from vsearch.attributes import AttributeFilter, parse_where  # noqa: E402
from vsearch.catalog import Catalog  # noqa: E402
from vsearch.categories import CategoryFilter  # noqa: E402
from vsearch.facets import facet_counts  # noqa: E402
from vsearch.query import SearchOptions  # noqa: E402
from vsearch.topk import recall_at_k  # noqa: E402

FILTERS = {
    "random 1%": ["bucket<1"],
    "random 10%": ["bucket<10"],
    "random 50%": ["bucket<50"],
    "cluster 1%": ["cluster<10"],
    "cluster 10%": ["cluster<100"],
    "cluster 50%": ["cluster<500"],
    "AND 10%": ["in_stock=true", "bucket<20"],
}


def build_catalog(path: Path, ids: np.ndarray, clusters: np.ndarray) -> float:
    """Products p<id> with their attributes and one image row each, in batches."""
    if path.exists():
        return 0.0
    started = time.perf_counter()
    rng = np.random.default_rng(3)
    bucket = rng.integers(0, 100, len(ids))
    stock = rng.random(len(ids)) < 0.5
    catalog = Catalog.open(path)
    for lo in range(0, len(ids), 100_000):
        rows = range(lo, min(lo + 100_000, len(ids)))
        with catalog.transaction():
            catalog.db.conn.executemany(
                "INSERT INTO products(id, title, category, attributes, created_at, updated_at) VALUES (?, '', '', ?, 0, 0)",
                (
                    (
                        f"p{ids[i]}",
                        json.dumps({"bucket": int(bucket[i]), "cluster": int(clusters[i]), "in_stock": bool(stock[i])}),
                    )
                    for i in rows
                ),
            )
            catalog.db.conn.executemany(
                "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
                "VALUES (?, ?, 'x.jpg', '', 1, 1, 0, 0)",
                ((int(ids[i]), f"p{ids[i]}") for i in rows),
            )
    catalog.close()
    return time.perf_counter() - started


def filtered(index: Any, filters: CategoryFilter, where: AttributeFilter) -> Callable[[np.ndarray], Any]:
    """One search as the engine runs it: the blocks of the filter, then the index."""
    return lambda q: index.search(q, bf.K, filters.blocks((), (), where), filters.cache)


def one_write(
    catalog: Catalog, filters: CategoryFilter, index: object, q: np.ndarray, where: object, image_id: int
) -> tuple[float, float]:
    """One product's attributes changed so that it leaves the set (then restored):
    the time the write path spends patching the kept sets, and the next search's."""
    product = catalog.image_products([image_id])[image_id]
    old = catalog.product(product).attributes
    timings = []
    for attrs in ({"bucket": 99, "cluster": 999, "in_stock": False}, old):
        with catalog.transaction():
            catalog.upsert_product(product, attributes=attrs)
        start = time.perf_counter()
        filters.update({image_id: ""})
        middle = time.perf_counter()
        filtered(index, filters, where)(q[None])
        timings.append((1000 * (middle - start), 1000 * (time.perf_counter() - middle)))
    return timings[0]


def median_ms(fn: object, queries: np.ndarray) -> tuple[float, np.ndarray]:
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        _, I = fn(q[None])  # type: ignore[operator]
        times.append(time.perf_counter() - start)
        found.append(I[0])
    return 1000 * float(np.median(times)), np.stack(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="keeps the catalog and the index for a rerun")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dim = 64
    xb, ids, clusters, xq = bf.dataset(args.n, dim)
    xq = xq[: args.queries]
    db = args.work / f"catalog-{args.n}.db"
    catalog_s = build_catalog(db, ids, clusters)
    index, index_s = bf.build(xb, ids, bf.ivf_factory(args.n, dim), args.work)
    print(f"{args.n} products: catalog {catalog_s:.0f} s, index {index_s:.0f} s ({index.factory}, nprobe {index.nprobe})")
    catalog = Catalog.open(db)
    position = {int(i): p for p, i in enumerate(ids)}
    base_ms, _ = median_ms(lambda q: index.search(q, bf.K), xq)
    print(f"unfiltered: {base_ms:.2f} ms/query (median of {len(xq)} single queries)\n")
    head = f"{'filter':<13} {'allowed':>8} {'set ms':>8} {'first ms':>9} {'query ms':>9} {'x unfiltered':>13}"
    print(f"{head} {'recall@10':>10} {'write ms':>9} {'after ms':>9} {'facet ms':>9}  paths")
    rows = []
    for name, clauses in FILTERS.items():
        where = parse_where(clauses)
        assert isinstance(where, AttributeFilter)
        filters = CategoryFilter(catalog)
        start = time.perf_counter()
        blocks = filters.blocks((), (), where)
        set_ms = 1000 * (time.perf_counter() - start)
        assert blocks is not None
        allowed = np.concatenate(list(blocks.values()))
        start = time.perf_counter()
        index.search(xq[:1], bf.K, filters.blocks((), (), where), filters.cache)
        first_ms = 1000 * (time.perf_counter() - start)
        before = index.paths.copy()
        query_ms, found = median_ms(filtered(index, filters, where), xq)
        paths = dict(index.paths - before)
        rows_of = np.array([position[int(i)] for i in allowed])
        truth = bf.exact(xq, xb[rows_of], allowed)
        recall = recall_at_k(found, truth, bf.K)
        start = time.perf_counter()
        facet_counts(catalog, SearchOptions(where=where, facets=("in_stock",)), [])
        facet_ms = 1000 * (time.perf_counter() - start)
        write_ms, after_ms = one_write(catalog, filters, index, xq[0], where, int(allowed[len(allowed) // 2]))
        share = len(allowed) / args.n
        print(
            f"{name:<13} {share:>8.1%} {set_ms:>8.1f} {first_ms:>9.1f} {query_ms:>9.2f} {query_ms / base_ms:>13.2f} "
            f"{recall:>10.3f} {write_ms:>9.1f} {after_ms:>9.1f} {facet_ms:>9.1f}  {paths}"
        )
        rows.append(
            {
                "filter": name,
                "where": clauses,
                "share": share,
                "set_ms": set_ms,
                "first_ms": first_ms,
                "query_ms": query_ms,
                "ratio": query_ms / base_ms,
                "recall_at_10": recall,
                "write_ms": write_ms,
                "after_write_ms": after_ms,
                "facet_ms": facet_ms,
                "paths": paths,
            }
        )
    out = {"n": args.n, "factory": index.factory, "nprobe": index.nprobe, "unfiltered_ms": base_ms, "filters": rows}
    (args.work / f"attributes-{args.n}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
