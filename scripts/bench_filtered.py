"""Filtered IVF search against raw faiss (a benchmark, not a test; no catalog).

Builds the IVF index ``choose_factory`` picks for N synthetic 64-d vectors (the one it
picks past FLAT_MAX where N is smaller; a Gaussian mixture, catalog-like ids with
gaps), tunes its nprobe as ``build_index`` does (recall@10 >= 0.95 against exact
search), then
for filters allowing 1%, 10% and 50% of the ids, drawn at random (one block) and as
whole clusters (one block per cluster, as categories are), times one query at a time:

- engine: ``VectorIndex.search(xq, 10, blocks, cache)``, whatever path it takes;
- raw: faiss's own filtered search, ``SearchParametersIVF(sel=IDSelectorBitmap, nprobe)``
  with the selector built once, at the tuned nprobe; and raw@0.95, at the smallest
  power-of-two multiple of it whose recall@10 reaches 0.95 (where one does);

and prints each one's recall@10 against numpy's exact search over the allowed vectors,
the latency ratios engine / raw (medians of interleaved single queries), the paths
the engine took, and the cost of one write (replace one vector) and of the first
filtered search after it.

    python scripts/bench_filtered.py                       # 100k and 1M
    python scripts/bench_filtered.py --sizes 100000 --queries 100
    python scripts/bench_filtered.py --cache DIR           # keep built indexes in DIR

``--factories`` compares instead what the largest catalogs could use (why
``choose_factory`` never returns IVF-PQ): recall@10 against exact search and bytes a
vector (the saved index, ids and direct map included) of IVF-SQ8/6/4, IVF-PQ and
IVF-PQ re-ranked by faiss's IndexRefine, on N vectors of the same mixture:

    python scripts/bench_filtered.py --factories --sizes 200000 --dim 64
    python scripts/bench_filtered.py --factories --sizes 200000 --dim 256
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

import vsearch.filtered
from vsearch.categories import BlockCache
from vsearch.index import VectorIndex
from vsearch.projection import l2_normalize
from vsearch.sizing import FLAT_MAX, choose_factory, ivf_nlist
from vsearch.topk import recall_at_k

K = 10
CLUSTERS = 1000


def mixture(n: int, dim: int, seed: int, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + rng.normal(scale=0.1, size=(n, dim)).astype(np.float32)
    return l2_normalize(x.astype(np.float32)), labels


def dataset(n: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectors, their ids (1-based, ~10% gaps as deletions leave), clusters, and queries."""
    rng = np.random.default_rng(0)
    centers = l2_normalize(rng.standard_normal((CLUSTERS, dim)).astype(np.float32))
    parts, labels = [], []
    for start in range(0, n, 200_000):
        x, lab = mixture(min(200_000, n - start), dim, 1 + start, centers)
        parts.append(x)
        labels.append(lab)
    ids = 1 + np.arange(n, dtype=np.int64) + np.arange(n, dtype=np.int64) // 9
    xq, _ = mixture(1000, dim, 7, centers)
    return np.concatenate(parts), ids, np.concatenate(labels), xq


def ivf_factory(n: int, dim: int) -> str:
    """choose_factory's, or where that is exact (n <= FLAT_MAX) the IVF one it would pick past it."""
    factory = choose_factory(n, dim)
    return factory if factory.startswith("IVF") else re.sub(r"^IVF\d+", f"IVF{ivf_nlist(n)}", choose_factory(FLAT_MAX + 1, dim))


def build(xb: np.ndarray, ids: np.ndarray, factory: str, cache: Path | None) -> tuple[VectorIndex, float]:
    n, dim = xb.shape
    path = cache / f"{n}x{dim}-{factory.replace(',', '_')}.faiss" if cache is not None else None
    if path is not None and path.exists():
        return VectorIndex.load(path, factory), 0.0
    start = time.perf_counter()
    index = VectorIndex.create(factory, dim)
    rng = np.random.default_rng(1)
    if not index.is_trained:
        index.train(xb[rng.choice(n, min(n, index.train_size()), replace=False)])
    for lo in range(0, n, 100_000):
        index.add(ids[lo : lo + 100_000], xb[lo : lo + 100_000], new=True)
    sample = xb[rng.choice(n, 200, replace=False)]  # tuned as build_index does: against exact neighbours
    index.tune(sample, truth=ids[faiss.knn(sample, xb, K + 1, metric=faiss.METRIC_INNER_PRODUCT)[1]][:, 1:])
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        index.save(path)
    return index, seconds


