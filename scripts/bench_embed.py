#!/usr/bin/env python3
"""Benchmark (not a test): the ingest path against the model forward alone, and
filtered against unfiltered search.

1. images/s of ``Engine.ingest`` (files on disk -> decode in workers -> forward ->
   catalog -> index) against the forward alone on pre-made tensors at the same batch
   size, measured in the same run; printed as a ratio (target >= 0.85).
2. The forward with and without the glibc malloc tuning of vsearch/malloc.py, each in
   a fresh process, and whether their outputs are bit-identical.
3. Search latency on a synthetic 1M-vector index: a query filtered to a 1% category
   against an unfiltered one (target: filtered <= 5% of unfiltered).

    python scripts/bench_embed.py --images ../shared/datasets/grocery-store/dataset/train --n 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def forward_only(model: str, batch: int, n: int) -> tuple[float, str]:
    import torch

    from vsearch.embed import Embedder
    from vsearch.presets import resolve_model

    embedder = Embedder(resolve_model(model), device="cpu")
    size = embedder.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    embedder.embed_tensor(x)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n:
        out = embedder.embed_tensor(x)
        done += batch
    return done / (time.perf_counter() - start), hashlib.sha256(out.tobytes()).hexdigest()


def ingest_path(model: str, batch: int, images: list[Path], workers: int | None) -> float:
    from vsearch.engine import Engine
    from vsearch.sources import Item

    items = [Item(product_id=str(i), image=str(p)) for i, p in enumerate(images)]
    with tempfile.TemporaryDirectory() as tmp, Engine.open(Path(tmp) / "i", model=model, create=True) as engine:
        engine.snapshot.embedder.get()  # load the model outside the timed region, as forward_only does
        start = time.perf_counter()
        report = engine.ingest(items, batch_size=batch, workers=workers, quiet=True)
        elapsed = time.perf_counter() - start
    return report.embedded / elapsed


def filtered_search(n: int, d: int, reps: int) -> tuple[float, float]:
    from vsearch.categories import BlockCache
    from vsearch.index import VectorIndex
    from vsearch.projection import l2_normalize

    rng = np.random.default_rng(0)
    index = VectorIndex.create("IDMap2,Flat", d)
    ids = np.arange(n, dtype=np.int64)
    for start in range(0, n, 100_000):
        index.add(
            ids[start : start + 100_000], l2_normalize(rng.standard_normal((min(100_000, n - start), d)).astype(np.float32))
        )
    category = {"one-percent": np.sort(rng.choice(ids, n // 100, replace=False))}
    xq = l2_normalize(rng.standard_normal((1, d)).astype(np.float32))
    cache = BlockCache()  # as a served snapshot's category filter keeps one
    index.search(xq, 10, category, cache)  # the first filtered query reconstructs and caches the block

    def timed(fn: object) -> float:
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            samples.append(time.perf_counter() - start)
        return float(np.median(samples)) * 1000

    return timed(lambda: index.search(xq, 10)), timed(lambda: index.search(xq, 10, category, cache))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("../shared/datasets/grocery-store/dataset/train"))
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=256, help="images per measurement")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.forward_only:  # child process for the malloc comparison
        rate, digest = forward_only(args.model, args.batch, args.n)
        print(json.dumps({"rate": rate, "digest": digest}))
        return 0

    from vsearch.embed import default_workers, pick_device

    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.n]
    if not images:
        print(f"no images under {args.images}; pass --images", file=sys.stderr)
        return 1
    forward, _ = forward_only(args.model, args.batch, len(images))
    ingest = ingest_path(args.model, args.batch, images, args.workers)
    print(f"[ingest] model={args.model} batch={args.batch} images={len(images)}")
    print(f"  forward alone      {forward:8.1f} images/s")
    print(f"  whole ingest path  {ingest:8.1f} images/s")
    print(f"  ratio              {ingest / forward:8.2f}   (target >= 0.85)")

    child = [sys.executable, __file__, "--forward-only", "--model", args.model, "--batch", str(args.batch), "--n", str(args.n)]
    tuned = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    off = {**os.environ, "VSEARCH_MALLOC_TUNING": "0"}
    plain = json.loads(subprocess.run(child, capture_output=True, text=True, check=True, env=off).stdout)
    print("[malloc] forward, fresh process each")
    print(f"  glibc defaults     {plain['rate']:8.1f} images/s")
    print(f"  tuned              {tuned['rate']:8.1f} images/s")
    print(f"  speed-up           {tuned['rate'] / plain['rate']:8.2f}x   identical output: {tuned['digest'] == plain['digest']}")
    print(f"[workers] ingest defaults to {default_workers(pick_device(None))} decoding processes on this machine")

    unfiltered, filtered = filtered_search(args.vectors, args.dim, reps=20)
    print(f"[filter] {args.vectors} vectors x {args.dim}d, IDMap2,Flat, k=10, median of 20")
    print(f"  unfiltered         {unfiltered:8.2f} ms")
    print(f"  1% category        {filtered:8.2f} ms")
    print(f"  ratio              {filtered / unfiltered:8.3f}   (target <= 0.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
