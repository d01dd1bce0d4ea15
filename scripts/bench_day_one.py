#!/usr/bin/env python3
"""Benchmark (not a test): what a merchant gets on day one, before and after the
server has answered unlabelled shopper photos (issue 11, part 1).

Shared grocery protocol: the 81 iconic images as the catalog (default ``vsearch
ingest``: no ``--center-on``), the val photos as queries (Recall@1/10 with
``vsearch eval --index``). Then the train photos are sent to a ``SearchService`` as
ordinary image searches (labels unused), in batches of 32, with the server's
default learning settings (``query_reservoir`` 2000, refit at 100 queries and each
doubling; the background tick is called after each batch), and the val photos are
scored again. Last, how many photos a refit needs: the projection refitted on n of
the collected query vectors (seeded random subsets) and scored, for several n.

    python scripts/make_protocols.py --data ../shared/datasets --out artifacts/protocols
    python scripts/bench_day_one.py --protocols artifacts/protocols --work "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np


def recall(index: Path, queries: Path) -> tuple[float, float]:
    from vsearch.evaluate import evaluate_index

    m = evaluate_index(index, queries, k=10)
    return float(m["recall@1"]), float(m["recall@10"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocols", type=Path, default=Path("artifacts/protocols"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="efficientnet-lite2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 500, 1000, 2000])
    args = ap.parse_args()

    from vsearch import Engine
    from vsearch.catalog import BASE_MODEL
    from vsearch.config import ServeConfig
    from vsearch.query import ImageQuery, SearchOptions
    from vsearch.refit import refit_from_queries
    from vsearch.reservoir import QueryReservoir
    from vsearch.service import SearchService

    grocery = args.protocols / "grocery"
    val = grocery / "queries-val.csv"
    index = args.work / "index"
    with Engine.open(index, model=args.model, create=True) as engine:
        engine.ingest(grocery / "gallery.csv", quiet=True)
    rows = [("day one: default ingest, no traffic", *recall(index, val))]
    print(rows[-1], flush=True)

    with open(grocery / "center.csv", newline="") as fh:
        photos = [r["image"] for r in csv.DictReader(fh)]
    config = ServeConfig(index_dir=str(index), reload_interval_s=0)
    start = time.perf_counter()
    with Engine.open(index) as engine:
        service = SearchService(engine, config)
        refits = []
        for lo in range(0, len(photos), 32):
            batch = [(ImageQuery(Path(p).read_bytes()), SearchOptions(k=10)) for p in photos[lo : lo + 32]]
            service.search_many(batch)
            if service.learner.tick(save=False):
                refits.append(service.learner.reservoir.seen)
        collected = service.learner.reservoir.vectors()
        service.close()
    print(f"{len(photos)} train photos answered in {time.perf_counter() - start:.0f} s; refits at {refits}", flush=True)
    rows.append((f"after {len(photos)} shopper photos (server's refits at {refits})", *recall(index, val)))
    print(rows[-1], flush=True)

    rng = np.random.default_rng(0)
    for n in args.sizes:
        if n > len(collected):
            continue
        subset = QueryReservoir(n, BASE_MODEL)
        subset.add(collected[rng.permutation(len(collected))[:n]], BASE_MODEL)
        with Engine.open(index) as engine:
            refit_from_queries(engine, subset, minimum=1)
        rows.append((f"refit on {n} query photos", *recall(index, val)))
        print(rows[-1], flush=True)

    print("\n| setting | Recall@1 | Recall@10 |\n|---|---:|---:|")
    for name, r1, r10 in rows:
        print(f"| {name} | {r1:.3f} | {r10:.3f} |")


if __name__ == "__main__":
    main()
