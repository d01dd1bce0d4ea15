"""Prometheus metrics for the API: requests and latency per route, index size,
embedding batch sizes. One registry per app, so tests and apps do not collide."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, index_size: Callable[[], float]) -> None:
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

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
