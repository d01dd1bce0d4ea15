"""Prometheus metrics for the API: requests and latency per route, index size,
embedding batch sizes, and which path each searched query row took through the
index. One registry per app, so tests and apps do not collide."""

from __future__ import annotations

import threading
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .index import SEARCH_PATHS, VectorIndex

__all__ = ["Metrics", "CONTENT_TYPE", "SearchPaths"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """``index_size``: the served index's vector count. ``index``: the served
    :class:`~vsearch.index.VectorIndex` (None while there is none), whose
    ``paths`` become ``vsearch_search_path_total{path=...}``."""

    def __init__(self, index_size: Callable[[], float], index: Callable[[], VectorIndex | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vsearch_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "vsearch_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.embed_batch = Histogram(
            "vsearch_embed_batch_size", "Images per model forward", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        index_vectors = Gauge("vsearch_index_vectors", "Vectors in the index", registry=self.registry)
        index_vectors.set_function(index_size)
        if index is not None:
            self.registry.register(SearchPaths(index))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SearchPaths(Collector):
    """``vsearch_search_path_total{path}``: query rows by the path
    :meth:`VectorIndex.search` took (``all``: unfiltered; the others are filtered:
    ``exact``, ``selector``, ``selector_more``, ``exact_fallback``, ``empty``).

    Each served index counts its own (``VectorIndex.paths``); a rebuild or model switch
    serves a new one, counting from zero. So that the counter never goes down, what an
    index counted is kept when it is replaced: all of it if it is still alive at the
    next scrape (it is held weakly, never kept alive for this), else what the last
    scrape saw of it."""

    def __init__(self, index: Callable[[], VectorIndex | None]) -> None:
        self._index = index
        self._lock = threading.Lock()
        self._retired: Tally[str] = Tally()
        self._current: weakref.ref[VectorIndex] | None = None
        self._seen: Tally[str] = Tally()  # the current index's counts at the last scrape

    def totals(self) -> Tally[str]:
        with self._lock:
            index = self._index()
            previous = self._current() if self._current is not None else None
            if index is not previous:
                self._retired.update(previous.paths if previous is not None else self._seen)
                self._current = weakref.ref(index) if index is not None else None
            self._seen = Tally(index.paths) if index is not None else Tally()
            return self._retired + self._seen

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        family = CounterMetricFamily(
            "vsearch_search_path", "Query rows searched, by the path through the index (all: unfiltered)", labels=["path"]
        )
        for path in sorted(set(SEARCH_PATHS) | set(totals)):
            family.add_metric([path], float(totals.get(path, 0)))
        yield family
