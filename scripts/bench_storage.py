#!/usr/bin/env python3
"""Benchmark (not a test): where the catalog keeps raw vectors.

Builds synthetic catalogs (seeded; two images per product, 1752-dim float32
vectors like the default model) in several layouts and measures, for each:

  bytes/image    the database file after a WAL checkpoint, per image
  scan           a full ordered scan of the base model's vectors, as
                 ``Catalog.iter_vectors`` does on every index rebuild
  small          ``category_image_ids`` and ``counts``: the images table's small
                 columns (search filters and every save read these)
  meta           every image row without its vector, as ``images_without_vectors``
                 does on each reindex (a table scan: no index covers it)
  sample         ``sample_vectors(5000)``, the projection fit's sample (the raw
                 layouts read every id, then the chosen rows; ``Catalog`` draws ids,
                 so its cost follows the sample: see scripts/bench_fit.py)
  lookup ms      what a search does after faiss: image and product rows of 100 hits
  remove 1% s    deleting 1% of the images, their vectors going with them
  100 puts s     one-image writes, each its own commit (the API's put_product),
  WAL KiB/put    and the bytes each writes to the WAL
  migrate s      (migrated only) ``Catalog.open`` moving an ``old`` catalog over

"warm": the file is in the OS page cache, best of --repeats runs; "cold": the
file's pages were just dropped from the cache (posix_fadvise, this file only), best
of two. Layouts:

  old         the previous release: the base vector inline in ``images.vector``
  rowid       ``model_vectors(model, image_id, vector)``, a rowid table with primary
              key (model, image_id) and an index on image_id: what vsearch uses
  norowid     the same table WITHOUT ROWID (clustered on (model, image_id))
  rowid-64k   rowid in 64 KiB pages instead of SQLite's default 4 KiB
  rowid-f16   rowid with float16 vectors
  vsearch     rowid plus a dtype column, written and read through
              ``vsearch.catalog.Catalog``: float16 rows, its default since catalog
              schema 5 (scripts/bench_vector_dtype.py: no recall moved)
  migrated    an ``old`` catalog opened by ``Catalog`` (which migrates it; no
              VACUUM), then read through it

With --lookup-scale N it also times the search-path lookups on images/products
tables of N images (no vectors: they play no part) in 4 KiB and 64 KiB pages, where
the tables no longer fit SQLite's page cache.

Timings are wall-clock seconds on a possibly shared machine; nothing asserts on them.

    .venv/bin/python scripts/bench_storage.py --images 20000 --lookup-scale 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

OLD_IMAGES = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id TEXT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vector BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (product_id, source)
);
"""
NEW_IMAGES = OLD_IMAGES.replace("    vector BLOB,\n", "")
COMMON = """
CREATE TABLE products (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    category TEXT NOT NULL DEFAULT '',
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX images_product ON images(product_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
OLD_MODEL_VECTORS = """
CREATE TABLE model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, image_id)
);
"""
NEW_MODEL_VECTORS = """
CREATE TABLE model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, image_id)
){suffix};
CREATE INDEX model_vectors_image ON model_vectors(image_id);
"""

# name -> (inline?, WITHOUT ROWID?, page size, dtype)
LAYOUTS: dict[str, tuple[bool, bool, int, str]] = {
    "old": (True, False, 4096, "float32"),
    "rowid": (False, False, 4096, "float32"),
    "norowid": (False, True, 4096, "float32"),
    "rowid-64k": (False, False, 65536, "float32"),
    "rowid-f16": (False, False, 4096, "float16"),
}
CATEGORIES = 50
SAMPLE = 5000
SINGLES = 100
LOOKUPS = 200


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


Row = tuple[str, str, str, str, np.ndarray]  # product, category, source, sha256, vector


def synthetic(n: int, dim: int, seed: int) -> Iterator[list[Row]]:
    """The catalog every layout stores, 1000 images at a time (ingest commits a
    batch at a time): two images per product, seeded random float32 vectors."""
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 1000):
        block = rng.standard_normal((min(n, lo + 1000) - lo, dim), dtype=np.float32)
        batch = []
        for i, vector in enumerate(block, start=lo):
            product = f"p{i // 2:08d}"
            category = f"Dept{(i // 2) % 7}/Cat{(i // 2) % CATEGORIES}"
            sha = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
            batch.append((product, category, f"catalog/{category}/{product}_{i % 2}.jpg", sha, vector))
        yield batch


def build(path: Path, layout: str, n: int, dim: int, seed: int) -> float:
    """A catalog in ``layout`` with raw SQL; returns the seconds the inserts took."""
    inline, without_rowid, page_size, dtype = LAYOUTS[layout]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")  # before WAL and the first table, so it sticks
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    images = OLD_IMAGES if inline else NEW_IMAGES
    vectors = OLD_MODEL_VECTORS if inline else NEW_MODEL_VECTORS.format(suffix=" WITHOUT ROWID" if without_rowid else "")
    conn.executescript(images + COMMON + vectors)
    start = time.perf_counter()
    for batch in synthetic(n, dim, seed):
        conn.execute("BEGIN")
        for product, category, source, sha, vector in batch:
            now = time.time()
            conn.execute(
                "INSERT OR IGNORE INTO products(id, title, category, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                [product, product, category, now, now],
            )
            blob = vector.astype(dtype).tobytes()
            if inline:
                conn.execute(
                    "INSERT INTO images(product_id, source, sha256, width, height, vector, created_at, updated_at) "
                    "VALUES (?, ?, ?, 640, 480, ?, ?, ?)",
                    [product, source, sha, blob, now, now],
                )
            else:
                cur = conn.execute(
                    "INSERT INTO images(product_id, source, sha256, width, height, created_at, updated_at) "
                    "VALUES (?, ?, ?, 640, 480, ?, ?)",
                    [product, source, sha, now, now],
                )
                conn.execute("INSERT INTO model_vectors(model, image_id, vector) VALUES ('base', ?, ?)", [cur.lastrowid, blob])
        conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return seconds


def build_vsearch(path: Path, n: int, dim: int, seed: int) -> float:
    """The same catalog written through vsearch.catalog.Catalog (what ingest does)."""
    from vsearch.catalog import Catalog

    catalog = Catalog.open(path)
    start = time.perf_counter()
    for batch in synthetic(n, dim, seed):
        with catalog.transaction():
            for product, category, source, sha, vector in batch:
                catalog.upsert_product(product, title=product, category=category)
                catalog.put_image(product, source, sha, 640, 480, vector)
    seconds = time.perf_counter() - start
    catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    catalog.close()
    return seconds


def cold(path: Path, fn: Callable[[], object]) -> float:
    evict(path)
    return timed(fn)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop this file's pages from the OS page cache (this file only) for a cold read."""
    for p in (path, Path(f"{path}-wal")):
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Raw:
    """The queries each layout's catalog code runs, on a raw connection."""

    def __init__(self, path: Path, layout: str) -> None:
        self.conn = connect(path)
        self.inline = LAYOUTS[layout][0]
        self.dtype = LAYOUTS[layout][3]
        if self.inline:  # the previous release's _vector_rows("base")
            self.table, self.where, self.key = "images", "vector IS NOT NULL", "id"
        else:
            self.table, self.where, self.key = "model_vectors", "model = 'base'", "image_id"

    def close(self) -> None:
        self.conn.close()

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        return np.stack([np.frombuffer(b, dtype=self.dtype) for b in blobs]).astype(np.float32, copy=False)

    def iter_vectors(self, batch: int = 4096) -> int:
        last, total = -1, 0
        while True:
            rows = self.conn.execute(
                f"SELECT {self.key}, vector FROM {self.table} WHERE {self.where} AND {self.key} > ? ORDER BY {self.key} LIMIT ?",
                [last, batch],
            ).fetchall()
            if not rows:
                return total
            total += len(self.decode([r[1] for r in rows]))
            last = rows[-1][0]

    def small_columns(self) -> int:
        rows = self.conn.execute(
            "SELECT p.category, i.id FROM images i JOIN products p ON p.id = i.product_id ORDER BY i.id"
        ).fetchall()
        self.conn.execute("SELECT count(*) FROM images").fetchone()
        return len(rows)

    def image_rows(self) -> int:
        return len(self.conn.execute("SELECT id, product_id, source, sha256, width, height FROM images ORDER BY id").fetchall())

    def sample_vectors(self, n: int, seed: int) -> np.ndarray:
        ids = [r[0] for r in self.conn.execute(f"SELECT {self.key} FROM {self.table} WHERE {self.where} ORDER BY {self.key}")]
        if len(ids) > n:
            ids = sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
        blobs: list[bytes] = []
        for lo in range(0, len(ids), 500):
            chunk = ids[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            blobs += [
                r[0]
                for r in self.conn.execute(
                    f"SELECT vector FROM {self.table} WHERE {self.where} AND {self.key} IN ({marks}) ORDER BY {self.key}",
                    chunk,
                )
            ]
        return self.decode(blobs)

    def lookups(self, queries: list[list[int]]) -> None:
        for ids in queries:
            marks = ",".join("?" * len(ids))
            products = dict(self.conn.execute(f"SELECT id, product_id FROM images WHERE id IN ({marks})", ids).fetchall())
            wanted = sorted(set(products.values()))
            self.conn.execute(f"SELECT * FROM products WHERE id IN ({','.join('?' * len(wanted))})", wanted).fetchall()

    def put_singles(self, k: int, dim: int, tag: str) -> None:
        """``k`` one-image writes, each its own commit (the API's put_product)."""
        vector = np.ones(dim, dtype=self.dtype).tobytes()
        for i in range(k):
            now = time.time()
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT INTO products(id, title, category, created_at, updated_at) VALUES (?, 'x', 'Dept1/Cat1', ?, ?)",
                [f"single{tag}{i}", now, now],
            )
            columns, marks, args = "", "", []
            if self.inline:
                columns, marks, args = ", vector", ", ?", [vector]
            cur = self.conn.execute(
                f"INSERT INTO images(product_id, source, sha256, width, height, created_at, updated_at{columns}) "
                f"VALUES (?, ?, ?, 1, 1, ?, ?{marks})",
                [f"single{tag}{i}", f"s{i}.jpg", f"{i:064x}", now, now, *args],
            )
            if not self.inline:
                self.conn.execute(
                    "INSERT INTO model_vectors(model, image_id, vector) VALUES ('base', ?, ?)", [cur.lastrowid, vector]
                )
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES('generation', '1') "
                "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
            self.conn.execute("COMMIT")

    def remove_images(self, ids: list[int]) -> None:
        self.conn.execute("BEGIN")
        for lo in range(0, len(ids), 500):
            chunk = ids[lo : lo + 500]
            self.conn.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        self.conn.execute("COMMIT")


