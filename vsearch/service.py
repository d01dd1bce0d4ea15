"""The serving layer's library half: turns shoppers' queries (:data:`vsearch.query.Query`)
into results, shares model forwards between concurrent requests, and makes
thumbnails. ``vsearch.api`` only parses HTTP and calls this.

A search reads the engine's snapshot once: the query is embedded by that snapshot's
model and searched in its index, whatever switch happens meanwhile. Each query kind
has one handler in :data:`PREPARE`, which turns it into an image or a text to embed,
or a raw vector, or leaves it to the keyword index alone (a text on a model without
a text tower); :meth:`SearchService.search_many` embeds a whole batch's images in
one forward. Words beside a query (``SearchOptions.text``) rank by the keyword index
too, fused with the query's ranking (:mod:`vsearch.fusion`).

Every forward runs on the model queue's one thread (:class:`~vsearch.batcher.MicroBatcher`),
which holds at most ``queue_size`` requests: past that a search is refused at once
(429), before its image is even decoded. Searches that fail with server errors make
the service not ready (:class:`SearchHealth`) until a check search passes again.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .batcher import MicroBatcher, Overloaded
from .config import ServeConfig
from .embed import decode_side, pick_device
from .engine import Engine
from .errors import ConfigError, ImageTooLargeError, VsearchError
from .facets import FacetCount
from .fetch import FetchPolicy, TooLargeError, fetch_url
from .fsutil import atomic_write_bytes
from .images import decode_image
from .keywords import match_expression
from .learner import ProjectionLearner
from .limits import IdleTrimmer
from .query import Crop, Hit, ImageQuery, ProductQuery, Query, SearchOptions, TextQuery, UrlQuery, VectorQuery
from .snapshot import Snapshot
from .variants import groups_of

__all__ = ["PREPARE", "SearchHealth", "SearchResult", "SearchService", "default_batch_max", "default_queue_size"]


@dataclass
class SearchResult:
    hits: list[Hit]
    suggested_categories: list[tuple[str, float]]
    timing_ms: dict[str, float] = field(default_factory=dict)
    facets: dict[str, dict[str, list[FacetCount]]] = field(default_factory=dict)


@dataclass
class _Prepared:
    """A query made ready to embed: at most one of image, text or raw is set (none: a
    keyword search, ``options.text`` alone)."""

    options: SearchOptions
    timing: dict[str, float]
    image: Image.Image | None = None
    text: str | None = None
    raw: np.ndarray | None = None


@dataclass(frozen=True)
class CatalogImage:
    """A product write's image, embedded as the catalog's are (no query TTA)."""

    image: Image.Image


Embeddable = Image.Image | str | CatalogImage  # what the model queue embeds: a query image, a text, a catalog image


# Images linked to their near-duplicates per transaction in the background, on one
# core: one batched k-NN search, ~23 ms for 16 images at 100k exact vectors (1.4 ms an
# image, against ~4 ms alone), which is what a write may wait for (bench_scale.py).
BACKGROUND_LINK_BATCH = 16
BACKGROUND_LINK_PAUSE_S = 0.002  # between batches, so a waiting write takes the write lock first
BACKGROUND_CHECKPOINT_BOUND = 10_000  # generations a request's write may still save at, with background checkpoints


def default_batch_max(device: str | None) -> int:
    """Micro-batching pays where a batch costs little more than one image: on a GPU.

    On the 2-core CPU we measured (scripts/bench_api.py) a forward's cost grows with
    the batch, so batching added latency (p50 85 vs 73 ms, 1 client) and no
    throughput (0.92x with 8 clients); it is off there unless configured.
    """
    return 16 if pick_device(device).type in ("cuda", "mps") else 1


def default_queue_size(batch_max: int, cpus: int | None = None) -> int:
    """How many searches may wait for the model before more are refused (429): four
    batches on a GPU; on a CPU, 4 per core (at least 8).

    A search past that would wait longer than the queue takes to drain, which helps no
    one: with 64 (the old default, more than the 40 request threads) nothing was ever
    refused, and on 2 cores (~140 ms a query forward, TTA included) 32 clients saw p50
    5.1 s, p99 14.6 s. With 8: p50 1.8 s, p99 2.7 s, the rest quick 429s; 8 clients
    get no refusal (scripts/load.py).
    """
    if batch_max > 1:
        return 4 * batch_max
    return max(8, 4 * (cpus or os.cpu_count() or 1))


class SearchHealth:
    """Whether searches work, judged by the searches themselves, so /readyz costs
    nothing: ``failures`` server errors in a row (exceptions that are not a
    VsearchError: a broken index, a model that fails) make it unhealthy, and one search
    that works, or a check search (:meth:`SearchService.ready`), makes it healthy again.
    """

    def __init__(self, failures: int = 5) -> None:
        self.failures = failures
        self._failed = 0

    @property
    def ok(self) -> bool:
        return self._failed < self.failures

    def record(self, ok: bool) -> None:
        self._failed = 0 if ok else self._failed + 1


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
        # The batcher's thread is the only one that runs the model (text queries and the
        # warm-up too), so a single OpenMP team does the work, in one malloc arena.
        self.batch_max = config.batch_max or default_batch_max(engine.device)
        self.queue_size = config.queue_size or default_queue_size(self.batch_max)
        self._batcher: MicroBatcher[tuple[Snapshot, Embeddable], np.ndarray] = MicroBatcher(
            self._embed_many,
            max_batch=self.batch_max,
            max_wait_ms=config.batch_wait_ms if self.batch_max > 1 else 0.0,
            max_queue=self.queue_size,
        )
        self.health = SearchHealth()
        self.trimmer = IdleTrimmer()
        self._check: threading.Thread | None = None
        self._last_check = 0.0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.learner = ProjectionLearner(engine, config.query_reservoir, config.refit_after_queries)

    def watch_index(self) -> None:
        """Poll the index directory for a model switch (or write) made by another
        process, e.g. ``vsearch reindex`` beside this server, and adopt it; and save
        the index every ``checkpoint_interval_s`` after writes, off the request path."""
        if self.config.reload_interval_s <= 0 or self._watcher is not None:
            return
        interval = self.config.checkpoint_interval_s
        if interval > 0:  # writes then save only every 10k generations inline, as a bound on replay
            self.engine.checkpoint_every = max(self.engine.checkpoint_every, BACKGROUND_CHECKPOINT_BOUND)
        self.engine.link_in_background = True  # a write's near-duplicate links: below, in batches

        def loop() -> None:
            last_checkpoint = time.monotonic()
            while not self._stop.wait(self.config.reload_interval_s):
                try:
                    self.engine.refresh()
                    due = interval > 0 and time.monotonic() - last_checkpoint >= interval
                    self.learner.tick(save=due)  # a refit on the shoppers' photos when due, built aside
                    if due:
                        self.engine.checkpoint()  # off the request path; a no-op when nothing was written
                        self.engine.upgrade_index()  # Flat -> IVF once the writes have outgrown it, built aside
                        last_checkpoint = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - keep serving the current version; say why
                    print(f"vsearch: could not reload {self.engine.paths.root}: {exc}", flush=True)
                try:
                    self._link_variants()
                except Exception as exc:  # noqa: BLE001 - they stay queued for the next tick; say why
                    print(f"vsearch: could not link near-duplicates in {self.engine.paths.root}: {exc}", flush=True)

        self._watcher = threading.Thread(target=loop, name="vsearch-reload", daemon=True)
        self._watcher.start()

    def _link_variants(self) -> None:
        """Link the images written since the last tick (or a backlog, e.g. a bulk
        import's) to their near-duplicates, BACKGROUND_LINK_BATCH per transaction so
        a write waits for one batch at most, for up to one reload interval a tick."""
        deadline = time.monotonic() + self.config.reload_interval_s

        def until() -> bool:
            return self._stop.is_set() or time.monotonic() > deadline

        self.engine.link_variants(BACKGROUND_LINK_BATCH, until=until, pause_s=BACKGROUND_LINK_PAUSE_S)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self._batcher.close()
        self.trimmer.close()
        self.learner.close()

    def warm_up(self) -> None:
        """Load the model and answer one search now, end to end (decode, model, index),
        rather than on the first shopper's request: the server reports ready only once
        a search works."""
        size = self.engine.manifest.model.image_size
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), "white").save(buffer, format="PNG")
        self.search(ImageQuery(buffer.getvalue()), SearchOptions(k=1), learn=False)

    def ready(self, recheck_s: float = 5.0) -> bool:
        """Whether searches work (see :class:`SearchHealth`); cheap. While they do not,
        a check search (:meth:`warm_up`) runs in the background at most every
        ``recheck_s`` seconds, and the first that passes makes the service ready again."""
        if self.health.ok:
            return True
        now = time.monotonic()
        if (self._check is None or not self._check.is_alive()) and now - self._last_check >= recheck_s:
            self._last_check = now
            self._check = threading.Thread(target=self._recheck, name="vsearch-readycheck", daemon=True)
            self._check.start()
        return False

    def _recheck(self) -> None:
        with contextlib.suppress(Exception):  # search_many records the outcome; Overloaded says nothing
            self.warm_up()

    # searching --------------------------------------------------------------------
    def search(self, query: Query, options: SearchOptions, learn: bool = True) -> SearchResult:
        result = self.search_many([(query, options)], learn)[0]
        if isinstance(result, VsearchError):
            raise result
        return result

    def search_many(
        self, requests: Sequence[tuple[Query, SearchOptions]], learn: bool = True
    ) -> list[SearchResult | VsearchError]:
        """Answer several queries from one snapshot, their images embedded together;
        a query that fails gets its error in its place. With ``learn``, the image
        queries' raw vectors join the sample the projection is refitted on."""
        self.trimmer.touch()
        try:
            results = self._search_many(requests, learn)
        except Exception:
            self.health.record(False)  # a server error, not the request's fault
            raise
        finally:
            self.trimmer.touch()
        self.health.record(True)
        return results

    def _search_many(self, requests: Sequence[tuple[Query, SearchOptions]], learn: bool) -> list[SearchResult | VsearchError]:
        snap = self.engine.snapshot
        full = self._batcher.full  # refuse before decoding what the model could not take
        prepared: list[_Prepared | VsearchError] = []
        for query, options in requests:
            start = time.perf_counter()
            try:
                if full and _needs_model(query, snap):
                    raise Overloaded("too many requests waiting for the model; retry shortly")
                item = PREPARE[type(query)](self, snap, query, options)
            except VsearchError as exc:
                prepared.append(exc)
                continue
            item.timing["total"] = _ms(start)
            prepared.append(item)
        ready = [p for p in prepared if isinstance(p, _Prepared)]
        pending = [p for p in ready if p.image is not None or p.text is not None]
        if pending:
            start = time.perf_counter()
            inputs: list[Image.Image | str] = [p.image if p.image is not None else p.text or "" for p in pending]
            try:
                vectors = self.embed(snap, inputs)
            except VsearchError as exc:  # e.g. Overloaded: each query that needed the model says so
                failed = {id(p) for p in pending}
                prepared = [exc if id(p) in failed else p for p in prepared]
            else:
                for p, raw in zip(pending, vectors):
                    p.raw, p.timing["embed"] = raw, _ms(start)
                photos = [raw for p, raw in zip(pending, vectors) if p.image is not None]
                if learn and photos:
                    self.learner.offer(np.stack(photos), snap.model)
        return [p if isinstance(p, VsearchError) else self._search_one(snap, p) for p in prepared]

    def _search_one(self, snap: Snapshot, p: _Prepared) -> SearchResult | VsearchError:
        start = time.perf_counter()
        try:
            if p.raw is None:  # words alone, on a model without a text tower
                found, vote = self.engine.search_keywords(p.options, p.timing, snapshot=snap)
                hits, suggested = [found], [vote]
            else:
                hits, suggested = self.engine.search_and_suggest(p.raw, p.options, p.timing, snapshot=snap)
            counted = time.perf_counter()
            facets = self.engine.facets(p.options, hits[0]) if p.options.facets else {}
            if facets:
                p.timing["facets"] = _ms(counted)
        except VsearchError as exc:
            return exc
        timing = {"decode": 0.0, "embed": 0.0, "search": 0.0, "lookup": 0.0, **p.timing}
        timing["total"] += timing["embed"] + _ms(start)
        return SearchResult(hits[0], suggested[0], {k: round(v, 2) for k, v in timing.items()}, facets)

    def load(self, data: bytes, label: str, crop: Crop | None) -> Image.Image:
        """Size-check, decode (reduced to what the model can use of it, or of the crop)
        and crop a query image."""
        if len(data) > self.config.max_upload_bytes:
            raise ImageTooLargeError(label, f"{len(data)} bytes is more than the {self.config.max_upload_bytes}-byte limit")
        side = decode_side(self.engine.manifest.model.image_size)
        if crop is not None:  # the crop is what the model sees: keep its detail
            side = math.ceil(side / max(crop[2], crop[3], 1e-3))
        image = decode_image(data, label, max_pixels=self.config.max_pixels, max_side=side)
        if crop is not None:
            x, y, w, h = crop
            box = (round(x * image.width), round(y * image.height), round((x + w) * image.width), round((y + h) * image.height))
            image = image.crop((box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
        return image

    def embed(self, snap: Snapshot, queries: Sequence[Image.Image | str]) -> list[np.ndarray]:
        """One raw vector per image or text, from ``snap``'s model, on the model queue's
        thread (concurrent callers share a forward when batching is on); Overloaded at
        once when the queue is full."""
        return self._batcher.submit_all([(snap, q) for q in queries]).result()

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG no larger than ``thumbnail_px``, cached in the index directory."""
        row = self.engine.image(image_id)
        px = self.config.thumbnail_px
        path = Path(self.engine.paths.root) / "thumbs" / f"{row.id}-{row.sha256[:16]}-{px}.jpg"
        if path.exists():
            return path.read_bytes()
        image = decode_image(self.engine.image_bytes(row, self.fetch_policy), row.source, max_side=px)
        image.thumbnail((px, px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return buffer.getvalue()

    def embed_catalog(self, snap: Snapshot, images: Sequence[Image.Image], wait_s: float = 10.0) -> np.ndarray:
        """Catalog vectors (no query TTA) for a product write, on the model queue's thread
        like every forward; waits up to ``wait_s`` for a place in the queue (a write is
        worth a wait), then Overloaded."""
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        rows = self._batcher.submit_all([(snap, CatalogImage(im)) for im in images], timeout=wait_s).result()
        return np.concatenate(rows)

    def _embed_many(self, queries: list[tuple[Snapshot, Embeddable]]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0)] * len(queries)
        for snap in {id(s): s for s, _ in queries}.values():  # a switch may land inside a batch
            for kind in (Image.Image, str, CatalogImage):  # one forward per kind
                group = [(i, q) for i, (s, q) in enumerate(queries) if s is snap and isinstance(q, kind)]
                if group:
                    vectors = self._embed_group(snap, [q for _, q in group])
                    for row, (i, _) in enumerate(group):
                        out[i] = vectors[row : row + 1]
        return out

    def _embed_group(self, snap: Snapshot, items: list[Embeddable]) -> np.ndarray:
        """Vectors for items of one kind."""
        if isinstance(items[0], CatalogImage):
            return snap.embedder.get().embed_images([c.image for c in items if isinstance(c, CatalogImage)])
        if isinstance(items[0], str):
            return self.engine.embed_text([t for t in items if isinstance(t, str)], snap)
        if self._on_batch is not None:
            self._on_batch(len(items))
        return self.engine.embed_queries([im for im in items if isinstance(im, Image.Image)], snap)


# one handler per query kind -------------------------------------------------------------
def _image(service: SearchService, snap: Snapshot, query: ImageQuery, options: SearchOptions) -> _Prepared:
    start = time.perf_counter()
    image = service.load(query.image, "upload", query.crop)
    return _Prepared(options, {"decode": _ms(start)}, image=image)


def _url(service: SearchService, snap: Snapshot, query: UrlQuery, options: SearchOptions) -> _Prepared:
    start = time.perf_counter()
    try:
        data = fetch_url(query.url, service.fetch_policy)
    except TooLargeError as exc:
        raise ImageTooLargeError(query.url, str(exc)) from exc
    return _Prepared(options, {"decode": _ms(start)}, image=service.load(data, query.url, query.crop))


def _product(service: SearchService, snap: Snapshot, query: ProductQuery, options: SearchOptions) -> _Prepared:
    start = time.perf_counter()
    raw = service.engine.product_vector(query.product_id, snap)
    itself = [query.product_id]
    if options.collapse:  # its variants are the same product to the shopper
        group = groups_of(service.engine.catalog.select, itself).get(query.product_id)
        itself = [query.product_id, *(group.members if group else [])]
    options = replace(options, exclude_products=(*options.exclude_products, *itself))
    return _Prepared(options, {"lookup": _ms(start)}, raw=raw)


def _text(service: SearchService, snap: Snapshot, query: TextQuery, options: SearchOptions) -> _Prepared:
    options = replace(options, text=query.text)  # its words are the keyword side
    if snap.has_text:  # the text tower's ranking, fused with the keywords'
        return _Prepared(options, {}, text=query.text)
    if match_expression(query.text) is None:  # refused before any work, so a batch's other queries go on
        raise ConfigError("text has no words to search for (letters or digits)")
    return _Prepared(options, {})  # the keyword index alone


def _vector(service: SearchService, snap: Snapshot, query: VectorQuery, options: SearchOptions) -> _Prepared:
    want = snap.raw_dim  # the snapshot's model, which will search this vector
    if want and len(query.vector) != want:
        raise ConfigError(f"vector has {len(query.vector)} numbers; model {snap.model!r} makes {want}-dimensional vectors")
    return _Prepared(options, {}, raw=query.vector[None, :])


NEEDS_MODEL = (ImageQuery, UrlQuery, TextQuery)  # the query kinds refused when the model's queue is full


def _needs_model(query: Query, snap: Snapshot) -> bool:
    """Whether ``query`` waits for the model (a text does only with a text tower)."""
    return type(query) in NEEDS_MODEL and (snap.has_text or not isinstance(query, TextQuery))


PREPARE: dict[type, Callable[[SearchService, Snapshot, Query, SearchOptions], _Prepared]] = {
    ImageQuery: _image,  # type: ignore[dict-item]
    UrlQuery: _url,  # type: ignore[dict-item]
    ProductQuery: _product,  # type: ignore[dict-item]
    TextQuery: _text,  # type: ignore[dict-item]
    VectorQuery: _vector,  # type: ignore[dict-item]
}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
