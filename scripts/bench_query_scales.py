#!/usr/bin/env python3
"""Benchmark (not a test): does multi-scale query TTA help? (issue 11, part 1 lever)

On an existing grocery index (e.g. the one ``scripts/bench_day_one.py --work DIR``
leaves in ``DIR/index``: the 81 iconic images, its projection as the server refitted
it), the val photos are embedded as queries at the model's input size and at larger
ones (the default query TTA, full photo + 0.8 centre crop, at each size), the
vectors of several sizes averaged, projected with the index's projection and
searched exactly against the catalog's vectors: Recall@1/10 per combination.

    python scripts/bench_query_scales.py --index DIR/index --queries artifacts/protocols/grocery/queries-val.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--queries", type=Path, default=Path("artifacts/protocols/grocery/queries-val.csv"))
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    args = ap.parse_args()

    from vsearch import Engine
    from vsearch.embed import Embedder
    from vsearch.projection import l2_normalize

    with open(args.queries, newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = np.array([r["expected_id"] for r in rows])
    with Engine.open(args.index) as engine:
        ids, gallery = zip(*engine.catalog.iter_vectors(batch=10_000))
        image_ids = np.concatenate(ids)
        owners = engine.catalog.image_products(image_ids.tolist())
        products = np.array([owners[int(i)] for i in image_ids])
        projection = engine.snapshot.projection
        base = engine.manifest.model
        images = [engine.load_query(r["image"]) for r in rows]
        fitted = f"{projection.fitted_on} vectors from {projection.fitted_from}"
    xb = projection.apply(np.concatenate(gallery))
    per_scale = {}
    for scale in args.scales:
        embedder = Embedder(replace(base, image_size=round(base.image_size * scale / 4) * 4), device="cpu")
        per_scale[scale] = np.concatenate(
            [embedder.embed_images(images[i : i + 16], tta=True) for i in range(0, len(images), 16)]
        )
        print(f"embedded {len(images)} queries at {embedder.config.image_size}px", flush=True)
    print(f"\nprojection fitted on {fitted}\n\n| query sizes (x input) | Recall@1 | Recall@10 |\n|---|---:|---:|")
    for n in range(1, len(args.scales) + 1):
        for combo in itertools.combinations(args.scales, n):
            xq = projection.apply(l2_normalize(np.mean([per_scale[s] for s in combo], axis=0)))
            order = np.argsort(-(xq @ xb.T), axis=1)[:, :10]
            ranked = products[order]
            r1, r10 = (ranked[:, 0] == expected).mean(), (ranked == expected[:, None]).any(axis=1).mean()
            print(f"| {' + '.join(f'{s:g}' for s in combo)} | {r1:.3f} | {r10:.3f} |", flush=True)


if __name__ == "__main__":
    main()
