#!/usr/bin/env python3
"""Benchmark (not a test): the HTTP API under load, with and without micro-batching.

Builds (once, cached) an index of the real catalog images plus synthetic filler
vectors up to --vectors, starts `vsearch serve` on loopback, and for each client
count runs that many concurrent clients uploading real photos for --seconds each.
Prints requests/s and p50/p95/p99 latency, and the throughput ratio batching on/off.

    python scripts/bench_api.py --catalog ../shared/datasets/grocery-store/dataset/iconic-images-and-descriptions \
        --photos ../shared/datasets/grocery-store/dataset/val --vectors 100000
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np


def build_index(index: Path, catalog: Path, vectors: int, model: str) -> None:
    from vsearch import Engine
    from vsearch.sources import Item
    from vsearch.writer import NewImage

    if (index / "manifest.json").exists():
        with Engine.open(index) as engine:
            if engine.info()["vectors"] >= vectors:
                return
    with Engine.open(index, model=model, create=True) as engine:
        engine.ingest(catalog, quiet=True)
        have = engine.catalog.counts()["images"]
        rng = np.random.default_rng(0)
        # Filler products: real raw vectors plus noise, so they sit in the same region of space.
        real = engine.catalog.sample_vectors(1000)
        raw_dim = real.shape[1]
        with engine.writer() as writer:  # the write path, as every mutation goes
            for start in range(have, vectors, 5000):
                n = min(5000, vectors - start)
                base = real[rng.integers(0, len(real), n)] + 0.05 * rng.standard_normal((n, raw_dim)).astype(np.float32)
                pids = [f"filler-{start + i}" for i in range(n)]
                cats = [f"Filler/F{(start + i) % 100}" for i in range(n)]
                writer.upsert_products([Item(pid, f"synthetic:{pid}", cat, pid) for pid, cat in zip(pids, cats)])
                images = [NewImage(pid, f"synthetic:{pid}", f"{start + i:064x}", 1, 1) for i, pid in enumerate(pids)]
                writer.add_images(images, base / np.linalg.norm(base, axis=1, keepdims=True))
        engine.fit_projection()


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            body, ctype = bodies[rnd.randrange(len(bodies))]
            start = time.perf_counter()
            conn.request("POST", "/v1/search?k=10", body=body, headers={"Content-Type": ctype})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }


def serve(index: Path, batching: bool) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, "-m", "vsearch", "serve", "--index", str(index), "--port", str(port)]
    cmd += ["--batch-max", "16" if batching else "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path("../shared/datasets/grocery-store/dataset")
    parser.add_argument("--catalog", type=Path, default=data / "iconic-images-and-descriptions")
    parser.add_argument("--photos", type=Path, default=data / "val")
    parser.add_argument("--index", type=Path, default=Path("artifacts/bench-api-index"))
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    photos = sorted(args.photos.rglob("*.jpg"))[:200]
    if not photos:
        print(f"no photos under {args.photos}; pass --photos", file=sys.stderr)
        return 1
    build_index(args.index, args.catalog, args.vectors, args.model)
    bodies = [multipart(p) for p in photos]
    results: dict[tuple[bool, int], dict[str, float]] = {}
    for batching in (True, False):
        proc, port = serve(args.index, batching)
        try:
            load(port, bodies, 1, 2)  # warm-up
            for clients in args.clients:
                results[(batching, clients)] = load(port, bodies, clients, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(f"[api] index {args.index}: {args.vectors} vectors, model {args.model}, {args.seconds:.0f} s per run")
    print(f"  {'batching':<9} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for (batching, clients), r in results.items():
        print(
            f"  {'on' if batching else 'off':<9} {clients:>7} {r['rps']:>7.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
            f"{r['p99']:>8.1f} {r['errors']:>6}"
        )
    for clients in args.clients:
        ratio = results[(True, clients)]["rps"] / results[(False, clients)]["rps"]
        print(f"  throughput with batching / without, {clients} clients: {ratio:.2f}x")
    print(json.dumps({f"{'on' if b else 'off'}-{c}": r for (b, c), r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