def exact(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ids[faiss.knn(xq, xb, K, metric=faiss.METRIC_INNER_PRODUCT)[1]]


def filters(ids: np.ndarray, labels: np.ndarray, share: float) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(int(share * 1000))
    random_ids = np.sort(rng.choice(ids, max(1, round(share * len(ids))), replace=False))
    clusters = rng.permutation(CLUSTERS)[: max(1, round(share * CLUSTERS))]
    blocks = {f"c{c}": np.sort(ids[labels == c]) for c in clusters}
    return {"random": {"random": random_ids}, "clusters": blocks}


def bitmap_selector(allowed: np.ndarray) -> faiss.IDSelector:
    bits = np.zeros(int(allowed.max()) + 1, dtype=bool)
    bits[allowed] = True
    return faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))


def timed(fn: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, I = fn()
    return time.perf_counter() - start, I


def compare(index: VectorIndex, xq: np.ndarray, blocks: dict[str, np.ndarray], truth: np.ndarray) -> str:
    """Engine vs raw faiss (tuned nprobe, and the nprobe reaching 0.95), one query at a time."""
    raw, nlist = index.index, index.nlist
    sel = bitmap_selector(np.concatenate(list(blocks.values())))

    def raw_search(q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)  # type: ignore[call-arg]
        return raw.search(q, K, params=params)

    probes = index.nprobe
    while probes < nlist and recall_at_k(raw_search(xq, probes)[1], truth, K) < 0.95:
        probes = min(2 * probes, nlist)
    cache = BlockCache()
    before = index.paths.copy()
    first, _ = timed(lambda: index.search(xq[:1], K, blocks, cache))  # builds what the filter needs
    t_eng, t_raw, t_95, found_eng, found_raw = [], [], [], [], []
    for q in range(len(xq)):
        row = xq[q : q + 1]
        t, I = timed(lambda: index.search(row, K, blocks, cache))  # noqa: B023 - called at once
        t_eng.append(t)
        found_eng.append(I)
        t, I = timed(lambda: raw_search(row, index.nprobe))  # noqa: B023
        t_raw.append(t)
        found_raw.append(I)
        t_95.append(timed(lambda: raw_search(row, probes))[0])  # noqa: B023
    paths = dict(index.paths - before)
    r_eng = recall_at_k(np.concatenate(found_eng), truth, K)
    r_raw = recall_at_k(np.concatenate(found_raw), truth, K)
    e, r, r95 = (1000 * float(np.median(t)) for t in (t_eng, t_raw, t_95))
    return (
        f"engine {e:6.3f} ms r {r_eng:.3f} (first {1000 * first:6.1f} ms) | raw@{index.nprobe} {r:6.3f} ms r {r_raw:.3f} "
        f"| raw@{probes} {r95:6.3f} ms | engine/raw {e / r:5.1f}x engine/raw@0.95 {e / r95:5.1f}x | {paths}"
    )


def writes(index: VectorIndex, xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, blocks: dict[str, np.ndarray], n: int) -> str:
    """Replace one vector ``n`` times, each followed by one filtered search."""
    rng = np.random.default_rng(5)
    cache = BlockCache()
    index.search(xq[:1], K, blocks, cache)
    steady = [timed(lambda: index.search(xq[q : q + 1], K, blocks, cache))[0] for q in range(20)]  # noqa: B023
    t_write, t_after = [], []
    for w in range(n):
        pos = int(rng.integers(len(ids)))
        start = time.perf_counter()
        index.add(ids[pos : pos + 1], xb[pos : pos + 1])
        t_write.append(time.perf_counter() - start)
        t_after.append(timed(lambda: index.search(xq[w : w + 1], K, blocks, cache))[0])  # noqa: B023
    w_ms, a_ms, s_ms = (1000 * float(np.median(t)) for t in (t_write, t_after, steady))
    return f"write (replace 1) {w_ms:.3f} ms, then a 50% filtered search {a_ms:.3f} ms (steady {s_ms:.3f} ms)"


def factories(n: int, dim: int) -> None:
    """Recall@10 and bytes a vector of the candidates for the largest catalogs.

    IndexRefine cannot hold catalog ids (no add_with_ids, labels must be < ntotal),
    so these are built with faiss's sequential ids: the recall is what the codes give."""
    xb, _, _, xq_all = dataset(n, dim)
    xq = xq_all[:500]
    truth = faiss.knn(xq, xb, K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    nlist, m = ivf_nlist(n), dim // 4
    train = xb[np.random.default_rng(1).choice(n, min(n, 64 * max(nlist, 256)), replace=False)]
    candidates = [f"IVF{nlist},SQ8", f"IVF{nlist},SQ6", f"IVF{nlist},SQ4", f"IVF{nlist},PQ{m}x8", f"IVF{nlist},PQ{2 * m}x8"]
    candidates += [f"IVF{nlist},PQ{m}x8,Refine(SQ8)", f"IVF{nlist},PQ{m}x8,Refine(SQ6)", f"IVF{nlist},PQ{m}x8,RFlat"]
    print(f"{n} x {dim}, 500 queries: recall@10 against exact search at nprobe 16 / 64 (k_factor 4 / 8 re-ranked)")
    for factory in candidates:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # as VectorIndex keeps it
        index.train(train)
        index.add(xb)
        size = faiss.serialize_index(index).nbytes / n
        cells = []
        for k_factor in (4, 8) if "R" in factory.split(",")[-1] else (1,):
            for nprobe in (16, 64):
                params: faiss.SearchParameters = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
                if k_factor > 1:
                    params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=params)  # type: ignore[call-arg]
                found = index.search(xq, K, params=params)[1]
                label = f"kf{k_factor} " if k_factor > 1 else ""
                cells.append(f"{label}nprobe {nprobe}: {recall_at_k(found, truth, K):.3f}")
        print(f"  {factory:32s} {size:6.1f} B/vector | " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--factories", action="store_true", help="compare factories for the largest catalogs instead")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads (1: a fair ratio on a busy machine)")
    parser.add_argument("--factory", default=None, help="faiss factory (default: choose_factory's IVF one, even at 100k)")
    parser.add_argument("--near-lists", type=float, default=None, help="override vsearch.filtered.FILTER_NEAR_LISTS")
    parser.add_argument("--far-lists", type=float, default=None, help="override vsearch.filtered.FILTER_FAR_LISTS")
    parser.add_argument("--cache", type=Path, default=None, help="keep built indexes here and reuse them")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    if args.near_lists is not None:
        vsearch.filtered.FILTER_NEAR_LISTS = args.near_lists
    if args.far_lists is not None:
        vsearch.filtered.FILTER_FAR_LISTS = args.far_lists
    for n in args.sizes:
        if args.factories:
            factories(n, args.dim)
            continue
        xb, ids, labels, xq_all = dataset(n, args.dim)
        index, seconds = build(xb, ids, args.factory or ivf_factory(n, args.dim), args.cache)
        xq = xq_all[: args.queries]
        unfiltered = recall_at_k(index.search(xq, K)[1], exact(xq, xb, ids), K)
        print(
            f"{n} x {args.dim}: {index.factory}, nprobe {index.nprobe}/{index.nlist}, unfiltered recall@10 {unfiltered:.3f} "
            f"(built in {seconds:.0f} s; tuning {index.tuning})",
            flush=True,
        )
        for share in args.shares:
            for kind, blocks in filters(ids, labels, share).items():
                allowed = np.concatenate(list(blocks.values()))
                mask = np.isin(ids, allowed)
                truth = exact(xq, xb[mask], ids[mask])
                print(f"  {share:4.0%} {kind:8s}: {compare(index, xq, blocks, truth)}", flush=True)
        half = filters(ids, labels, 0.5)["clusters"]
        print(f"  {writes(index, xb, ids, xq, half, args.writes)}", flush=True)
        del index, xb


if __name__ == "__main__":
    main()
