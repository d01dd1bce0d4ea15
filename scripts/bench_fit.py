#!/usr/bin/env python3
"""Benchmark (not a test): what fitting the projection costs against catalog size.

Builds synthetic catalogs (seeded random unit vectors, stored float16 as vsearch
writes them, one image per product) through the catalog's own tables, then times,
each in a fresh process so that its peak RSS is its own:

  sample s     ``Catalog.sample_vectors(FIT_SAMPLE)``: the fit's sample
  old s        the previous release's sampling (every id read from the primary
               key, then the chosen rows), on the same catalog
  fit s        ``Projection.fit`` on the sample (centre + PCA 256, the default)
  fit MB       the fit's tracemalloc peak beyond its input
  peak MB      the process's peak RSS: sample + fit (an idle one is printed too)

"warm": the catalog file is in the OS page cache (read once before); "cold": its
pages were just dropped (posix_fadvise, this file only). Timings are wall-clock on
a possibly shared machine; nothing asserts on them.

    .venv/bin/python scripts/bench_fit.py --sizes 1000000:64 100000:1752 --dir "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

FIT_SAMPLE = 100_000  # vsearch.indexfile.FIT_SAMPLE


def build(path: Path, n: int, dim: int, seed: int = 0) -> float:
    from vsearch.catalog import Catalog

    rng = np.random.default_rng(seed)
    catalog = Catalog.open(path)
    db = catalog.db.conn
    start = time.perf_counter()
    for lo in range(0, n, 20_000):
        hi = min(n, lo + 20_000)
        x = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        half = x.astype(np.float16)
        with catalog.transaction():
            db.executemany(
                "INSERT INTO products(id, title, category, attributes, created_at, updated_at) VALUES (?, '', ?, '{}', 0, 0)",
                [(f"p{i}", f"C{i % 20}") for i in range(lo, hi)],
            )
            db.executemany(
                "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 1, 1, 0, 0)",
                [(i + 1, f"p{i}", f"s{i}", f"h{i}") for i in range(lo, hi)],
            )
            db.executemany(
                "INSERT INTO model_vectors(model, image_id, vector, dtype) VALUES ('base', ?, ?, 1)",
                [(i + 1, v.tobytes()) for i, v in zip(range(lo, hi), half)],
            )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    catalog.close()
    return time.perf_counter() - start


def old_sample(conn: Any, n: int, seed: int, model: str = "base") -> np.ndarray:
    """VectorStore.sample as the previous release had it (float16 rows decoded)."""
    ids = [r[0] for r in conn.execute("SELECT image_id FROM model_vectors WHERE model = ? ORDER BY image_id", [model])]
    if len(ids) > n:
        ids = sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
    blobs: list[bytes] = []
    for lo in range(0, len(ids), 500):
        chunk = ids[lo : lo + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT vector FROM model_vectors WHERE model = ? AND image_id IN ({marks}) ORDER BY image_id", [model, *chunk]
        )
        blobs += [r[0] for r in rows]
    return np.stack([np.frombuffer(b, dtype=np.float16) for b in blobs]).astype(np.float32)


def evict(path: Path) -> None:
    for p in (path, Path(f"{path}-wal")):
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(path: Path, how: str, n: int, cold: bool, fit: bool) -> dict[str, float]:
    """In this process: one sample (and fit); its times and memory."""
    from vsearch.catalog import Catalog
    from vsearch.config import ProjectionConfig
    from vsearch.projection import Projection

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    catalog = Catalog.open(path)
    if cold:
        evict(path)
    start = time.perf_counter()
    x = catalog.sample_vectors(n) if how == "new" else old_sample(catalog.db.conn, n, 0)
    out = {"sample s": time.perf_counter() - start, "rows": float(len(x)), "idle MB": idle}
    if fit:
        tracemalloc.start()
        start = time.perf_counter()
        Projection.fit(x, ProjectionConfig())
        out["fit s"] = time.perf_counter() - start
        out["fit MB"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    out["peak MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    catalog.close()
    return out


def run(path: Path, how: str, n: int, cold: bool, fit: bool) -> dict[str, float]:
    args = [sys.executable, __file__, "--measure", str(path), "--how", how, "--n", str(n)]
    args += ["--cold"] * cold + ["--fit"] * fit
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1000000:64", "100000:1752"], help="IMAGES:DIM")
    ap.add_argument("--dir", type=Path, help="where the catalogs are built (kept: a rerun reuses them)")
    ap.add_argument("--sample", type=int, default=FIT_SAMPLE)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--how", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=FIT_SAMPLE, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.how, args.n, args.cold, args.fit)))
        return
    if args.dir is None:
        ap.error("--dir is required")
    args.dir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        n, dim = (int(v) for v in size.split(":"))
        path = args.dir / f"catalog-{n}x{dim}.db"
        if not path.exists():
            print(f"{n} x {dim}: built in {build(path, n, dim):.0f} s, {path.stat().st_size / n:.0f} B/image", flush=True)
        run(path, "new", args.sample, False, False)  # the file into the page cache
        rows = {
            "new warm": run(path, "new", args.sample, False, True),
            "new cold": run(path, "new", args.sample, True, False),
            "old warm": run(path, "old", args.sample, False, False),
            "old cold": run(path, "old", args.sample, True, False),
        }
        print(f"\n{n} images x {dim} (float16 rows), sample {args.sample}")
        for name, r in rows.items():
            print(f"  {name:9} " + "  ".join(f"{k} {v:.3g}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
