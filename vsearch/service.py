"""The serving layer's library half: turns a shopper's query (an upload, a URL, a
product, a text) into results, shares model forwards between concurrent requests,
and makes thumbnails. ``vsearch.api`` only parses HTTP and calls this."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .batcher import MicroBatcher, Overloaded
from .config import ServeConfig
from .embed import pick_device
from .engine import Engine, ModelChanged
from .errors import ConfigError, ImageTooLargeError
from .fetch import FetchPolicy, TooLargeError, fetch_url
from .fsutil import atomic_write_bytes
from .images import decode_image
from .query import Hit, SearchOptions

__all__ = ["Query", "SearchResult", "SearchService", "default_batch_max", "parse_crop"]


@dataclass(frozen=True)
class Query:
    """Exactly one of ``image`` (bytes), ``image_url``, ``product_id`` or ``text``."""

    image: bytes | None = None
    image_url: str | None = None
    product_id: str | None = None
    text: str | None = None
    crop: tuple[float, float, float, float] | None = None  # x, y, w, h as fractions

    def __post_init__(self) -> None:
        given = ["image"] if self.image is not None else []
        given += [name for name in ("image_url", "product_id", "text") if getattr(self, name)]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of image, image_url, product_id or text" + (f" (got {', '.join(given)})" if given else "")
            )


@dataclass
class SearchResult:
    hits: list[Hit]
    suggested_categories: list[tuple[str, float]]
    timing_ms: dict[str, float] = field(default_factory=dict)


def default_batch_max(device: str | None) -> int:
    """Micro-batching pays where a batch costs little more than one image: on a GPU.

    On the 2-core CPU we measured (scripts/bench_api.py) a forward's cost grows with
    the batch, so batching added latency (p50 85 vs 73 ms, 1 client) and no
    throughput (0.92x with 8 clients); it is off there unless configured.
    """
    return 16 if pick_device(device).type in ("cuda", "mps") else 1


def parse_crop(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x,y,w,h"`` in fractions of the image -> a checked tuple."""
    if text is None or text == "":
        return None
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("crop must be x,y,w,h: four numbers between 0 and 1") from None
    if min(x, y) < 0 or w <= 0 or h <= 0 or x + w > 1.0001 or y + h > 1.0001:
        raise ConfigError("crop must lie inside the image: 0 <= x, y and x + w, y + h <= 1, with w, h > 0")
    return x, y, w, h