class Real(Raw):
    """The same operations through vsearch.catalog.Catalog (the shipped code), but for
    ``lookups``, whose raw SQL keeps the Python around it out of a layout comparison."""

    def __init__(self, path: Path) -> None:
        from vsearch.catalog import Catalog

        self.catalog = Catalog.open(path)
        self.conn = self.catalog.db.conn
        self.inline, self.dtype = False, "float16"
        self.table, self.where, self.key = "model_vectors", "model = 'base'", "image_id"

    def close(self) -> None:
        self.catalog.close()

    def iter_vectors(self, batch: int = 4096) -> int:
        return sum(len(ids) for ids, _ in self.catalog.iter_vectors(batch))

    def small_columns(self) -> int:
        self.catalog.counts()
        return len(self.catalog.category_image_ids())

    def image_rows(self) -> int:
        return len(self.catalog.images_without_vectors("nothing"))  # every image row, no vector read

    def sample_vectors(self, n: int, seed: int) -> np.ndarray:
        return self.catalog.sample_vectors(n, seed)

    def put_singles(self, k: int, dim: int, tag: str) -> None:
        vector = np.ones(dim, dtype=np.float32)
        for i in range(k):
            with self.catalog.transaction():
                self.catalog.upsert_product(f"single{tag}{i}", title="x", category="Dept1/Cat1")
                self.catalog.put_image(f"single{tag}{i}", f"s{i}.jpg", f"{i:064x}", 1, 1, vector)

    def remove_images(self, ids: list[int]) -> None:
        with self.catalog.transaction():
            self.catalog.remove_images(ids)


