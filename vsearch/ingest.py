"""Ingestion: items -> catalog rows with raw vectors -> index, through the write path.

Crash safety comes from ordering: each batch of vectors is committed to the catalog
in one SQLite transaction (with the matching index change), and the faiss index and
manifest are written atomically afterwards. A run killed at any point leaves a
consistent catalog; the next open sees that the index lags the catalog's generation
and rebuilds it from the stored vectors, and the next ingest skips every image whose
content hash is already there.

:func:`embed_batches` is the load -> embed -> commit loop that ingestion and
re-embedding with a model version (:mod:`vsearch.versions`) share.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from .embed import LoadedImage, Preprocess, load_images, pick_device
from .fsutil import atomic_write_bytes
from .images import is_url
from .snapshot import EmbedderSlot
from .sources import Item, read_source_items
from .writer import NewImage

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["IngestReport", "Reject", "embed_batches", "ingest"]


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


Work = tuple[object, str, str]  # (key, source, known sha256: "" for none)


def embed_batches(
    work: Sequence[Work],
    embedder: EmbedderSlot,
    preprocess: Preprocess,
    *,
    commit: Callable[[list[LoadedImage], np.ndarray], None],
    skip: Callable[[LoadedImage], None],
    checkpoint: Callable[[], None] = lambda: None,
    checkpoint_every_s: float = 30.0,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    desc: str = "ingest",
    quiet: bool = False,
) -> None:
    """Decode ``work`` a batch at a time (ahead of the model, see :func:`load_images`),
    embed what decoded and changed, and hand it to ``commit(loaded, raw_vectors)``;
    unreadable or unchanged sources go to ``skip``. The model is loaded only when a
    batch needs it. ``checkpoint()`` runs every ``checkpoint_every_s`` seconds."""
    if not work:
        return
    bar = tqdm(total=len(work), unit="img", desc=desc, disable=quiet or not sys.stderr.isatty(), smoothing=0.1)
    last_checkpoint = time.monotonic()
    for batch in load_images(work, preprocess, batch_size=batch_size, workers=workers, device=device):
        todo = [loaded for loaded in batch if loaded.tensor is not None and not loaded.error and not loaded.unchanged]
        for loaded in batch:
            if loaded.tensor is None or loaded.error or loaded.unchanged:
                skip(loaded)
        if todo:
            tensors = torch.stack([loaded.tensor for loaded in todo if loaded.tensor is not None])
            commit(todo, embedder.get().embed_tensor(tensors))
        bar.update(len(batch))
        if time.monotonic() - last_checkpoint > checkpoint_every_s:
            checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()


def ingest(
    engine: Engine,
    source: str | os.PathLike[str] | Sequence[Item],
    *,
    prune: bool = False,
    center_on: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    quiet: bool = False,
) -> IngestReport:
    """Bring ``engine``'s catalog in line with ``source`` (folder, CSV, JSONL or items).

    A re-run over unchanged images loads no model at all. With ``center_on`` (or on
    the first ingest) the projection is fitted afterwards and the index rebuilt.
    """
    items = read_source_items(source) if isinstance(source, (str, os.PathLike)) else list(source)
    start = time.perf_counter()
    report = IngestReport(items=len(items))
    unique: dict[tuple[str, str], Item] = {}
    for item in items:
        unique[(item.product_id, item.image)] = item
    report.duplicates = len(items) - len(unique)
    ordered = list(unique.values())

    with engine.writer() as writer:
        writer.upsert_products(ordered)
        work = _work(engine, ordered, report)

        def commit(loaded: list[LoadedImage], vectors: np.ndarray) -> None:
            images = [NewImage(ordered[_n(x)].product_id, ordered[_n(x)].image, x.sha256, x.width, x.height) for x in loaded]
            writer.add_images(images, vectors)
            report.embedded += len(loaded)

        def skip(loaded: LoadedImage) -> None:
            if loaded.error:
                item = ordered[_n(loaded)]
                report.rejected.append(Reject(item.product_id, item.image, loaded.error))
            else:
                report.unchanged += 1

        embed_batches(
            work,
            writer.snapshot.embedder,
            engine.preprocess,
            commit=commit,
            skip=skip,
            checkpoint=writer.save,
            batch_size=batch_size,
            workers=workers,
            device=pick_device(engine.device),
            quiet=quiet,
        )
        if prune:
            report.removed_products, report.removed_image_ids = writer.prune(set(unique))
            report.removed_images = len(report.removed_image_ids)
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in report.rejected)
        atomic_write_bytes(engine.paths.rejects, lines.encode())
        report.seconds = time.perf_counter() - start
        if center_on is not None:
            engine.fit_projection(center_on)
        else:
            writer.finish()
    return report


def _work(engine: Engine, ordered: list[Item], report: IngestReport) -> list[Work]:
    """What may need embedding: each item with the content hash the catalog knows
    (decoding skips an unchanged file); a known URL is not fetched again."""
    work: list[Work] = []
    for n, item in enumerate(ordered):
        row = engine.catalog.image(item.product_id, item.image)
        if row is not None and is_url(item.image):
            report.unchanged += 1  # pass a new URL to refresh an image
            continue
        work.append((n, item.image, row.sha256 if row is not None else ""))
    return work


def _n(loaded: LoadedImage) -> int:
    return int(loaded.key)  # type: ignore[call-overload]
