"""Re-score a served fine-tuned version for several per-product gallery weights.

    python scripts/bench_gallery_weight.py --index DIR --seen SEEN.csv --unseen UNSEEN.csv

``DIR`` serves a product-level fine-tuned version (``vsearch finetune`` + ``vsearch
reindex``); the query CSVs are ``vsearch eval``'s (``image,expected_id``). The
queries are embedded once, as the server embeds them; the catalog's stored vectors
are then reweighted with each W (vsearch.gallery) and searched exactly. Prints
Recall@1 / Recall@10 per W, and checks that the served index equals the W it was
built with.

Two forms per W. "unit" is what vsearch serves: the untrained products' vectors stay
unit-length, so their similarity is sqrt(w W) zero-shot + sqrt((1-w)(1-W)) adapted
cosine, whose weights sum to less than 1 for W != w: their scores shrink against the
trained products' w zero-shot + (1-w) adapted. "cosine" scores them W zero-shot +
(1-W) adapted, on the trained products' scale; serving it would need gallery vectors
that are not unit-length (scaled after the projection), which vsearch does not build.
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
        trained = np.array([p in served.trained for p in products])
        print("| W | form | seen R@1 / R@10 | unseen R@1 / R@10 |\n|---|---|---|---|")
        for w in WEIGHTS:
            gallery = GalleryWeights(served.adapted_dim, served.zero_shot_weight, w, served.trained)
            xb = snap.projection.apply(gallery.apply(list(products), raw))
            for form in ("unit", "cosine"):
                cells = []
                for xq, expected in queries.values():
                    sims = xq @ xb.T if form == "unit" else cosine_form(xq, raw, trained, served, w)
                    ranked = products[np.argsort(-sims, axis=1)]
                    r1 = float(np.mean(ranked[:, 0] == expected))
                    r10 = float(np.mean([e in row[:10] for e, row in zip(expected, ranked)]))
                    cells.append(f"{r1:.3f} / {r10:.3f}")
                print(f"| {w} | {form} | {' | '.join(cells)} |")
        same = np.allclose(engine.index.reconstruct(ids), snap.projection.apply(served.apply(list(products), raw)), atol=1e-4)
        print(f"served index equals W {served.untrained_weight}: {same}")


def cosine_form(xq: np.ndarray, raw: np.ndarray, trained: np.ndarray, served: GalleryWeights, untrained: float) -> np.ndarray:
    """Similarities with each part's cosine weighted w (trained products) or
    ``untrained`` (the others), on one scale. Exact where the projection is the
    identity, as for a fine-tuned version (its vectors are not centred)."""
    split = raw.shape[1] - served.adapted_dim

    def parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, a = x[:, :split], x[:, split:]
        return z / np.linalg.norm(z, axis=1, keepdims=True), a / np.linalg.norm(a, axis=1, keepdims=True)

    (zq, aq), (zb, ab) = parts(xq), parts(raw)
    share = np.where(trained, served.zero_shot_weight, untrained)
    return share * (zq @ zb.T) + (1 - share) * (aq @ ab.T)


if __name__ == "__main__":
    main()
