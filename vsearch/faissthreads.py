"""How many OpenMP threads a faiss call may use.

faiss parallelises one call over its team of OpenMP threads. For one query, or a
small change, that team costs more than it gains on a busy machine: a batch-1 flat
search of 200k vectors took 40 ms with faiss's default team on 2 busy cores and
7.5 ms on one thread (IVF batch-1 searches run on one thread either way); adding one
vector to a 300k IVF index took 10 ms against 0.07 ms. A server's parallelism comes
from its concurrent requests, so small calls run on one thread and big batches get
the team. The setting is per calling thread (an OpenMP ICV of the thread that sets
it), so it never changes what other threads' calls use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss

__all__ = ["BATCH_MIN", "one_thread"]

BATCH_MIN = 32  # queries (or vectors added) in one call before it gets faiss's whole team


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
