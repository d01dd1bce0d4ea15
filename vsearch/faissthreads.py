"""How many OpenMP threads a faiss call may use.

faiss parallelises one call over its team of OpenMP threads. For one query, or a
small change, that team costs more than it gains on a busy machine: a batch-1 flat
search of 200k vectors took 40 ms with faiss's default team on 2 busy cores and
7.5 ms on one thread (IVF batch-1 searches run on one thread either way); adding one
vector to a 300k IVF index took 10 ms against 0.07 ms. A server's parallelism comes
from its concurrent requests, so small calls run on one thread and big batches get
the team. The setting is per calling thread (an OpenMP ICV of the thread that sets
it), so it never changes what other threads' calls use.

faiss 1.15 computes a flat search's distances with BLAS only once the queries hold
128,000 numbers (``nq * d``; 20 queries before), tuned for many-core machines. On few
threads BLAS wins far sooner: at 100k vectors of 256 numbers on one thread, 32
queries took 149 ms without it and 27 ms with it, 4 queries 19 and 13 ms, while one
query stays faster without (5 against 13 ms). :func:`tune_blas` moves the switch to
2,048 numbers (8 such queries: 38 against 12 ms on one thread, 17 against 12 on two),
past the crossover, ~1,024, so a single query of up to 2,047 numbers keeps the
faster path (faiss PR #5109 measured the crossover at ~640-1,280 on one thread). It
is process-wide: another user of faiss in the same process sees it too.

numpy brings its own OpenBLAS, whose threads spin for a while after each product of
matrices: a projection of 32 vectors right before a batched faiss search on faiss's
whole team left them competing for both cores and took the search from 15 to ~110
ms (100k vectors). A search on one thread is not slowed (the spinning takes the
other core), so batches of a background task stay below BATCH_MIN.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss

__all__ = ["BATCH_MIN", "BLAS_FROM", "one_thread", "tune_blas"]

BATCH_MIN = 32  # queries (or vectors added) in one call before it gets faiss's whole team
BLAS_FROM = 2048  # numbers in a flat search's queries (nq * d) from which faiss uses BLAS
_NQ_TIMES_D = 128_000  # faiss >= 1.15's default, which compares nq * d (before: nq, default 20)


def tune_blas() -> None:
    """Let a flat search use BLAS from BLAS_FROM query numbers on (process-wide; a
    faiss older than 1.15, whose threshold counts queries, is left alone)."""
    if faiss.cvar.distance_compute_blas_threshold == _NQ_TIMES_D:
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM


@contextmanager
def one_thread(small: bool = True) -> Iterator[None]:
    """Run the faiss calls inside on one OpenMP thread if ``small``."""
    if not small:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
