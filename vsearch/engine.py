"""The engine: one object that owns an index directory and answers every request.

The CLI and the API are thin adapters over these methods.

Concurrency: any number of searches run at once. Writers (ingest, product writes,
refits) take turns on ``_writer`` and do their slow part (decoding, the model)
while searches go on; they hold the readers-writer lock exclusively only to apply
a finished change to the catalog and the index together, so a search sees a write
completely or not at all.

Model versions (``base`` and fine-tuned ones, see :mod:`vsearch.modelswitch`): the
catalog keeps each version's vectors; the active one's are in the index. ``epoch``
counts switches, so a query embedded by one version is never searched against
another's vectors (:class:`ModelChanged`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .adapter import AdaptedEmbedder
from .catalog import BASE_MODEL, Catalog, ImageRow, Product
from .config import IndexConfig, ModelConfig, ProjectionConfig, resolve_model
from .embed import Embedder, Preprocess, pick_device
from .errors import ConfigError, ImageError, IndexFormatError, IndexNotFoundError, ModelError, ProductNotFoundError
from .fetch import TRUSTED, FetchPolicy, fetch_url
from .images import DEFAULT_MAX_PIXELS, decode_image, is_url, read_source, sha256_bytes
from .imagestore import ImageStore
from .index import VectorIndex, choose_factory
from .ingest import IngestReport, ingest_items
from .locks import RWLock
from .manifest import IndexManifest, IndexPaths
from .modelswitch import ModelVersions
from .projection import Projection
from .query import Hit, SearchOptions, category_tree, region_boxes
from .results import category_blocks, collect_hits, vote
from .sources import Item, read_source_items
from .versions import version_dir

__all__ = ["Engine", "Hit", "ModelChanged", "ProductView", "SearchOptions", "DEFAULT_MODEL"]

DEFAULT_MODEL = "efficientnet-lite2"
FIT_SAMPLE = 100_000  # vectors used to fit the projection and train IVF quantizers
QueryImage = bytes | str | os.PathLike[str] | Image.Image
ImageSource = bytes | str  # uploaded bytes, an http(s) URL, or a local path


class ModelChanged(Exception):
    """The served model version changed between embedding a query and searching it;
    embed again. (Internal: :class:`vsearch.service.SearchService` retries.)"""


@dataclass(frozen=True)
class ProductView:
    product: Product
    images: list[ImageRow] = field(default_factory=list)


class Engine(ModelVersions):
    """An open index directory. Use :meth:`open` and :meth:`close` (or ``with``)."""

    def __init__(self, paths: IndexPaths, manifest: IndexManifest, catalog: Catalog, device: str | None) -> None:
        self.paths = paths
        self.manifest = manifest
        self.catalog = catalog
        self.device = device
        self.active = manifest.active_model
        self.epoch = 0  # bumped whenever the served model version changes
        self.projection = self._projection_for(self.active)
        self.preprocess = Preprocess(manifest.model)
        self.index: VectorIndex | None = None
        self.image_store = ImageStore(paths.root / "images")
        self._embedder: Embedder | None = None
        self._embedder_name = ""
        self._embedder_lock = threading.Lock()
        self._categories: dict[str, np.ndarray] | None = None
        self._rw = RWLock()
        self._writer = threading.RLock()

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
    ) -> Engine:
        """Open ``index_dir``; with ``create`` a missing one is created for ``model``."""
        paths = IndexPaths(Path(index_dir))
        wanted = resolve_model(model) if isinstance(model, str) else model
        if paths.manifest.exists():
            manifest = IndexManifest.load(paths)
            if wanted is not None and wanted != manifest.model:
                raise IndexFormatError(
                    f"{paths.root} was built with model {manifest.model.name!r} {_describe(manifest.model)}, "
                    f"not {wanted.name!r} {_describe(wanted)}; use another --index for another model"
                )
        elif create:
            paths.root.mkdir(parents=True, exist_ok=True)
            manifest = IndexManifest(
                model=wanted or resolve_model(DEFAULT_MODEL),
                projection=projection or ProjectionConfig(),
                index=index or IndexConfig(),
            )
            manifest.save(paths)
        else:
            raise IndexNotFoundError(f"no index at {paths.root} (build one with: vsearch ingest SOURCE --index {paths.root})")
        engine = cls(paths, manifest, Catalog.open(paths.catalog), device)
        engine._load_index(mmap=mmap)
        return engine

    def close(self) -> None:
        with self._writer, self._rw.write():
            self.catalog.close()
            self.index = None
            self._embedder = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def embedder(self) -> Embedder:
        """The model, loaded on first use (a re-ingest of unchanged data never loads it)."""
        with self._embedder_lock:
            name = self.active  # a switch may land while we load; then the next call reloads
            if self._embedder is None or self._embedder_name != name:
                self._embedder, self._embedder_name = self._load_embedder(name), name
            return self._embedder

    def _load_embedder(self, name: str) -> Embedder:
        if name == BASE_MODEL:
            return Embedder(self.manifest.model, device=self.device)
        return AdaptedEmbedder(version_dir(self.paths.root, name), device=self.device)

    def _projection_for(self, name: str) -> Projection:
        # A fine-tuned version's vectors come out final (its zero-shot part carries
        # the base projection it was trained with), so only renormalisation is left.
        return Projection.load(self.paths.projection) if name == BASE_MODEL else Projection()

    @property
    def has_text(self) -> bool:
        return (
            self.active == BASE_MODEL and self.manifest.model.family == "open_clip" and self.manifest.model.layers == ("embed",)
        )

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
        items = read_source_items(source) if isinstance(source, (str, os.PathLike)) else list(source)
        with self._writer:
            report = ingest_items(
                self.catalog,
                self.preprocess,
                lambda: self.embedder,
                items,
                on_batch=self._add_raw,
                on_remove=self._remove_ids,
                checkpoint=self._save,
                apply_lock=self._rw.write,
                prune=prune,
                batch_size=batch_size,
                workers=workers,
                device=pick_device(self.device),
                quiet=quiet,
                rejects_path=self.paths.rejects,
                model=self.active,
            )
            self._categories = None
            if center_on is not None or not self.manifest.projection_fitted:
                self.fit_projection(center_on)  # saves
            else:
                if self._factory_outgrown():
                    self.rebuild_index()
                self._save()
        return report

    def fit_projection(self, center_on: str | os.PathLike[str] | None = None) -> None:
        """Fit centring/PCA (on in-domain photos if given, else the catalog), rebuild the
        index and save."""
        with self._writer:
            if self.active != BASE_MODEL:
                if center_on is not None:
                    raise ConfigError(f"--center-on refits the base model's projection; model {self.active!r} is active")
                self.rebuild_index()
                self._save()
                return
            if center_on is not None:
                sources = [item.image for item in read_source_items(center_on)]
                raw = self._embed_sources(sources, tta=self.manifest.model.query_tta)
            else:
                raw = self.catalog.sample_vectors(FIT_SAMPLE, model=self.active)
            if len(raw) == 0:
                self._save()
                return
            projection = Projection.fit(raw, self.manifest.projection)
            index = self._build_index(projection, self.active)
            with self._rw.write():
                projection.save(self.paths.projection)
                self.projection, self.index = projection, index
                self.manifest.projection_fitted = True
                self.manifest.raw_dim = int(raw.shape[1])
                self.manifest.dim = projection.out_dim(self.manifest.raw_dim)
                self.manifest.factory = index.factory
            self._save()

    def rebuild_index(self) -> None:
        """Rebuild the faiss index from the catalog's stored vectors (no model work)."""
        with self._writer:
            index = self._build_index(self.projection, self.active)
            with self._rw.write():
                self.index = index
                self.manifest.factory = index.factory

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
    ) -> ProductView:
        """Create or replace a product. ``images`` (if given) replace its images."""
        category = category.strip().strip("/")
        with self._writer:
            prepared = [self._prepare_image(source, fetch_policy, max_pixels) for source in images or []]
            raw = self.embedder.embed_images([p[4] for p in prepared]) if prepared else None
            with self._rw.write():
                with self.catalog.transaction():
                    self.catalog.upsert_product(product_id, title=title, category=category, attributes=attributes)
                    ids = [
                        self.catalog.put_image(product_id, src, sha, w, h, vector, model=self.active)
                        for (src, sha, w, h, _), vector in zip(prepared, raw if raw is not None else [])
                    ]
                    removed: list[int] = []
                    if images is not None:
                        removed = [row.id for row in self.catalog.images_of(product_id) if row.id not in ids]
                        self.catalog.remove_images(removed)
                if self.index is not None:
                    self.index.remove(np.array(removed, dtype=np.int64))
                if raw is not None:
                    self._add_raw(np.array(ids, dtype=np.int64), raw)
                self._categories = None
            if not self.manifest.projection_fitted:
                self.fit_projection()  # saves
            else:
                self._save()
        return self.product(product_id)

    def delete_product(self, product_id: str) -> None:
        if not self._product_exists(product_id):
            raise ProductNotFoundError(f"no product {product_id!r}")
        self.remove_products([product_id])

    def remove_products(self, product_ids: list[str]) -> int:
        """Delete products and their images; returns how many images went."""
        with self._writer:
            with self._rw.write():
                with self.catalog.transaction():
                    removed = self.catalog.remove_products(product_ids)
                if self.index is not None:
                    self.index.remove(np.array(removed, dtype=np.int64))
                self._categories = None
            self._save()
        return len(removed)

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
        """An image's bytes: the stored upload, the local file, or the URL."""
        stored = self.image_store.path(row.sha256)
        if stored is not None:
            return stored.read_bytes()
        if is_url(row.source):
            return fetch_url(row.source, fetch_policy)
        return read_source(row.source)

    def categories(self) -> list[dict[str, Any]]:
        """The category tree: ``name``, ``path``, ``products`` (with descendants), ``children``."""
        with self._rw.read():
            return category_tree(self.catalog.product_counts_by_category())

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Query vectors (query-side TTA per the model config), before projection."""
        return self.embedder.embed_images(list(images), tta=self.manifest.model.query_tta)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        if not self.has_text:
            raise ModelError(
                f"model {self.manifest.model.name!r} cannot search by text; build the index with an open_clip "
                "model such as --model ViT-B-32:laion2b_s34b_b79k"
            )
        return self.embedder.embed_text(list(texts))

    def product_vector(self, product_id: str) -> np.ndarray:
        """The mean raw vector of a product's images: the query for "more like this"."""
        with self._rw.read():
            vectors = self.catalog.vectors_of(product_id, model=self.active)
        if len(vectors) == 0:
            if not self._product_exists(product_id):
                raise ProductNotFoundError(f"no product {product_id!r}")
            raise ProductNotFoundError(f"product {product_id!r} has no searchable image")
        return vectors.mean(axis=0, keepdims=True)

    def load_query(self, image: QueryImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, bytes):
            return decode_image(image, "<upload>", max_pixels=max_pixels)
        source = os.fspath(image)
        return decode_image(read_source(source), source, max_pixels=max_pixels)

    def search(
        self,
        image: QueryImage,
        *,
        k: int = 10,
        categories: Sequence[str] | None = None,
        exclude_categories: Sequence[str] | None = None,
        group_by_product: bool = True,
    ) -> list[Hit]:
        """The catalog items most similar to ``image`` (bytes, path or PIL image)."""
        query = self.load_query(image)
        options = SearchOptions(
            k=k, categories=categories or (), exclude_categories=exclude_categories or (), group_by_product=group_by_product
        )
        return self.embed_and_search(lambda: self.embed_queries([query]), options, neighbours=0)[0][0]

    def embed_and_search(
        self,
        embed: Callable[[], np.ndarray],
        options: SearchOptions | None = None,
        timings: dict[str, float] | None = None,
        neighbours: int = 20,
        attempts: int = 3,
    ) -> tuple[list[list[Hit]], list[list[tuple[str, float]]]]:
        """:meth:`search_and_suggest` on the raw vectors ``embed()`` returns, calling it
        again if the model version switched in between (:class:`ModelChanged` after
        ``attempts`` switches in a row)."""
        switches = 0
        while True:
            epoch = self.epoch
            raw = embed()
            try:
                return self.search_and_suggest(raw, options, timings, neighbours, epoch=epoch)
            except ModelChanged:
                switches += 1
                if switches == attempts:
                    raise

    def search_vectors(
        self, raw: np.ndarray, options: SearchOptions | None = None, timings: dict[str, float] | None = None
    ) -> list[list[Hit]]:
        """Search with raw (unprojected) query vectors; one hit list per row.

        ``timings``, if given, receives the milliseconds spent in ``search`` (faiss)
        and ``lookup`` (catalog rows for the hits).
        """
        return self.search_and_suggest(raw, options, timings, neighbours=0)[0]

    def search_and_suggest(
        self,
        raw: np.ndarray,
        options: SearchOptions | None = None,
        timings: dict[str, float] | None = None,
        neighbours: int = 20,
        epoch: int | None = None,
    ) -> tuple[list[list[Hit]], list[list[tuple[str, float]]]]:
        """Hits, plus the categories the ``neighbours`` nearest images vote for.

        Without filters the vote comes from the same faiss search as the hits.
        ``epoch``: the :attr:`epoch` read before ``raw`` was computed; if the model
        version has changed since, :class:`ModelChanged` is raised instead of
        searching new vectors with an old query (or the reverse).
        """
        options = options or SearchOptions()
        timings = timings if timings is not None else {}
        want = options.k + options.offset
        with self._rw.read():
            if epoch is not None and epoch != self.epoch:
                raise ModelChanged(f"model version changed to {self.active!r}")
            if self.index is None or self.index.ntotal == 0:
                return [[] for _ in raw], [[] for _ in raw]
            xq = self.projection.apply(raw)
            blocks = self._blocks(options.categories, options.exclude_categories)
            ntotal = self.index.ntotal if blocks is None else sum(len(b) for b in blocks.values())
            k_img = min(ntotal, want * 4 if options.group_by_product or options.exclude_products else want)
            if blocks is None:
                k_img = min(ntotal, max(k_img, neighbours))
            votes: list[list[tuple[str, float]]] = [[] for _ in raw]
            while True:
                start = time.perf_counter()
                D, I = self.index.search(xq, k_img, blocks)
                middle = time.perf_counter()
                hits = [collect_hits(self.catalog, d, i, want, options) for d, i in zip(D, I)]
                if neighbours:
                    if blocks is not None:
                        I = self.index.search(xq, min(neighbours, self.index.ntotal))[1]
                    votes = [vote(self.catalog, row[:neighbours]) for row in I]
                timings["search"] = timings.get("search", 0.0) + (middle - start) * 1000
                timings["lookup"] = timings.get("lookup", 0.0) + (time.perf_counter() - middle) * 1000
                if all(len(h) >= want for h in hits) or k_img >= ntotal or self._past_min_score(D, options):
                    return [h[options.offset :] for h in hits], votes
                k_img = min(ntotal, k_img * 4)

    def search_regions(self, image: Image.Image, options: SearchOptions | None = None) -> list[Hit]:
        """Products ranked by their best-matching region of the photo.

        The whole photo (with query TTA) and overlapping windows at two scales, all
        from one forward pass, are each searched; a product scores its best region.
        For cluttered photos where the product fills only part of the frame.
        """
        options = options or SearchOptions()
        boxes = region_boxes()
        raw = np.concatenate([self.embed_queries([image]), self.embedder.embed_regions(image, boxes[1:])])
        wide = replace(options, k=options.k + options.offset, offset=0, group_by_product=True)
        best: dict[str, Hit] = {}
        for row in self.search_vectors(raw, wide):
            for hit in row:
                if hit.product_id not in best or hit.score > best[hit.product_id].score:
                    best[hit.product_id] = hit
        ranked = sorted(best.values(), key=lambda h: -h.score)
        return ranked[options.offset : options.offset + options.k]

    def suggest(self, raw: np.ndarray, neighbours: int = 20) -> list[list[tuple[str, float]]]:
        """Categories the query's nearest neighbours vote for, with their share."""
        return self.search_and_suggest(raw, SearchOptions(k=1), neighbours=neighbours)[1]

    def info(self) -> dict[str, Any]:
        with self._rw.read():
            counts = self.catalog.counts()
            vectors = self.index.ntotal if self.index is not None else 0
        return {
            "path": str(self.paths.root),
            **counts,
            "vectors": vectors,
            "model": self.manifest.model.name,
            "active_model": self.active,
            "layers": list(self.manifest.model.layers),
            "pooling": list(self.manifest.model.poolings),
            "dim": self.manifest.dim,
            "factory": self.manifest.factory,
            "projection": {**self.manifest.projection.__dict__, "fitted_on": self.projection.fitted_on}
            if self.active == BASE_MODEL
            else f"part of model version {self.active} (its zero-shot half)",
            "text_search": self.has_text,
            "format_version": self.manifest.format_version,
        }

    # internals ----------------------------------------------------------------
    def _load_index(self, mmap: bool) -> None:
        m = self.manifest
        if not m.projection_fitted:
            return
        saved = self._saved_index(m, mmap)
        if saved is not None:
            self.index = saved
        else:  # a run stopped between the catalog commit and the index save
            self.rebuild_index()
            self._save()

    def _saved_index(self, manifest: IndexManifest, mmap: bool = False) -> VectorIndex | None:
        """The saved index file, if ``manifest`` says it matches the catalog; else None."""
        if manifest.catalog_generation != self.catalog.generation or not self.paths.index.exists():
            return None
        index = VectorIndex.load(self.paths.index, manifest.factory, nprobe=manifest.index.nprobe, mmap=mmap)
        index.to_gpu()
        return index

    def _build_index(self, projection: Projection, model: str) -> VectorIndex:
        n = self.catalog.counts()["images"]
        dim = projection.out_dim(self.catalog.vector_dim(model) or self.manifest.raw_dim)
        factory = self.manifest.index.factory or choose_factory(n, dim)
        index = VectorIndex.create(factory, dim, nprobe=self.manifest.index.nprobe)
        if not index.is_trained:
            index.train(projection.apply(self.catalog.sample_vectors(FIT_SAMPLE, model=model)))
        for ids, raw in self.catalog.iter_vectors(model=model):
            index.add(ids, projection.apply(raw))
        index.to_gpu()
        return index

    def _remove_ids(self, ids: np.ndarray) -> None:
        if self.index is not None:
            self.index.remove(ids)
        self._categories = None

    def _add_raw(self, ids: np.ndarray, raw: np.ndarray) -> None:
        if self.index is not None and self.manifest.projection_fitted:
            self.index.add(ids, self.projection.apply(raw))

    def _save(self) -> None:
        with self._rw.read():  # saving only reads the index; searches may go on
            if self.index is not None:
                self.index.save(self.paths.index)
            counts = self.catalog.counts()
            self.manifest.counts = {**counts, "vectors": self.index.ntotal if self.index is not None else 0}
            self.manifest.catalog_generation = self.catalog.generation if self.index is not None else -1
            self.manifest.save(self.paths)

    def _factory_outgrown(self) -> bool:
        if self.manifest.index.factory or self.index is None:
            return False
        return choose_factory(self.index.ntotal, self.manifest.dim) != self.manifest.factory

    def _product_exists(self, product_id: str) -> bool:
        try:
            self.catalog.product(product_id)
        except ProductNotFoundError:
            return False
        return True

    def _prepare_image(self, source: ImageSource, policy: FetchPolicy, max_pixels: int) -> tuple[str, str, int, int, Image.Image]:
        """(source, sha256, width, height, image) for an upload, a URL or a path."""
        if isinstance(source, bytes):
            data, label = source, "<upload>"
        elif is_url(source):
            data, label = fetch_url(source, policy), source
        else:
            data, label = read_source(source), source
        image = decode_image(data, label, max_pixels=max_pixels)
        sha = sha256_bytes(data)
        if isinstance(source, bytes):
            label = str(self.image_store.put(data, sha))  # uploads live in the index directory
        elif is_url(source):
            self.image_store.put(data, sha)  # a local copy for thumbnails; the URL stays the source
        return label, sha, image.width, image.height, image

    def _embed_sources(self, sources: list[str], *, tta: bool) -> np.ndarray:
        """Raw vectors of readable images among ``sources``; unreadable ones are skipped."""
        vectors = []
        for start in range(0, len(sources), 32):
            images = []
            for source in sources[start : start + 32]:
                try:
                    images.append(self.load_query(source))
                except ImageError:
                    continue
            if images:
                vectors.append(self.embedder.embed_images(images, tta=tta))
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def _blocks(self, categories: Sequence[str], exclude: Sequence[str]) -> dict[object, np.ndarray] | None:
        if (categories or exclude) and self._categories is None:
            self._categories = self.catalog.category_image_ids()
        return category_blocks(self._categories or {}, categories, exclude)

    def _past_min_score(self, D: np.ndarray, options: SearchOptions) -> bool:
        return options.min_score is not None and bool((D[:, -1] < options.min_score).all())


def _describe(model: ModelConfig) -> str:
    return f"(layers {','.join(model.layers)}, pooling {','.join(model.poolings)})"
