"""Write latency against catalog size (a benchmark, not a test; model time excluded).

Builds catalogs of synthetic clustered vectors (default 10k and 1M images, 64-d raw
vectors, 20 categories with skewed sizes) through the catalog's own tables, opens
them with vsearch, then times one-image product writes (catalog transaction + index
add + the library's checkpoint policy, a save every 64 generations), deletes, the
first category-filtered search after a write, and one checkpoint (what a server's
background save costs), and prints each size beside the smallest as a ratio.

    python scripts/bench_writes.py                 # 10k and 1M
    python scripts/bench_writes.py --sizes 10000 100000 --writes 300
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from vsearch import Engine
from vsearch.query import SearchOptions
from vsearch.sources import Item
from vsearch.vectorstore import encode
from vsearch.writer import NewImage

DIM = 64
CATEGORIES = 20


def build(root: Path, n: int, seed: int = 0) -> Path:
    """An index directory of ``n`` synthetic images, written in bulk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    weights = 1.0 / np.arange(1, CATEGORIES + 1)  # skewed category sizes
    weights /= weights.sum()
    with Engine.open(root, model="tiny-test", create=True) as engine:
        db = engine.catalog.db.conn
        with engine.catalog.transaction():
            for lo in range(0, n, 50_000):
                hi = min(n, lo + 50_000)
                cats = rng.choice(CATEGORIES, hi - lo, p=weights)
                x = centres[rng.integers(0, 256, hi - lo)] + 0.3 * rng.standard_normal((hi - lo, DIM)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                db.executemany(
                    "INSERT INTO products(id, title, category, attributes, created_at, updated_at) VALUES (?, '', ?, '{}', 0, 0)",
                    [(f"p{i}", f"C{c}") for i, c in zip(range(lo, hi), cats)],
                )
                db.executemany(
                    "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, 1, 1, 0, 0)",
                    [(i + 1, f"p{i}", f"s{i}", f"h{i}") for i in range(lo, hi)],
                )
                db.executemany(
                    "INSERT INTO model_vectors(model, image_id, vector) VALUES ('base', ?, ?)",
                    [(i + 1, encode(v)) for i, v in zip(range(lo, hi), x)],
                )
        engine.fit_projection()  # fits, builds the index and saves
    return root


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def measure(root: Path, writes: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    engine = Engine.open(root)
    opened = time.perf_counter() - t0
    query = rng.standard_normal((1, DIM)).astype(np.float32)
    small = SearchOptions(k=10, categories=("C19",))
    engine.search_vectors(query, small)  # blocks read once
    put, delete, filtered = [], [], []
    for n in range(writes):
        v = rng.standard_normal((1, DIM)).astype(np.float32)
        v /= np.linalg.norm(v)
        pid = f"new{n}"
        image = NewImage(pid, f"new/{n}.jpg", hashlib.sha256(pid.encode()).hexdigest(), 1, 1)
        t0 = time.perf_counter()
        with engine.writer() as writer:
            writer.add_images([image], v, products=[Item(product_id=pid, image=image.source, category="C19")])
            writer.checkpoint()
        put.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.search_vectors(query, small)
        filtered.append(time.perf_counter() - t0)
        if n % 2:
            t0 = time.perf_counter()
            engine.remove_products([f"new{n - 1}"])
            delete.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.checkpoint()  # what a server's background checkpoint costs (writes wait for it)
    saved = time.perf_counter() - t0
    engine.close()
    return {
        "open_s": opened,
        "checkpoint_s": saved,
        "put_p50_ms": percentile(put, 50),
        "put_p99_ms": percentile(put, 99),
        "delete_p50_ms": percentile(delete, 50),
        "delete_p99_ms": percentile(delete, 99),
        "filtered_after_write_p50_ms": percentile(filtered, 50),
        "filtered_after_write_p99_ms": percentile(filtered, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            t0 = time.perf_counter()
            root = build(Path(tmp) / f"n{n}", n)
            print(f"built {n:,} images in {time.perf_counter() - t0:.1f} s", flush=True)
            results[n] = measure(root, args.writes)
    base = results[args.sizes[0]]
    print(f"\n{'images':>10} " + " ".join(f"{k:>28}" for k in base))
    for n, r in results.items():
        cells = " ".join(f"{v:>14.1f} ({v / base[k]:>5.2f}x base)" if base[k] else f"{v:>28.1f}" for k, v in r.items())
        print(f"{n:>10,} {cells}")


if __name__ == "__main__":
    main()
