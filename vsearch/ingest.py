"""Ingestion: items -> catalog rows with raw vectors -> index.

Crash safety comes from ordering: each batch of vectors is committed to the catalog
in one SQLite transaction, and the faiss index and manifest are written atomically
afterwards. A run killed at any point leaves a consistent catalog; the next open
sees that the index lags the catalog's generation and rebuilds it from the stored
vectors, and the next ingest skips every image whose content hash is already there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .catalog import BASE_MODEL, Catalog
from .embed import Embedder, LoadedImage, Preprocess, load_images
from .fsutil import atomic_write_bytes
from .images import is_url
from .sources import Item

__all__ = ["IngestReport", "Reject", "ingest_items"]


@dataclass(frozen=True)
class Reject:
    product_id: str
    source: str
    reason: str


@dataclass
class IngestReport:
    items: int = 0
    embedded: int = 0
    unchanged: int = 0
    rejected: list[Reject] = field(default_factory=list)
    removed_products: int = 0
    removed_images: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    removed_image_ids: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "items": self.items,
            "embedded": self.embedded,
            "unchanged": self.unchanged,
            "rejected": len(self.rejected),
            "removed_products": self.removed_products,
            "removed_images": self.removed_images,
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "rejects": [r.__dict__ for r in self.rejected],
        }


OnBatch = Callable[[np.ndarray, np.ndarray], None]


def ingest_items(
    catalog: Catalog,
    preprocess: Preprocess,
    get_embedder: Callable[[], Embedder],
    items: list[Item],
    *,
    on_batch: OnBatch,
    checkpoint: Callable[[], None],
    on_remove: Callable[[np.ndarray], None] = lambda ids: None,
    apply_lock: Callable[[], AbstractContextManager[None]] = nullcontext,
    prune: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    quiet: bool = False,
    checkpoint_every_s: float = 30.0,
    rejects_path: Path | None = None,
    model: str = BASE_MODEL,
) -> IngestReport:
    """Bring the catalog in line with ``items``.

    The model is fetched through ``get_embedder`` only when some image needs it, so a
    re-run over unchanged images loads no model at all. ``on_batch(ids, raw_vectors)``
    is called after each committed batch (the engine adds them to its index);
    ``checkpoint()`` persists the index now and then.
    """
    start = time.perf_counter()
    report = IngestReport(items=len(items))
    unique: dict[tuple[str, str], Item] = {}
    for item in items:
        unique[(item.product_id, item.image)] = item
    report.duplicates = len(items) - len(unique)

    with apply_lock(), catalog.transaction():
        for item in unique.values():
            catalog.upsert_product(item.product_id, title=item.title, category=item.category, attributes=item.attributes)

    ordered = list(unique.values())
    work: list[tuple[object, str, str]] = []
    for n, item in enumerate(ordered):
        row = catalog.image(item.product_id, item.image)
        if row is not None and is_url(item.image):
            report.unchanged += 1  # URLs are not re-downloaded to check; pass a new URL to refresh
            continue
        work.append((n, item.image, row.sha256 if row is not None else ""))

    if work:
        bar = tqdm(total=len(work), unit="img", desc="ingest", disable=quiet or not sys.stderr.isatty(), smoothing=0.1)
        last_checkpoint = time.monotonic()
        for batch in load_images(work, preprocess, batch_size=batch_size, workers=workers, device=device):
            todo: list[LoadedImage] = []
            for loaded in batch:
                item = ordered[int(loaded.key)]  # type: ignore[call-overload]
                if loaded.error:
                    report.rejected.append(Reject(item.product_id, item.image, loaded.error))
                elif loaded.unchanged:
                    report.unchanged += 1
                else:
                    todo.append(loaded)
            if todo:
                vectors = get_embedder().embed_tensor(torch.stack([t.tensor for t in todo if t.tensor is not None]))
                ids = []
                with apply_lock():  # searches see the catalog rows and the vectors together
                    with catalog.transaction():
                        for loaded, vector in zip(todo, vectors):
                            item = ordered[int(loaded.key)]  # type: ignore[call-overload]
                            ids.append(
                                catalog.put_image(
                                    item.product_id, item.image, loaded.sha256, loaded.width, loaded.height, vector, model=model
                                )
                            )
                    on_batch(np.array(ids, dtype=np.int64), vectors)
                report.embedded += len(todo)
            bar.update(len(batch))
            if time.monotonic() - last_checkpoint > checkpoint_every_s:
                checkpoint()
                last_checkpoint = time.monotonic()
        bar.close()

    if prune:
        with apply_lock():
            report.removed_products, report.removed_image_ids = _prune(catalog, unique)
            on_remove(np.array(report.removed_image_ids, dtype=np.int64))
        report.removed_images = len(report.removed_image_ids)
    if rejects_path is not None:
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in report.rejected)
        atomic_write_bytes(rejects_path, lines.encode())
    report.seconds = time.perf_counter() - start
    return report


def _prune(catalog: Catalog, unique: dict[tuple[str, str], Item]) -> tuple[int, list[int]]:
    """Remove products the items do not list, and images their products no longer list."""
    listed_products = {pid for pid, _ in unique}
    stale_products = sorted(catalog.product_ids() - listed_products)
    with catalog.transaction():
        removed_images = catalog.remove_products(stale_products)
        stale_images = [row.id for pid in listed_products for row in catalog.images_of(pid) if (pid, row.source) not in unique]
        catalog.remove_images(stale_images)
    return len(stale_products), removed_images + stale_images
