"""How big an index to build and how far to probe it.

``choose_factory`` keeps nlist within what the catalog can train (faiss wants >= 39
training points per list); :meth:`vsearch.index.VectorIndex.train_size` says how many
points to train on; :func:`tune_nprobe` picks the smallest nprobe whose recall@10
against an exact search reaches a target, which the index file keeps (faiss saves
nprobe with an IVF index) and :class:`IndexTuning` records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .errors import ConfigError
from .ivflists import ivf_of
from .topk import recall_at_k

if TYPE_CHECKING:  # for annotations only: vsearch.index imports this module
    from .index import VectorIndex

__all__ = ["FLAT_MAX", "IndexTuning", "choose_factory", "ivf_nlist", "tune_nprobe"]

FLAT_MAX = 100_000
TRAIN_PER_LIST = 64  # what train_size asks for (faiss subsamples past 256 per centroid)
TRAIN_BASE = 100_000  # ... and at least this many, where the catalog has them


def choose_factory(n: int, d: int) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d``.

    Exact search while it is cheap; past FLAT_MAX, IVF with 8-bit scalar quantisation,
    nlist ~ 4 sqrt(n) (the faiss rule of thumb), at every size. Not IVF-PQ: on
    clustered data (``scripts/bench_filtered.py --factories``) PQ codes of d/4 bytes
    reach recall@10 0.61-0.67 at any nprobe, and re-ranked from SQ8 codes they reach
    0.95-0.98 but hold d/4 + d bytes a vector, more than SQ8 alone (d bytes, 0.98);
    faiss's IndexRefine cannot hold catalog ids anyway (no add_with_ids or remove_ids,
    and its labels must be below ntotal).
    """
    if n < 0 or d <= 0:
        raise ConfigError(f"bad index size n={n}, d={d}")
    if n <= FLAT_MAX:
        return "IDMap2,Flat"
    return f"IVF{ivf_nlist(n)},SQ8"


def ivf_nlist(n: int) -> int:
    """nlist for ``n`` vectors: the power of two nearest 4 sqrt(n), lowered until the
    catalog holds TRAIN_PER_LIST training points per list (at least 1)."""
    nlist = 1 << max(round(math.log2(4 * math.sqrt(max(n, 1)))), 0)
    while nlist > 1 and nlist * TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


@dataclass(frozen=True)
class IndexTuning:
    """How :meth:`VectorIndex.tune` set an IVF index's nprobe: the smallest whose
    recall@10 on ``queries`` of its own vectors reached ``target`` (or, where none does,
    99% of what the exhaustive search reaches), ``recall_at_10`` at it, measured with
    ``vectors`` indexed; against an exact search of the vectors (``exact``) or, without
    them, of the index's own codes."""

    nprobe: int
    recall_at_10: float
    vectors: int
    queries: int
    target: float
    exact: bool = True


def tune_nprobe(
    index: VectorIndex, xq: np.ndarray, target: float = 0.95, k: int = 10, truth: np.ndarray | None = None
) -> tuple[int, float]:
    """The smallest nprobe whose recall@k reaches ``target``, and that recall.

    ``xq`` are queries drawn from the indexed vectors (e.g. 200 of them), each one's own
    vector its first hit, left out on both sides. ``truth``: each query's k nearest
    others by an exact search of the indexed vectors (:class:`ExactTopK`);
    without it, the exhaustive search of the index's own codes (nprobe = nlist), which
    hides what quantisation loses. Where no nprobe reaches ``target``, the target is 99%
    of the exhaustive search's recall. Searched at powers of two, then bisected. Leaves
    nprobe as it found it.
    """
    ivf = ivf_of(index.index)
    if ivf is None or index.ntotal == 0 or len(xq) == 0:
        return index.nprobe, 1.0
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    kk = min(k + 1, index.ntotal)
    nlist = int(ivf.nlist)

    def measure(nprobe: int) -> np.ndarray:
        params = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
        return np.asarray(index.index.search(xq, kk, params=params)[1])

    others = measure(nlist)[:, 1:] if truth is None else truth  # the query itself comes first
    seen: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in seen:  # k true others in k+1 slots (one is the query)
            seen[nprobe] = 1.0 if truth is None and nprobe == nlist else recall_at_k(measure(nprobe), others, kk)
        return seen[nprobe]

    nprobe = _smallest_reaching(recall, target, nlist)
    if nprobe is None:
        nprobe = _smallest_reaching(recall, 0.99 * recall(nlist), nlist)
        assert nprobe is not None
    return nprobe, recall(nprobe)


def _smallest_reaching(recall: Callable[[int], float], target: float, nlist: int) -> int | None:
    """The smallest nprobe in [1, nlist] with recall(nprobe) >= target (recall grows with
    nprobe): powers of two, then bisection; None if nlist falls short."""
    low, high = 0, 1
    while recall(min(high, nlist)) < target:
        if high >= nlist:
            return None
        low, high = high, high * 2
    high = min(high, nlist)
    while high - low > 1:
        mid = (low + high) // 2
        if recall(mid) >= target:
            high = mid
        else:
            low = mid
    return high
