#!/usr/bin/env python3
"""Benchmark (not a test): does storing raw vectors as float16 move retrieval?

Embeds the grocery-store data set once with the real model (default
efficientnet-lite2): the gallery through ``vsearch ingest`` (catalog-side, as
stored), the photos as queries (query-side TTA, as searched). The raw vectors are
cached in ``--work`` so a rerun skips the model. Then, for each way of storing the
gallery's raw vectors, the catalog's part is replayed exactly as vsearch does it
(decode to float32, fit the projection on the stored vectors or on in-domain
photos, project, exact inner-product search) and scored:

  A  gallery = the 81 iconic images, queries = the 2,936 train + val photos,
     projection fitted on the train photos (``--center-on``: query-side, never
     stored, so only the gallery's storage differs); hit = the query's product
  A0 the same without ``--center-on``: centring fitted on the 81 stored vectors
  B  gallery = the 2,640 train photos, queries = the 296 val photos, centring and
     PCA fitted on the stored gallery vectors; hit = an image of the query's product

Printed per storage: Recall@1/5/10 (and coarse Recall@1 for A), and against
float32: the share of queries whose top-10 list is identical, the mean top-10
overlap, and the largest change of any query-gallery cosine.

Then A0 and B once more end to end through vsearch itself, from the cached vectors
(no model): an index per storage written through ``IndexWriter.add_images``, its
projection fitted by ``finish()`` on the catalog's own sample, searched with
``Engine.search_vectors`` (faiss, hits grouped by product).

    .venv/bin/python scripts/bench_vector_dtype.py --work "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import csv
import functools
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vsearch.config import ProjectionConfig
from vsearch.projection import Projection

STORAGES = ("float32", "float16")


def protocols(data: Path, work: Path) -> Path:
    out = work / "protocols"
    if not (out / "grocery" / "gallery.csv").exists():
        script = Path(__file__).with_name("make_protocols.py")
        subprocess.run([sys.executable, str(script), "--data", str(data), "--out", str(out)], check=True)
    return out / "grocery"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def ingested(work: Path, name: str, items: list[Any], model: str) -> tuple[np.ndarray, list[str]]:
    """Raw float32 vectors of ``items`` as ``vsearch ingest`` embeds and stores them
    (read back exactly: this index stores float32), by item order."""
    cache = work / f"{name}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return data["x"], data["ids"].tolist()
    from vsearch import Engine
    from vsearch.config import IndexConfig

    exact = IndexConfig(raw_vectors="float32")  # the reference: what the model gave, unrounded
    with Engine.open(work / f"index-{name}", model=model, create=True, index=exact) as engine:
        engine.ingest(items, quiet=True, workers=0)
        ids, raws = zip(*engine.catalog.iter_vectors(batch=10_000))
        id_array = np.concatenate(ids)
        x = np.concatenate(raws).astype(np.float32)
        owners = engine.catalog.image_products(id_array.tolist())
    products = [owners[int(i)] for i in id_array]
    np.savez(cache, x=x, ids=np.array(products))
    return x, products


def queries(work: Path, name: str, paths: list[str], model: str) -> np.ndarray:
    cache = work / f"{name}.npy"
    if cache.exists():
        return np.load(cache)
    from vsearch import Engine

    out = []
    with Engine.open(work / "index-gallery", model=model) as engine:
        for lo in range(0, len(paths), 32):
            out.append(engine.embed_queries([engine.load_query(p) for p in paths[lo : lo + 32]]))
            print(f"{name}: {lo + 32}/{len(paths)}", flush=True)
    x = np.concatenate(out).astype(np.float32)
    np.save(cache, x)
    return x


def stored(x: np.ndarray, storage: str) -> np.ndarray:
    """What a read of the store gives back: float32 decoded from the stored dtype."""
    return x.astype(storage).astype(np.float32)


def search(gallery: np.ndarray, q: np.ndarray, projection: Projection, k: int) -> tuple[np.ndarray, np.ndarray]:
    g, p = projection.apply(gallery), projection.apply(q)
    scores = p @ g.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, scores


def recall(order: np.ndarray, owners: np.ndarray, expected: np.ndarray, n: int) -> float:
    return float(np.mean([e in set(owners[row[:n]]) for row, e in zip(order, expected)]))


@contextmanager
def storing(raw_vectors: str) -> Iterator[None]:
    """Catalogs opened meanwhile write ``raw_vectors`` rows (the setting an index's
    IndexConfig passes)."""
    from vsearch.catalog import Catalog

    real = Catalog.open
    Catalog.open = functools.partial(real, raw_vectors=raw_vectors)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Catalog.open = real  # type: ignore[method-assign]


def end_to_end(
    root: Path, model: str, gallery: np.ndarray, products: list[str], owners: dict[str, str], queries: np.ndarray
) -> Any:
    """Top-10 product lists (as owners) of ``queries`` against an index of ``gallery``
    built and searched by vsearch."""
    from vsearch import Engine
    from vsearch.query import SearchOptions
    from vsearch.sources import Item
    from vsearch.writer import NewImage

    with Engine.open(root, model=model, create=True) as engine:
        with engine.writer() as writer:
            images = [NewImage(p, f"{n}.jpg", f"{n:064x}", 1, 1) for n, p in enumerate(products)]
            writer.add_images(images, gallery, [Item(p, f"{n}.jpg", owners[p]) for n, p in enumerate(products)])
            writer.finish()  # fits the projection on the catalog's sample, builds the index, saves
        hits = engine.search_vectors(queries, SearchOptions(k=10))
    return np.array([[owners[h.product_id] for h in row] + [""] * (10 - len(row)) for row in hits])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, required=True, help="where the embeddings are cached (reused by a rerun)")
    ap.add_argument("--model", default="efficientnet-lite2")
    args = ap.parse_args()
    from vsearch.sources import Item

    args.work.mkdir(parents=True, exist_ok=True)
    grocery = protocols(args.data.resolve(), args.work)
    gallery_rows = read_csv(grocery / "gallery.csv")
    coarse = {r["id"]: r["category"] for r in gallery_rows}
    iconic, iconic_ids = ingested(
        args.work, "gallery", [Item(r["id"], r["image"], r["category"]) for r in gallery_rows], args.model
    )
    train_rows = read_csv(grocery / "train-pairs.csv")
    val_rows = read_csv(grocery / "queries-val.csv")
    photo_items = [Item(f"photo{n}:{r['product_id']}", r["image"], r["product_id"]) for n, r in enumerate(train_rows)]
    photos, photo_ids = ingested(args.work, "photos", photo_items, args.model)
    q_train = queries(args.work, "q-train", [r["image"] for r in train_rows], args.model)
    q_val = queries(args.work, "q-val", [r["image"] for r in val_rows], args.model)
    fine_train = np.array([r["product_id"] for r in train_rows])
    fine_val = np.array([r["expected_id"] for r in val_rows])
    photo_owner = np.array([pid.split(":", 1)[1] for pid in photo_ids])
    config = ProjectionConfig()

    print(f"\n{args.model}: raw dim {iconic.shape[1]} ({iconic.shape[1] * 4} B float32, {iconic.shape[1] * 2} B float16)")
    err = np.abs(stored(photos, "float16") - photos)
    rel = np.linalg.norm(stored(photos, "float16") - photos, axis=1) / np.linalg.norm(photos, axis=1)
    finite = np.isfinite(stored(photos, "float16")).all()
    print(
        f"float16 round trip of {len(photos)} stored vectors: max |error| {err.max():.3g}, "
        f"relative L2 error mean {rel.mean():.3g} max {rel.max():.3g}; all finite: {finite}"
    )
    cases: dict[str, dict[str, Any]] = {}
    q_all, fine_all = np.concatenate([q_train, q_val]), np.concatenate([fine_train, fine_val])
    owners_iconic = np.array(iconic_ids)
    for storage in STORAGES:
        # A: centre (and PCA) on the train photos, embedded query-side: not stored
        fitted = Projection.fit(q_train, config)
        order_a, scores_a = search(stored(iconic, storage), q_all, fitted, 10)
        # A0: fitted on the stored gallery (81 < 2 * pca_dim: centring only)
        own = Projection.fit(stored(iconic, storage), config)
        order_a0, scores_a0 = search(stored(iconic, storage), q_all, own, 10)
        # B: gallery = train photos; fitted on their stored vectors
        photo_fit = Projection.fit(stored(photos, storage), config)
        order_b, scores_b = search(stored(photos, storage), q_val, photo_fit, 10)
        cases[storage] = {
            "A": (order_a, scores_a, owners_iconic, fine_all),
            "A0": (order_a0, scores_a0, owners_iconic, fine_all),
            "B": (order_b, scores_b, photo_owner, fine_val),
        }
    head = f"{'R@1':>8}{'R@5':>8}{'R@10':>8}{'coarseR@1':>11}{'same top10':>12}{'overlap@10':>12}{'max dcos':>10}"
    print(f"\n{'':10}{'storage':>9}{head}")
    for name in ("A", "A0", "B"):
        base_order, base_scores, _, _ = cases["float32"][name]
        for storage in STORAGES:
            order, scores, owners, expected = cases[storage][name]
            r = [recall(order, owners, expected, n) for n in (1, 5, 10)]
            coarse_r1 = (
                float(np.mean([coarse[owners[row[0]]] == coarse[e] for row, e in zip(order, expected)]))
                if name != "B"
                else float("nan")
            )
            same = float(np.mean([np.array_equal(a, b) for a, b in zip(order, base_order)]))
            overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(order, base_order)]))
            dcos = float(np.abs(scores - base_scores).max())
            print(
                f"{name:10}{storage:>9}{r[0]:>8.4f}{r[1]:>8.4f}{r[2]:>8.4f}{coarse_r1:>11.4f}{same:>12.4f}{overlap:>12.4f}{dcos:>10.2e}"
            )
    print(f"\nend to end through vsearch\n{'':10}{'storage':>9}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'same top10':>12}")
    owner_of = {**{p: p for p in iconic_ids}, **{p: p.split(":", 1)[1] for p in photo_ids}}
    runs = {"A0": (iconic, iconic_ids, q_all, fine_all), "B": (photos, photo_ids, q_val, fine_val)}
    for name, (gallery, products, q, expected) in runs.items():
        lists = {}
        for storage in STORAGES:
            with storing(storage):
                lists[storage] = end_to_end(args.work / f"e2e-{name}-{storage}", args.model, gallery, products, owner_of, q)
        for storage, ranked in lists.items():
            r = [float(np.mean([e in row[:n] for row, e in zip(ranked, expected)])) for n in (1, 5, 10)]
            same = float(np.mean([np.array_equal(a, b) for a, b in zip(ranked, lists["float32"])]))
            print(f"{name:10}{storage:>9}{r[0]:>8.4f}{r[1]:>8.4f}{r[2]:>8.4f}{same:>12.4f}")


if __name__ == "__main__":
    main()