def written_per_put(conn: sqlite3.Connection, put: Callable[[], None]) -> float:
    """Bytes ``put`` appends to the WAL (checkpointing held off meanwhile)."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    put()
    frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    conn.execute("PRAGMA wal_autocheckpoint=1000")
    return float(frames * conn.execute("PRAGMA page_size").fetchone()[0])


def measure(path: Path, ops: Raw, n: int, dim: int, repeats: int) -> dict[str, float]:
    """Warm timings are the best of ``repeats`` runs (the machine is shared); each cold
    one is a single run right after evicting the file from the page cache."""
    out: dict[str, float] = {"bytes/image": path.stat().st_size / n}
    work: dict[str, Callable[[], object]] = {
        "scan": ops.iter_vectors,
        "small": ops.small_columns,
        "meta": ops.image_rows,
        "sample": lambda: ops.sample_vectors(SAMPLE, 0),
    }
    for name, fn in work.items():
        fn()  # warm the cache
        out[f"{name} warm s"] = min(timed(fn) for _ in range(repeats))
    # What each search does after faiss: its hits' image and product rows.
    queries = [np.random.default_rng(q).choice(np.arange(1, n + 1), 100, replace=False).tolist() for q in range(LOOKUPS)]
    ops.lookups(queries[:5])
    out["lookup ms"] = min(timed(lambda: ops.lookups(queries)) for _ in range(repeats)) / LOOKUPS * 1000
    for name, fn in work.items():
        out[f"{name} cold s"] = min(cold(path, fn) for _ in range(2))
    evict(path)
    out["remove 1% s"] = timed(lambda: ops.remove_images(list(range(1, n + 1, 100))))
    # Small writes: each commit writes whole pages to the WAL, so a bigger page
    # writes more bytes for the same one-image change.
    out[f"{SINGLES} puts s"] = timed(lambda: ops.put_singles(SINGLES, dim, "a"))
    out["WAL KiB/put"] = written_per_put(ops.conn, lambda: ops.put_singles(SINGLES, dim, "b")) / SINGLES / 1024
    return out


def lookups_at_scale(root: Path, n: int, repeats: int) -> dict[int, float]:
    """ms per 100-hit search's row lookups, by page size, on ``n`` images."""
    out: dict[int, float] = {}
    now = time.time()
    for page_size in (4096, 65536):
        path = root / f"lookups-{page_size}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(NEW_IMAGES + COMMON)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO products(id, title, category, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            ((f"p{k:08d}", f"p{k:08d}", f"Dept{k % 7}/Cat{k % CATEGORIES}", now, now) for k in range((n + 1) // 2)),
        )
        conn.executemany(
            "INSERT INTO images(product_id, source, sha256, width, height, created_at, updated_at) "
            "VALUES (?, ?, ?, 640, 480, ?, ?)",
            (
                (f"p{i // 2:08d}", f"catalog/p{i // 2:08d}_{i % 2}.jpg", hashlib.sha256(str(i).encode()).hexdigest(), now, now)
                for i in range(n)
            ),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        ops = Raw.__new__(Raw)  # only lookups(), which needs just the connection
        ops.conn = connect(path)
        queries = [np.random.default_rng(q).choice(np.arange(1, n + 1), 100, replace=False).tolist() for q in range(500)]
        ops.lookups(queries)
        out[page_size] = min(timed(lambda ops=ops, queries=queries: ops.lookups(queries)) for _ in range(repeats)) / 500 * 1000
        ops.close()
        path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1752)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="warm timings: best of this many runs")
    ap.add_argument("--layouts", default=",".join([*LAYOUTS, "vsearch", "migrated"]), help="comma-separated, old first")
    ap.add_argument("--lookup-scale", type=int, default=0, help="also time search lookups on this many images (e.g. 1000000)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temporary folder, removed after)")
    args = ap.parse_args()
    n, wanted = args.images, args.layouts.split(",")
    root = Path(tempfile.mkdtemp(prefix="bench_storage_", dir=args.dir))
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, np.ndarray] = {}
    try:
        for layout in wanted:
            path = root / f"{layout}.db"
            if layout == "migrated":
                build(path, "old", n, args.dim, args.seed)
                start = time.perf_counter()
                ops: Raw = Real(path)  # opening migrates
                results[layout] = {"migrate s": time.perf_counter() - start}
            elif layout == "vsearch":
                results[layout] = {"build s": build_vsearch(path, n, args.dim, args.seed)}
                ops = Real(path)
            else:
                results[layout] = {"build s": build(path, layout, n, args.dim, args.seed)}
                ops = Raw(path, layout)
            samples[layout] = ops.sample_vectors(SAMPLE, 0)
            results[layout].update(measure(path, ops, n, args.dim, args.repeats))
            ops.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            print(f"{layout}: done", flush=True)
        scale = lookups_at_scale(root, args.lookup_scale, args.repeats) if args.lookup_scale else {}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} images, {args.dim}-dim vectors ({args.dim * 4} bytes as float32), seed {args.seed}")
    layouts = list(results)
    metrics = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"{'':14}" + "".join(f"{name:>11}" for name in layouts))
    for m in metrics:
        print(f"{m:14}" + "".join(f"{results[name][m]:>11.4g}" if m in results[name] else f"{'-':>11}" for name in layouts))
    if "old" in results:
        old = results["old"]
        print("\nratio to old, same run (< 1: smaller or faster)")
        print(f"{'':14}" + "".join(f"{name:>11}" for name in layouts if name != "old"))
        for m in metrics:
            cells = [
                results[name][m] / old[m] if old.get(m) and m in results[name] else None for name in layouts if name != "old"
            ]
            print(f"{m:14}" + "".join(f"{c:>11.3f}" if c is not None else f"{'-':>11}" for c in cells))
    if "old" in samples:
        for layout, s in samples.items():
            same = s.shape == samples["old"].shape and np.array_equal(s, samples["old"])
            if layout in LAYOUTS and layout != "old":  # Catalog's draw differs by design
                print(f"sample_vectors({SAMPLE}, seed 0) of {layout} equals old's: {same}")
    for page_size, ms in scale.items():
        print(f"lookup ms at {args.lookup_scale} images, {page_size // 1024} KiB pages: {ms:.3f}")


if __name__ == "__main__":
    main()
