"""faiss threads: one for small calls, the whole team for batches, per thread."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from vsearch import Engine
from vsearch.faissthreads import BATCH_MIN, one_thread
from vsearch.index import VectorIndex
from vsearch.query import SearchOptions

from .api_helpers import build_small_index


def test_one_thread_applies_to_the_calling_thread_only_and_is_restored() -> None:
    default = faiss.omp_get_max_threads()
    inside: list[int] = []
    seen_elsewhere: list[int] = []
    entered, checked = threading.Event(), threading.Event()

    def worker() -> None:
        with one_thread():
            inside.append(faiss.omp_get_max_threads())
            entered.set()
            checked.wait(10)
        inside.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    seen_elsewhere.append(faiss.omp_get_max_threads())
    checked.set()
    thread.join(10)
    assert inside == [1, default] and seen_elsewhere == [default]
    with one_thread(small=False):
        assert faiss.omp_get_max_threads() == default


def test_searches_use_one_thread_for_single_queries_and_the_team_for_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    search = VectorIndex.search

    def recording(self: VectorIndex, *args: object, **kwargs: object) -> object:
        threads.append(faiss.omp_get_max_threads())
        return search(self, *args, **kwargs)  # type: ignore[arg-type]

    index = build_small_index(tmp_path)  # its ingest searches too (near-duplicates): not counted
    monkeypatch.setattr(VectorIndex, "search", recording)
    with Engine.open(index) as engine:
        raw = engine.product_vector("Bakery/p04")
        engine.search_vectors(raw, SearchOptions(k=3))
        engine.search_vectors(np.repeat(raw, BATCH_MIN, axis=0), SearchOptions(k=3))
    assert threads == [1, faiss.omp_get_max_threads()]


def test_tune_blas_moves_faiss_1_15s_switch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from vsearch import faissthreads

    before = faiss.cvar.distance_compute_blas_threshold
    try:
        faiss.cvar.distance_compute_blas_threshold = 128_000  # faiss >= 1.15's default: nq * d
        faissthreads.tune_blas()
        assert faiss.cvar.distance_compute_blas_threshold == faissthreads.BLAS_FROM
        faiss.cvar.distance_compute_blas_threshold = 20  # an older faiss's (queries), or the user's own choice
        faissthreads.tune_blas()
        assert faiss.cvar.distance_compute_blas_threshold == 20
    finally:
        faiss.cvar.distance_compute_blas_threshold = before
