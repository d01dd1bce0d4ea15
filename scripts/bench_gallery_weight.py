"""Re-score a served fine-tuned version for several per-product gallery weights.

    python scripts/bench_gallery_weight.py --index DIR --seen SEEN.csv --unseen UNSEEN.csv

``DIR`` serves a product-level fine-tuned version (``vsearch finetune`` + ``vsearch
reindex``); the query CSVs are ``vsearch eval``'s (``image,expected_id``). The
queries are embedded once, as the server embeds them; the catalog's stored vectors
are then reweighted with each W (vsearch.gallery) and searched exactly. Prints
Recall@1 / Recall@10 per W, and checks that the served index equals the W it was
built with.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np

from vsearch import Engine
from vsearch.gallery import GalleryWeights

WEIGHTS = (0.5, 0.6, 0.7, 0.85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--index", required=True)
    parser.add_argument("--seen", required=True)
    parser.add_argument("--unseen", required=True)
    args = parser.parse_args()
    with Engine.open(args.index) as engine:
        snap = engine.snapshot
        served = snap.gallery
        if served is None or engine.index is None:
            raise SystemExit("the index does not serve a product-level fine-tuned version")
        total = engine.catalog.counts()["images"]
        ids, raw = engine.catalog.vectors_by_id(list(range(1, 10 * total + 1)), snap.model)
        owners = engine.catalog.image_products([int(i) for i in ids])
        products = np.array([owners[int(i)] for i in ids])
        queries = {}
        for name, path in (("seen", args.seen), ("unseen", args.unseen)):
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            images = [engine.load_query(r["image"]) for r in rows]
            raw_q = np.vstack([engine.embed_queries(images[s : s + 32], snap) for s in range(0, len(images), 32)])
            queries[name] = (snap.projection.apply(raw_q), np.array([r["expected_id"] for r in rows]))
        print("| W | seen R@1 / R@10 | unseen R@1 / R@10 |\n|---|---|---|")
        for w in WEIGHTS:
            gallery = GalleryWeights(served.adapted_dim, served.zero_shot_weight, w, served.trained)
            xb = snap.projection.apply(gallery.apply(list(products), raw))
            cells = []
            for xq, expected in queries.values():
                ranked = products[np.argsort(-(xq @ xb.T), axis=1)]
                r1 = float(np.mean(ranked[:, 0] == expected))
                r10 = float(np.mean([e in row[:10] for e, row in zip(expected, ranked)]))
                cells.append(f"{r1:.3f} / {r10:.3f}")
            print(f"| {w} | {' | '.join(cells)} |")
        same = np.allclose(engine.index.reconstruct(ids), snap.projection.apply(served.apply(list(products), raw)), atol=1e-4)
        print(f"served index equals W {served.untrained_weight}: {same}")


if __name__ == "__main__":
    main()
