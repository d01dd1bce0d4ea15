#!/usr/bin/env python3
"""What keeping near-duplicate links and variant groups costs a write, by catalog size
(a benchmark, not a test; issue 12 part 4).

For each size N it builds an index of N synthetic products (one image each, through
the engine's own write path, ``IndexWriter.add_images``, with the tiny test model's
vector length; no model runs): vectors drawn around 1,000 cluster centres (two
products of one cluster have cosine ~0.8, never a near-duplicate) and random 64-bit
pHashes with 32 bits set. Then, in the same run:

- ``backlog ms/img``: linking the N images stored before there was an index (one
  k-NN search each, batched), as the first ingest's end does;
- ``write ms``: the median of WRITES single-product writes, half of them a
  near-copy of an existing product (cosine ~0.999, pHash 2 bits off: it joins a
  variant group), against the same writes with linking switched off: the ratio is
  what linking adds to a write;
- ``remove ms``: the median removal of a grouped product (its group is recomputed and
  its images linked again), against a removal with linking and regrouping off.

    python scripts/bench_variants.py --work /tmp/varbench --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

from vsearch import Engine, linking, refit, variants
from vsearch.sources import Item
from vsearch.writer import NewImage

WRITES = 200
BATCH = 4096


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_phash(rng: np.random.Generator) -> int:
    bits = np.zeros(64, dtype=np.uint8)
    bits[rng.choice(64, 32, replace=False)] = 1
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image(n: int, rng: np.random.Generator, phash: int | None = None) -> tuple[Item, NewImage]:
    pid, source = f"p{n:08d}", f"synthetic://{n}"
    sha = hashlib.sha256(source.encode()).hexdigest()
    return Item(pid, source, category="Synthetic"), NewImage(pid, source, sha, 1, 1, phash if phash else random_phash(rng))


def build(root: Path, n: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> tuple[Engine, float]:
    """An index of ``n`` synthetic products; the backlog link time per image (ms)."""
    engine = Engine.open(root, model="tiny-test", create=True)
    with engine.writer() as writer:
        for start in range(0, n, BATCH):
            m = min(BATCH, n - start)
            noise = rng.standard_normal((m, dim)) * 0.5 / np.sqrt(dim)
            vectors = unit(centres[rng.integers(0, len(centres), m)] + noise)
            rows = [image(start + i, rng) for i in range(m)]
            writer.add_images([r[1] for r in rows], vectors, products=[r[0] for r in rows])
    refit._fit_projection(engine, None)  # the first build, without the linking fit_projection ends with
    with engine.writer() as writer:
        start_link = time.perf_counter()
        writer.link_pending()
        backlog = (time.perf_counter() - start_link) * 1000 / n
    return engine, backlog


def timed_writes(engine: Engine, first: int, rng: np.random.Generator, dim: int, link: bool) -> tuple[list[float], list[str]]:
    """WRITES single-product writes, every other one a near-copy of an existing image."""
    original = linking.link_pending
    if not link:
        linking.link_pending = lambda *args, **kwargs: -1  # type: ignore[assignment]
    times, copies = [], []
    try:
        total = engine.catalog.counts()["images"]
        for w in range(WRITES):
            n = first + w
            if w % 2:
                target = int(rng.integers(1, total + 1))
                ids, raw = engine.catalog.vectors_by_id([target], engine.active)
                phash = variants.from_signed(
                    engine.catalog.db.execute("SELECT phash FROM images WHERE id = ?", [target]).fetchone()[0]
                )
                flipped = phash ^ (1 << int(rng.integers(0, 64))) ^ (1 << int(rng.integers(0, 64))) if phash else None
                vector = unit(raw[0] + rng.standard_normal(dim) * 0.05 / np.sqrt(dim))[None]
                item, new = image(n, rng, flipped)
                copies.append(item.product_id)
            else:
                vector = unit(rng.standard_normal((1, dim)))
                item, new = image(n, rng)
            start = time.perf_counter()
            with engine.writer() as writer:
                writer.add_images([new], vector, products=[item])
            times.append((time.perf_counter() - start) * 1000)
    finally:
        linking.link_pending = original  # type: ignore[assignment]
    return times, copies


def timed_removals(engine: Engine, products: list[str], regroup: bool) -> list[float]:
    original_settle, original_link = variants.settle, linking.link_pending
    if not regroup:
        variants.settle = lambda conn: []  # type: ignore[assignment]
        linking.link_pending = lambda *args, **kwargs: -1  # type: ignore[assignment]
    times = []
    try:
        for pid in products:
            start = time.perf_counter()
            engine.remove_products([pid])
            times.append((time.perf_counter() - start) * 1000)
    finally:
        variants.settle, linking.link_pending = original_settle, original_link  # type: ignore[assignment]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from vsearch.embed import raw_dim
    from vsearch.presets import resolve_model

    dim = raw_dim(resolve_model("tiny-test"))
    head = f"{'N':>9} {'backlog ms/img':>15} {'write ms':>9} {'no-link ms':>11} {'x':>5}"
    print(f"{head} {'remove ms':>10} {'no-regroup':>11} {'x':>5} {'groups':>7}")
    out = []
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        centres = unit(rng.standard_normal((1000, dim)))
        root = args.work / f"n{n}"
        if root.exists():
            import shutil

            shutil.rmtree(root)
        engine, backlog = build(root, n, dim, centres, rng)
        try:
            off, _ = timed_writes(engine, n, rng, dim, link=False)
            on, copies = timed_writes(engine, n + WRITES, rng, dim, link=True)
            grouped = [p for p in copies if variants.groups_of(engine.catalog.read, [p])]
            half = len(grouped) // 2
            removed_on = timed_removals(engine, grouped[:half], regroup=True)
            removed_off = timed_removals(engine, grouped[half:], regroup=False)
            groups = engine.catalog.db.execute("SELECT count(DISTINCT group_id) FROM variant_groups").fetchone()[0]
        finally:
            engine.close()
        row = {
            "n": n,
            "backlog_ms_per_image": backlog,
            "write_ms": statistics.median(on),
            "write_ms_no_link": statistics.median(off),
            "remove_ms": statistics.median(removed_on) if removed_on else None,
            "remove_ms_no_regroup": statistics.median(removed_off) if removed_off else None,
            "copies_grouped": f"{len(grouped)}/{len(copies)}",
            "groups_left": groups,
        }
        out.append(row)
        ratio_w = row["write_ms"] / row["write_ms_no_link"]
        ratio_r = (row["remove_ms"] or 0) / (row["remove_ms_no_regroup"] or 1)
        print(
            f"{n:>9} {backlog:>15.3f} {row['write_ms']:>9.2f} {row['write_ms_no_link']:>11.2f} {ratio_w:>5.2f} "
            f"{row['remove_ms'] or 0:>10.2f} {row['remove_ms_no_regroup'] or 0:>11.2f} {ratio_r:>5.2f} {groups:>7}  "
            f"(copies grouped {row['copies_grouped']})",
            flush=True,
        )
    (args.work / "variants.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