class SearchService:
    def __init__(self, engine: Engine, config: ServeConfig, on_batch: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.fetch_policy = FetchPolicy(
            allow_private=config.allow_private_urls,
            allowed_networks=config.allowed_url_networks,
            timeout_s=config.url_timeout_s,
            max_bytes=config.max_upload_bytes,
        )
        self._on_batch = on_batch
        # With batching on, the batcher's thread is the only one that runs the model
        # (text queries and the warm-up too), so a single OpenMP team does the work.
        self._batcher: MicroBatcher[Image.Image | str, np.ndarray] | None = None
        self.batch_max = config.batch_max or default_batch_max(engine.device)
        if self.batch_max > 1:
            self._batcher = MicroBatcher(
                self._embed_many,
                max_batch=self.batch_max,
                max_wait_ms=config.batch_wait_ms,
                max_queue=config.queue_size,
                on_batch=on_batch,
            )
        self._slots = threading.BoundedSemaphore(config.queue_size)  # bounds in-flight work with batching off
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def watch_index(self) -> None:
        """Poll the index directory for a model switch (or write) made by another
        process, e.g. ``vsearch reindex`` beside this server, and adopt it."""
        if self.config.reload_interval_s <= 0 or self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.config.reload_interval_s):
                try:
                    self.engine.refresh()
                except Exception as exc:  # noqa: BLE001 - keep serving the current version; say why
                    print(f"vsearch: could not reload {self.engine.paths.root}: {exc}", flush=True)

        self._watcher = threading.Thread(target=loop, name="vsearch-reload", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        if self._batcher is not None:
            self._batcher.close()

    def warm_up(self) -> None:
        """Load the model now rather than on the first shopper's request."""
        size = self.engine.manifest.model.image_size
        self.embed(Image.new("RGB", (size, size), "white"))

    def search(self, query: Query, options: SearchOptions) -> SearchResult:
        timing: dict[str, float] = {"decode": 0.0, "embed": 0.0, "search": 0.0, "lookup": 0.0}
        start = time.perf_counter()
        image: Image.Image | None = None
        if query.product_id:
            options = replace(options, exclude_products=(*options.exclude_products, query.product_id))
        elif not query.text:
            image = self.load(query)
            timing["decode"] = _ms(start)

        def query_vector() -> np.ndarray:
            step = time.perf_counter()
            if query.product_id:
                raw = self.engine.product_vector(query.product_id)
                timing["lookup"] += _ms(step)
            else:
                raw = self.embed(image if image is not None else query.text or "")
                timing["embed"] += _ms(step)
            return raw

        try:
            hits, suggested = self.engine.embed_and_search(query_vector, options, timing)
        except ModelChanged:
            raise Overloaded("the model version is changing; retry shortly") from None
        timing["total"] = _ms(start)
        return SearchResult(hits[0], suggested[0], {k: round(v, 2) for k, v in timing.items()})

    def load(self, query: Query) -> Image.Image:
        """Fetch (for URLs), size-check, decode and crop a query image."""
        if query.image_url:
            try:
                data = fetch_url(query.image_url, self.fetch_policy)
            except TooLargeError as exc:
                raise ImageTooLargeError(query.image_url, str(exc)) from exc
            label = query.image_url
        else:
            data, label = query.image or b"", "upload"
        if len(data) > self.config.max_upload_bytes:
            raise ImageTooLargeError(label, f"{len(data)} bytes is more than the {self.config.max_upload_bytes}-byte limit")
        image = decode_image(data, label, max_pixels=self.config.max_pixels)
        if query.crop is not None:
            x, y, w, h = query.crop
            box = (round(x * image.width), round(y * image.height), round((x + w) * image.width), round((y + h) * image.height))
            image = image.crop((box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
        return image

    def embed(self, query: Image.Image | str) -> np.ndarray:
        """One query vector (an image, or a text); concurrent callers share a forward
        when batching is on. Without batching each request runs its own forward."""
        if self._batcher is not None:
            future: Future[np.ndarray] = self._batcher.submit(query)
            return future.result()
        if not self._slots.acquire(blocking=False):
            raise Overloaded("too many requests in flight; retry shortly")
        try:
            return self._embed_many([query])[0]
        finally:
            self._slots.release()

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG no larger than ``thumbnail_px``, cached in the index directory."""
        row = self.engine.image(image_id)
        px = self.config.thumbnail_px
        path = Path(self.engine.paths.root) / "thumbs" / f"{row.id}-{row.sha256[:16]}-{px}.jpg"
        if path.exists():
            return path.read_bytes()
        image = decode_image(self.engine.image_bytes(row, self.fetch_policy), row.source)
        image.thumbnail((px, px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return buffer.getvalue()

    def _embed_many(self, queries: list[Image.Image | str]) -> list[np.ndarray]:
        images = [(i, q) for i, q in enumerate(queries) if isinstance(q, Image.Image)]
        texts = [(i, q) for i, q in enumerate(queries) if isinstance(q, str)]
        out: list[np.ndarray] = [np.zeros(0)] * len(queries)
        if images:
            if self._on_batch is not None:
                self._on_batch(len(images))
            vectors = self.engine.embed_queries([q for _, q in images])
            for row, (i, _) in enumerate(images):
                out[i] = vectors[row : row + 1]
        if texts:
            vectors = self.engine.embed_text([q for _, q in texts])
            for row, (i, _) in enumerate(texts):
                out[i] = vectors[row : row + 1]
        return out


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
