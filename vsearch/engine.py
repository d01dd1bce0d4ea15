"""The engine: one object that owns an index directory and answers every request.

The CLI and the API are thin adapters over these methods.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .catalog import Catalog
from .config import IndexConfig, ModelConfig, ProjectionConfig, resolve_model
from .embed import Embedder, Preprocess, pick_device
from .errors import FilterError, ImageError, IndexFormatError, IndexNotFoundError, VsearchError
from .images import DEFAULT_MAX_PIXELS, decode_image, read_source
from .index import VectorIndex, choose_factory
from .ingest import IngestReport, ingest_items
from .manifest import IndexManifest, IndexPaths
from .projection import Projection
from .sources import Item, read_source_items

__all__ = ["Engine", "Hit", "DEFAULT_MODEL"]

DEFAULT_MODEL = "efficientnet-lite2"
FIT_SAMPLE = 100_000  # vectors used to fit the projection and train IVF quantizers
QueryImage = bytes | str | os.PathLike[str] | Image.Image


@dataclass(frozen=True)
class Hit:
    product_id: str
    image_id: int
    score: float
    title: str
    category: str
    attributes: dict[str, Any]
    image: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "score": round(self.score, 6)}


class Engine:
    """An open index directory. Use :meth:`open` and :meth:`close` (or ``with``)."""

    def __init__(self, paths: IndexPaths, manifest: IndexManifest, catalog: Catalog, device: str | None) -> None:
        self.paths = paths
        self.manifest = manifest
        self.catalog = catalog
        self.device = device
        self.projection = Projection.load(paths.projection)
        self.preprocess = Preprocess(manifest.model)
        self.index: VectorIndex | None = None
        self._embedder: Embedder | None = None
        self._categories: dict[str, np.ndarray] | None = None
        self._lock = threading.RLock()

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
        if self._embedder is None:
            self._embedder = Embedder(self.manifest.model, device=self.device)
            if not self.manifest.raw_dim:
                self.manifest.raw_dim = self._embedder.dim
        return self._embedder

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
        with self._lock:
            report = ingest_items(
                self.catalog,
                self.preprocess,
                lambda: self.embedder,
                items,
                on_batch=self._add_raw,
                checkpoint=self._save,
                prune=prune,
                batch_size=batch_size,
                workers=workers,
                device=pick_device(self.device),
                quiet=quiet,
                rejects_path=self.paths.rejects,
            )
            if self.index is not None and report.removed_image_ids:
                self.index.remove(np.array(report.removed_image_ids))
            self._categories = None
            if center_on is not None or not self.manifest.projection_fitted:
                self.fit_projection(center_on)
            elif self._factory_outgrown():
                self.rebuild_index()
            self._save()
        return report

    def fit_projection(self, center_on: str | os.PathLike[str] | None = None) -> None:
        """Fit centring/PCA (on in-domain photos if given, else the catalog) and rebuild the index."""
        if center_on is not None:
            sources = [item.image for item in read_source_items(center_on)]
            raw = self._embed_sources(sources, tta=self.manifest.model.query_tta)
        else:
            raw = self.catalog.sample_vectors(FIT_SAMPLE)
        if len(raw) == 0:
            return
        self.projection = Projection.fit(raw, self.manifest.projection)
        self.projection.save(self.paths.projection)
        self.manifest.projection_fitted = True
        self.manifest.raw_dim = int(raw.shape[1])
        self.manifest.dim = self.projection.out_dim(self.manifest.raw_dim)
        self.rebuild_index()
        self._save()

    def rebuild_index(self) -> None:
        """Rebuild the faiss index from the catalog's stored vectors (no model work)."""
        n = self.catalog.counts()["images"]
        dim = self.manifest.dim
        factory = self.manifest.index.factory or choose_factory(n, dim)
        index = VectorIndex.create(factory, dim, nprobe=self.manifest.index.nprobe)
        if not index.is_trained:
            index.train(self.projection.apply(self.catalog.sample_vectors(FIT_SAMPLE)))
        for ids, raw in self.catalog.iter_vectors():
            index.add(ids, self.projection.apply(raw))
        index.to_gpu()
        self.index = index
        self.manifest.factory = factory

    def remove_products(self, product_ids: list[str]) -> int:
        with self._lock, self.catalog.transaction():
            removed = self.catalog.remove_products(product_ids)
        if self.index is not None:
            self.index.remove(np.array(removed, dtype=np.int64))
        self._categories = None
        self._save()
        return len(removed)

    # reading ------------------------------------------------------------------
    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Query vectors (query-side TTA per the model config), before projection."""
        return self.embedder.embed_images(list(images), tta=self.manifest.model.query_tta)

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
        raw = self.embed_queries([self.load_query(image)])
        return self.search_vectors(
            raw, k=k, categories=categories, exclude_categories=exclude_categories, group_by_product=group_by_product
        )[0]

    def load_query(self, image: QueryImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, bytes):
            return decode_image(image, "<upload>", max_pixels=max_pixels)
        source = os.fspath(image)
        return decode_image(read_source(source), source, max_pixels=max_pixels)

    def search_vectors(
        self,
        raw: np.ndarray,
        *,
        k: int = 10,
        categories: Sequence[str] | None = None,
        exclude_categories: Sequence[str] | None = None,
        group_by_product: bool = True,
    ) -> list[list[Hit]]:
        """Search with raw (unprojected) query vectors; one hit list per row."""
        if k < 1:
            raise VsearchError("k must be at least 1")
        with self._lock:
            if self.index is None or self.index.ntotal == 0:
                return [[] for _ in range(len(raw))]
            xq = self.projection.apply(raw)
            blocks = self._blocks(categories, exclude_categories)
            ntotal = self.index.ntotal if blocks is None else sum(len(b) for b in blocks.values())
            k_img = min(ntotal, k * 4 if group_by_product else k)
            while True:
                D, I = self.index.search(xq, k_img, blocks)
                hits = [self._hits(d, i, k, group_by_product) for d, i in zip(D, I)]
                if all(len(h) >= k for h in hits) or k_img >= ntotal:
                    return hits
                k_img = min(ntotal, k_img * 4)

    def info(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        return {
            "path": str(self.paths.root),
            **counts,
            "vectors": self.index.ntotal if self.index is not None else 0,
            "model": self.manifest.model.name,
            "layers": list(self.manifest.model.layers),
            "pooling": list(self.manifest.model.poolings),
            "dim": self.manifest.dim,
            "factory": self.manifest.factory,
            "projection": {**self.manifest.projection.__dict__, "fitted_on": self.projection.fitted_on},
            "format_version": self.manifest.format_version,
        }

    # internals ----------------------------------------------------------------
    def _load_index(self, mmap: bool) -> None:
        m = self.manifest
        if not m.projection_fitted:
            return
        fresh = m.catalog_generation == self.catalog.generation and self.paths.index.exists()
        if fresh:
            self.index = VectorIndex.load(self.paths.index, m.factory, nprobe=m.index.nprobe, mmap=mmap)
            self.index.to_gpu()
        else:  # a run stopped between the catalog commit and the index save
            self.rebuild_index()
            self._save()

    def _add_raw(self, ids: np.ndarray, raw: np.ndarray) -> None:
        if self.index is not None and self.manifest.projection_fitted:
            self.index.add(ids, self.projection.apply(raw))

    def _save(self) -> None:
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

    def _embed_sources(self, sources: list[str], *, tta: bool) -> np.ndarray:
        """Raw vectors of readable images among ``sources``; unreadable ones are skipped."""
        vectors = []
        for start in range(0, len(sources), 32):
            images = []
            for source in sources[start : start + 32]:
                try:
                    images.append(decode_image(read_source(source), source))
                except ImageError:
                    continue
            if images:
                vectors.append(self.embedder.embed_images(images, tta=tta))
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def _blocks(self, categories: Sequence[str] | None, exclude: Sequence[str] | None) -> dict[object, np.ndarray] | None:
        if not categories and not exclude:
            return None
        if self._categories is None:
            self._categories = self.catalog.category_image_ids()
        leaves = self._categories
        chosen = set(leaves)
        if categories:
            chosen = {c for c in leaves if any(_matches(c, p) for p in categories)}
            unknown = [p for p in categories if not any(_matches(c, p) for c in leaves)]
            if unknown:
                raise FilterError(f"no category matches {', '.join(map(repr, unknown))}")
        if exclude:
            chosen = {c for c in chosen if not any(_matches(c, p) for p in exclude)}
        return {c: leaves[c] for c in sorted(chosen)}

    def _hits(self, D: np.ndarray, I: np.ndarray, k: int, group: bool) -> list[Hit]:
        valid = [(float(d), int(i)) for d, i in zip(D, I) if i >= 0]
        owners = self.catalog.image_products([i for _, i in valid])
        picked: list[tuple[float, int, str]] = []
        seen: set[str] = set()
        for score, image_id in valid:
            product_id = owners.get(image_id)
            if product_id is None or (group and product_id in seen):
                continue
            seen.add(product_id)
            picked.append((score, image_id, product_id))
            if len(picked) == k:
                break
        products = self.catalog.products([p for _, _, p in picked])
        hits = []
        for score, image_id, product_id in picked:
            product = products[product_id]
            row = self.catalog.image_by_id(image_id)
            hits.append(
                Hit(product_id, image_id, score, product.title, product.category, product.attributes, row.source if row else "")
            )
        return hits


def _describe(model: ModelConfig) -> str:
    return f"(layers {','.join(model.layers)}, pooling {','.join(model.poolings)})"


def _matches(category: str, pattern: str) -> bool:
    pattern = pattern.strip("/")
    return bool(pattern) and (category == pattern or category.startswith(pattern + "/"))
