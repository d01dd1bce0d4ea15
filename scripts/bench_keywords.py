#!/usr/bin/env python3
"""Benchmark (not a test): does typing the product's type word beside the photo rank
the right product higher than the photo alone? (issue 12, part 3)

Shared grocery data: the catalog is the 81 iconic images with the titles and
attributes the demo gives them (title = class name, ``coarse_class``,
``fine_class``, ``description`` = the dataset's product description text, made-up
price/stock), ingested with the default model and no ``--center-on`` (the
projection fitted on the catalog, as a plain ``vsearch ingest``); the queries are
the 296 val photos of ``dataset/val.txt``. The type word is the photo's coarse class
name from its label ("Apple", "Milk"; "Soy-Milk" typed as "Soy Milk"): an oracle
shopper who types the right kind of product, never a wrong one.

For each photo: the rank of its product with the photo alone, with the photo and
the type word fused (reciprocal rank fusion, several text weights), and with the
type word alone (keyword search). Recall@1, Recall@10 and mean rank. The index and
the query embeddings are cached in ``--work`` (the first run embeds 377 images: a
few minutes on 2 CPU cores).

    python scripts/bench_keywords.py --data ../shared/datasets/grocery-store --work DIR
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vsearch import Engine


@dataclass(frozen=True)
class Photo:
    path: Path
    product_id: str
    type_word: str


def val_photos(dataset: Path) -> list[Photo]:
    """The val photos with their product (the demo's id: the class name) and coarse class."""
    with open(dataset / "classes.csv", newline="") as fh:
        rows = [r for r in csv.reader(fh) if not r[0].startswith("Class Name")]
    names = {r[1]: r[0] for r in rows}
    coarse = {r[1]: r[2] for r in rows}
    photos = []
    for line in (dataset / "val.txt").read_text().splitlines():
        if line.strip():
            path, class_id, _ = (part.strip() for part in line.split(","))
            photos.append(Photo(dataset / path, names[class_id], coarse[class_id].replace("-", " ")))
    return photos


def query_vectors(engine: Engine, photos: list[Photo], cache: Path) -> np.ndarray:
    """The photos' raw query vectors, embedded once and kept in ``cache``."""
    if cache.exists():
        return np.load(cache)
    start = time.perf_counter()
    rows = []
    for lo in range(0, len(photos), 16):
        images = [engine.load_query(p.path) for p in photos[lo : lo + 16]]
        rows.append(engine.embed_queries(images))
    raw = np.concatenate(rows)
    np.save(cache, raw)
    print(f"embedded {len(photos)} val photos in {time.perf_counter() - start:.0f} s", flush=True)
    return raw


def score(ranks: list[int]) -> tuple[float, float, float]:
    r = np.array(ranks)
    return float((r == 1).mean()), float((r <= 10).mean()), float(r.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/grocery-store"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    args = ap.parse_args()

    from vsearch import Engine
    from vsearch.demo import _grocery_manifests
    from vsearch.query import SearchOptions

    dataset = args.data.resolve() / "dataset"
    args.work.mkdir(parents=True, exist_ok=True)
    catalog, _ = _grocery_manifests(dataset, args.work)
    photos = val_photos(dataset)
    with Engine.open(args.work / "index", create=True) as engine:
        engine.ingest(catalog, quiet=True)  # re-runs skip what is stored
        raw = query_vectors(engine, photos, args.work / f"val-{engine.manifest.model.name}.npy")
        n = engine.info()["products"]

        def rank(options: SearchOptions, vector: np.ndarray | None, product_id: str) -> int:
            if vector is None:
                hits = engine.search_keywords(options)[0]
            else:
                hits = engine.search_vectors(vector[None, :], options)[0]
            ids = [h.product_id for h in hits]
            return ids.index(product_id) + 1 if product_id in ids else n + 1  # not ranked: after every product

        rows = []
        for weight in [0.0, *args.weights]:  # text_weight 0: the photo alone
            label = f"photo + type word, text_weight {weight:g}" if weight else "photo alone"
            start = time.perf_counter()
            ranks = [
                rank(SearchOptions(k=n, text=p.type_word, text_weight=weight), raw[i], p.product_id) for i, p in enumerate(photos)
            ]
            rows.append((label, *score(ranks), (time.perf_counter() - start) / len(photos) * 1000))
        start = time.perf_counter()
        ranks = [rank(SearchOptions(k=n, text=p.type_word), None, p.product_id) for p in photos]
        rows.append(("type word alone (keyword search)", *score(ranks), (time.perf_counter() - start) / len(photos) * 1000))

    print(f"\n{len(photos)} val photos, {n} products")
    print("| ranking | Recall@1 | Recall@10 | mean rank | ms per query (search only) |")
    print("|---|---:|---:|---:|---:|")
    for label, r1, r10, mean, ms in rows:
        print(f"| {label} | {r1:.3f} | {r10:.3f} | {mean:.2f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
