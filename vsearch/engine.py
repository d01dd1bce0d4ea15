"""The engine: an open index directory and the owner of its state — the catalog
(source of truth), the manifest (what the directory holds) and the served
:class:`~vsearch.snapshot.Snapshot` (what searches use, swapped whole).

Read path: a search reads :attr:`Engine.snapshot` once, embeds with its model and
searches its index under the read lock (:mod:`vsearch.search`). Write path: every
change goes through ``with engine.writer() as w`` (:mod:`vsearch.writer`). Workflows
live in their own modules (ingest, versions, refit, products, finetune);
``vsearch/README.md`` maps them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import checkpoint, faissthreads, families, footprint, products, refit, versions
from . import ingest as _ingest
from .attributes import AttributeFilter
from .catalog import BASE_MODEL, Catalog, ImageRow, Product
from .categories import DEFAULT_BLOCK_CACHE_BYTES, CategoryFilter, category_tree
from .config import IndexConfig, ModelConfig, ProjectionConfig
from .dirlock import DirLock
from .embed import Embedder, Preprocess, decode_side
from .errors import ConfigError, ModelError, ProductNotFoundError
from .facets import FacetCache, FacetCount, attribute_names, facet_counts
from .fetch import TRUSTED, FetchPolicy
from .fusion import DEFAULT_TEXT_WEIGHT
from .images import DEFAULT_MAX_PIXELS, decode_image, read_source
from .imagestore import ImageStore
from .index import VectorIndex
from .indexfile import load_saved_index
from .ingest import IngestReport
from .locks import RWLock
from .manifest import FORMAT_VERSION, IndexManifest, IndexPaths
from .presets import resolve_model
from .products import EmbedCatalog, ImageSource
from .projection import Projection
from .query import Hit, SearchOptions
from .search import Votes, best_per_product, region_boxes, search_keywords, search_with_text
from .snapshot import EmbedderSlot, Snapshot
from .sources import Item
from .variants import PENDING_BATCH, VariantGroup, list_groups
from .versions import ReindexReport, VersionInfo
from .writer import CHECKPOINT_EVERY, IndexWriter

_log = logging.getLogger("vsearch")

__all__ = ["DEFAULT_MODEL", "Engine", "Hit", "ProductView", "SearchOptions"]

DEFAULT_MODEL = "efficientnet-lite2"
QueryImage = bytes | str | os.PathLike[str] | Image.Image


@dataclass(frozen=True)
class ProductView:
    product: Product
    images: list[ImageRow] = field(default_factory=list)


_WAITING = "SELECT 1 FROM variant_pending WHERE image_id > ? LIMIT 1"


class Engine:
    """An open index directory. Use :meth:`open` and :meth:`close` (or ``with``)."""

    def __init__(
        self,
        paths: IndexPaths,
        manifest: IndexManifest,
        catalog: Catalog,
        device: str | None,
        block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
    ) -> None:
        faissthreads.tune_blas()  # batched searches (linking, evaluation, regions) on few cores
        self.paths = paths
        self.manifest = manifest
        self.catalog = catalog
        self.device = device
        self.preprocess = Preprocess(manifest.model)
        self.image_store = ImageStore(paths.root / "images")
        self.block_cache_bytes = block_cache_bytes
        self.index_generation = -1  # the catalog generation the served index reflects; -1: stale
        self._closed = False
        self._rw = RWLock()  # searches read; the write path applies changes exclusively
        self._facet_cache = FacetCache()  # facet counts until the next catalog write
        self._write_mutex = threading.RLock()  # one writer at a time, slow parts included
        self.dir_lock = DirLock(paths.write_lock)  # ... and one process at a time writes the files
        # API-style writes save the index every this many catalog generations; a server
        # raises it and checkpoints from a background thread instead (service.py)
        self.checkpoint_every = CHECKPOINT_EVERY
        # A write links its new images to their near-duplicates before it commits; a
        # server sets this and links them from its background thread instead, in
        # batches (link_variants), so a write does not pay for a k-NN search of its own.
        self.link_in_background = False
        name = manifest.active_model
        self._snapshot = self.new_snapshot(name, versions.projection_for(paths, name, manifest), None)

    # lifecycle ----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike[str],
        *,
        model: str | ModelConfig | None = None,
        projection: ProjectionConfig | None = None,
        index: IndexConfig | None = None,
        create: bool = False,
        device: str | None = None,
        mmap: bool = False,
        block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
    ) -> Engine:
        """Open ``index_dir``; with ``create`` a missing one is created for ``model``.
        ``block_cache_bytes`` bounds the vectors kept for category-filtered search."""
        paths = IndexPaths(Path(index_dir))
        wanted = resolve_model(model) if isinstance(model, str) else model
        new = None
        if create and not paths.manifest.exists():
            new = IndexManifest(wanted or resolve_model(DEFAULT_MODEL), projection or ProjectionConfig(), index or IndexConfig())
        manifest = IndexManifest.open(paths, wanted, new)
        # a manifest that describes content never gets a new, empty catalog
        catalog = Catalog.open(
            paths.catalog,
            must_exist=manifest.projection_fitted or bool(manifest.counts.get("images")),
            raw_vectors=manifest.index.raw_vectors,
        )
        if manifest.format_version < FORMAT_VERSION:  # so that an older vsearch refuses the directory
            manifest.format_version = FORMAT_VERSION
            manifest.save(paths)
        engine = cls(paths, manifest, catalog, device, block_cache_bytes=block_cache_bytes)
        engine._load_index(mmap=mmap)
        return engine

    def close(self) -> None:
        with self._write_mutex, self._rw.write():
            self._closed = True  # searches that read the snapshot before this answer empty
            self.catalog.close()
            snap = self._snapshot  # drop the index and the model (GPU memory too)
            self._snapshot = replace(snap, index=None, embedder=EmbedderSlot(self._loader(snap.model)))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # state --------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """What searches use now; read it once per search."""
        return self._snapshot

    @property
    def index(self) -> VectorIndex | None:
        return self._snapshot.index

    @property
    def active(self) -> str:
        """The served model version's name."""
        return self._snapshot.model

    @contextmanager
    def writer(self) -> Iterator[IndexWriter]:
        """The write path: ``with engine.writer() as w: w.add_images(...)``."""
        with self._write_mutex:
            yield IndexWriter(self)

    def new_snapshot(
        self, model: str, projection: Projection, index: VectorIndex | None, like: Snapshot | None = None
    ) -> Snapshot:
        """A snapshot of model version ``model``; its embedder is ``like``'s if that is
        the same version (already loaded, maybe), else loaded on first use."""
        slot = like.embedder if like is not None and like.model == model else EmbedderSlot(self._loader(model))
        config = self.manifest.model
        has_text = model == BASE_MODEL and families.has_text(config)  # fine-tuned versions embed images only
        filters = CategoryFilter(self.catalog, self.block_cache_bytes)
        raw_dim = self.catalog.vector_dim(model)
        gallery = like.gallery if like is not None and like.model == model else versions.gallery_for(self.paths, model)
        return Snapshot(model, slot, projection, index, filters, has_text, config.query_tta, raw_dim, gallery)

    def saved_index(self, manifest: IndexManifest, mmap: bool = False) -> VectorIndex | None:
        """The saved index file, if ``manifest`` says it matches the catalog; else None."""
        return load_saved_index(self.paths, manifest, self.catalog.changes_floor, mmap)

    # writing ------------------------------------------------------------------
    def ingest(
        self,
        source: str | os.PathLike[str] | Sequence[Item],
        *,
        prune: bool = False,
        center_on: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        quiet: bool = False,
    ) -> IngestReport:
        """Add or update the products in ``source`` (folder, CSV, JSONL or items)."""
        return _ingest.ingest(self, source, prune=prune, center_on=center_on, batch_size=batch_size, workers=workers, quiet=quiet)

    def fit_projection(self, center_on: str | os.PathLike[str] | None = None) -> None:
        """Fit centring/PCA (on in-domain photos if given, else the catalog), rebuild the
        index and save."""
        refit.fit_projection(self, center_on)

    def put_product(
        self,
        product_id: str,
        *,
        title: str = "",
        category: str = "",
        attributes: dict[str, Any] | None = None,
        images: Sequence[ImageSource] | None = None,
        fetch_policy: FetchPolicy = TRUSTED,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        create: bool | None = None,
        embed: EmbedCatalog | None = None,
    ) -> ProductView:
        """Create or replace a product. ``images`` (if given) replace its images.
        ``create`` True: it must not exist yet (ConflictError); False: it must exist.
        ``embed``: how to run the model (the server's model queue; default: here)."""
        products.put_product(
            self,
            product_id,
            create=create,
            title=title,
            category=category,
            attributes=attributes,
            images=images,
            fetch_policy=fetch_policy,
            max_pixels=max_pixels,
            embed=embed,
        )
        return self.product(product_id)

    def delete_product(self, product_id: str) -> None:
        self.product(product_id)  # ProductNotFoundError if there is none
        self.remove_products([product_id])

    def checkpoint(self, every: int = 1) -> bool:
        """Save the index if it lags the catalog by ``every`` generations or more; writes
        go on while the file is written. True if it saved (see :func:`vsearch.checkpoint.checkpoint`)."""
        return checkpoint.checkpoint(self, every)

    def upgrade_index(self) -> bool:
        """Move to the index type the catalog has grown into, built aside; False if the
        current one still fits (see :func:`vsearch.checkpoint.upgrade_index`)."""
        return checkpoint.upgrade_index(self)

    def remove_products(self, product_ids: list[str]) -> int:
        """Delete products and their images; returns how many images went."""
        with self.writer() as writer:
            removed = writer.remove_products(product_ids)
            writer.checkpoint(self.checkpoint_every)
        return len(removed)

    # model versions (see vsearch.versions) --------------------------------------
    def models(self) -> list[VersionInfo]:
        """``base`` and the fine-tuned versions in ``DIR/models``, oldest first."""
        return versions.list_versions(self.paths.root, self.active)

    def use_model(self, name: str, *, quiet: bool = False, workers: int | None = None, batch_size: int = 32) -> ReindexReport:
        """Serve model version ``name``, embedding what it lacks first (see :func:`vsearch.versions.use_model`)."""
        return versions.use_model(self, name, quiet=quiet, workers=workers, batch_size=batch_size)

    def reindex(
        self, name: str | None = None, *, quiet: bool = False, workers: int | None = None, batch_size: int = 32
    ) -> ReindexReport:
        """Embed what model version ``name`` (default: the active one) lacks and serve it."""
        return versions.use_model(self, name or self.active, quiet=quiet, workers=workers, batch_size=batch_size)

    def remove_model(self, name: str) -> None:
        versions.remove_model(self, name)

    def refresh(self) -> bool:
        return versions.refresh(self)

    # reading ------------------------------------------------------------------
    def product(self, product_id: str) -> ProductView:
        with self._rw.read():
            return ProductView(self.catalog.product(product_id), self.catalog.images_of(product_id))

    def image(self, image_id: int) -> ImageRow:
        with self._rw.read():
            row = self.catalog.image_by_id(image_id)
        if row is None:
            raise ProductNotFoundError(f"no image {image_id}")
        return row

    def image_bytes(self, row: ImageRow, fetch_policy: FetchPolicy = TRUSTED) -> bytes:
        """An image's bytes: the stored upload or URL copy, the local file, or the URL."""
        return self.image_store.read(row.sha256, row.source, fetch_policy)

    def categories(self) -> list[dict[str, Any]]:
        """The category tree: ``name``, ``path``, ``products`` (with descendants), ``children``."""
        with self._rw.read():
            return category_tree(self.catalog.product_counts_by_category())

    def embed_queries(self, images: Sequence[Image.Image], snapshot: Snapshot | None = None) -> np.ndarray:
        """Query vectors (query-side TTA per the model config), before projection."""
        snap = snapshot or self._snapshot
        return snap.embedder.get().embed_images(list(images), tta=snap.query_tta)

    def embed_text(self, texts: Sequence[str], snapshot: Snapshot | None = None) -> np.ndarray:
        snap = self.require_text(snapshot or self._snapshot)
        return snap.embedder.get().embed_text(list(texts))

    def require_text(self, snap: Snapshot) -> Snapshot:
        """``snap`` if its model can embed text, else the ModelError that says which can."""
        if not snap.has_text:
            raise ModelError(
                f"model {self.manifest.model.name!r} cannot search by text; build the index with an open_clip "
                "model such as --model ViT-B-32:laion2b_s34b_b79k"
            )
        return snap

    def product_vector(self, product_id: str, snapshot: Snapshot | None = None) -> np.ndarray:
        """The mean raw vector of a product's images: the query for "more like this"."""
        snap = snapshot or self._snapshot
        with self._rw.read():
            vectors = self.catalog.vectors_of(product_id, model=snap.model)
        if len(vectors) == 0:
            self.product(product_id)  # ProductNotFoundError if there is none
            raise ProductNotFoundError(f"product {product_id!r} has no searchable image")
        return vectors.mean(axis=0, keepdims=True)

    def load_query(self, image: QueryImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        side = decode_side(self.manifest.model.image_size)  # decoded reduced, as the server does
        if isinstance(image, bytes):
            return decode_image(image, "<upload>", max_pixels=max_pixels, max_side=side)
        source = os.fspath(image)
        return decode_image(read_source(source), source, max_pixels=max_pixels, max_side=side)

    def search(
        self,
        image: QueryImage | None = None,
        *,
        text: str = "",
        text_weight: float = DEFAULT_TEXT_WEIGHT,
        k: int = 10,
        categories: Sequence[str] | None = None,
        exclude_categories: Sequence[str] | None = None,
        group_by_product: bool = True,
        where: AttributeFilter | None = None,
        collapse: str = "",
    ) -> list[Hit]:
        """The catalog products most similar to ``image`` (bytes, path or PIL image),
        or matching ``text``, or both: with both, the photo's ranking and the keyword
        ranking are fused, the keywords weighing ``text_weight`` (:mod:`vsearch.fusion`);
        ``where``: attribute conditions (:mod:`vsearch.attributes`); ``collapse``
        ``"variant_group"``: one result per variant group (:mod:`vsearch.variants`)."""
        options = SearchOptions(
            k=k,
            categories=categories or (),
            exclude_categories=exclude_categories or (),
            group_by_product=group_by_product,
            where=where,
            text=text,
            text_weight=text_weight,
            collapse=collapse,
        )
        snap = self._snapshot
        if image is not None:
            return self.search_vectors(self.embed_queries([self.load_query(image)], snap), options, snapshot=snap)[0]
        if not text:
            raise ConfigError("give an image, a text or both")
        return self.search_text(options, snapshot=snap)[0]

    def search_text(
        self, options: SearchOptions, timings: dict[str, float] | None = None, snapshot: Snapshot | None = None
    ) -> tuple[list[Hit], Votes]:
        """Products for the words ``options.text`` alone, and the categories they vote
        for: with a text tower (open_clip), the products that look like the text fused
        with those whose text matches (``text_weight`` 0: the text tower alone);
        otherwise the keyword ranking alone (see :func:`vsearch.search.search_keywords`)."""
        snap = snapshot or self._snapshot
        if snap.has_text:
            raw = self.embed_text([options.text], snap)
            hits, votes = self.search_and_suggest(raw, options, timings, snapshot=snap)
            return hits[0], votes[0]
        return self.search_keywords(options, timings, snapshot=snap)

    def search_keywords(
        self,
        options: SearchOptions,
        timings: dict[str, float] | None = None,
        neighbours: int = 20,
        snapshot: Snapshot | None = None,
    ) -> tuple[list[Hit], Votes]:
        """The keyword ranking of ``options.text`` alone (no model work), and the
        categories of its first ``neighbours`` products."""
        snap = snapshot or self._snapshot
        with self._rw.read():
            if self._closed:
                return [], []
            return search_keywords(snap, self.catalog, options, timings if timings is not None else {}, neighbours)

    def search_vectors(
        self,
        raw: np.ndarray,
        options: SearchOptions | None = None,
        timings: dict[str, float] | None = None,
        snapshot: Snapshot | None = None,
    ) -> list[list[Hit]]:
        """Search with raw (unprojected) query vectors; one hit list per row.

        ``snapshot``: the one the vectors were embedded with (default: the current one).
        ``timings``, if given, receives the milliseconds spent in ``search`` (faiss)
        and ``lookup`` (catalog rows for the hits).
        """
        return self.search_and_suggest(raw, options, timings, 0, snapshot)[0]

    def search_and_suggest(
        self,
        raw: np.ndarray,
        options: SearchOptions | None = None,
        timings: dict[str, float] | None = None,
        neighbours: int = 20,
        snapshot: Snapshot | None = None,
    ) -> tuple[list[list[Hit]], list[Votes]]:
        """Hits, plus the categories the ``neighbours`` nearest images vote for; with
        words in ``options.text``, fused with their keyword ranking."""
        snap = snapshot or self._snapshot
        timings = timings if timings is not None else {}
        with self._rw.read():
            if self._closed:
                return [[] for _ in raw], [[] for _ in raw]
            return search_with_text(snap, self.catalog, raw, options or SearchOptions(), timings, neighbours)

    def facets(self, options: SearchOptions, hits: Sequence[Hit] = ()) -> dict[str, dict[str, list[FacetCount]]]:
        """Value counts of ``options.facets`` among the products the options' filters
        allow (``all``) and among ``hits`` (``top``); see :mod:`vsearch.facets`."""
        with self._rw.read():
            return facet_counts(self.catalog, options, hits, self._facet_cache)

    def link_variants(self, batch: int = PENDING_BATCH, until: Callable[[], bool] | None = None, pause_s: float = 0.0) -> bool:
        """Find the near-duplicates of the images still waiting for them (stored before
        there was an index, before catalog schema 8, or while ``link_in_background``):
        one k-NN search per image, ``batch`` images per transaction, writes going on
        between batches (``pause_s`` apart: the write lock is not fair, so a waiting
        write gets it first). Stops early once ``until()`` is true; returns whether
        every waiting image was looked at. Takes no write lock when none wait."""
        last = -1
        while until is None or not until():
            if self._snapshot.index is None or not self.catalog.read(_WAITING, [last]):
                return True
            with self.writer() as writer:
                last = writer.link_pending(after=last, batch=batch)
            if last < 0:
                return True
            time.sleep(pause_s)
        return False

    def images_not_linked(self) -> int:
        """How many images wait for their near-duplicate links (see :meth:`link_variants`)."""
        return int(self.catalog.read("SELECT count(*) FROM variant_pending", [])[0][0])

    def variant_groups(self) -> tuple[list[VariantGroup], list[tuple[str, int, int]]]:
        """Variant groups, largest first, and near-duplicate images within one product
        (:func:`vsearch.variants.list_groups`): what ``vsearch dups`` lists."""
        return list_groups(self.catalog.read)

    def attributes(self) -> list[dict[str, Any]]:
        """The filterable attributes: ``name`` and ``values`` (how many distinct)."""
        with self._rw.read():
            return attribute_names(self.catalog)

    def search_regions(self, image: Image.Image, options: SearchOptions | None = None) -> list[Hit]:
        """Products ranked by their best-matching region of the photo.

        The whole photo (with query TTA) and overlapping windows at two scales, all
        from one forward pass, are each searched; a product scores its best region.
        For cluttered photos where the product fills only part of the frame.
        """
        options = options or SearchOptions()
        snap = self._snapshot
        boxes = region_boxes()
        raw = np.concatenate([self.embed_queries([image], snap), snap.embedder.get().embed_regions(image, boxes[1:])])
        wide = replace(options, k=options.k + options.offset, offset=0, group_by_product=True)
        return best_per_product(self.search_vectors(raw, wide, snapshot=snap), options)

    def info(self) -> dict[str, Any]:
        snap = self._snapshot
        with self._rw.read():
            counts = self.catalog.counts()
        return {
            "path": str(self.paths.root),
            **counts,
            "vectors": snap.vectors,
            "catalog_generation": self.index_generation,  # the catalog write the served index reflects
            "model": self.manifest.model.name,
            "active_model": snap.model,
            "layers": list(self.manifest.model.layers),
            "pooling": list(self.manifest.model.poolings),
            "dim": self.manifest.dim,
            "raw_dim": snap.raw_dim,  # the length of a `vector` query and of an import's vectors (before projection)
            "factory": self.manifest.factory,
            "tuning": asdict(self.manifest.tuning) if self.manifest.tuning is not None else None,
            "footprint": footprint.measure(
                self.paths, counts["images"], snap.index.index if snap.index else None, folders=False
            ).to_dict(),
            "projection": {
                **self.manifest.projection.__dict__,
                "fitted_on": snap.projection.fitted_on,
                "fitted_from": snap.projection.fitted_from,
            }
            if snap.model == BASE_MODEL
            else f"part of model version {snap.model} (its zero-shot half)",
            "text_search": snap.has_text,
            "duplicates": {**asdict(self.manifest.duplicates), "images_not_linked": self.images_not_linked()},
            "format_version": self.manifest.format_version,
        }

    # internals ----------------------------------------------------------------
    def _load_index(self, mmap: bool) -> None:
        if not self.manifest.projection_fitted:
            return
        current = self.manifest.catalog_generation == self.catalog.generation
        saved = self.saved_index(self.manifest, mmap and current)  # a mapped index is read-only: no catching up
        with self.writer() as writer:
            writer.serve_saved(saved, self.manifest.catalog_generation)

    def _loader(self, model: str) -> Callable[[], Embedder]:
        return versions.embedder_loader(self.paths, self.manifest, model, self.device)
