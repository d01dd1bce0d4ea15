"""Ingestion: items -> catalog rows with raw vectors -> index, through the write path.

Crash safety comes from ordering: each batch of vectors is committed to the catalog
in one SQLite transaction (with the matching index change), and the faiss index and
manifest are written atomically afterwards. A run killed at any point leaves a
consistent catalog; the next open sees that the index lags the catalog's generation
and rebuilds it from the stored vectors, and the next ingest skips every image whose
content hash is already there.

:func:`embed_batches` is the load -> embed -> commit loop that ingestion and
re-embedding with a model version (:mod:`vsearch.versions`) share.

A product is created (or, when it has no image yet, updated) only in the batch that
stores its first image, in the same transaction: a manifest row whose image cannot be
read is a reject, never an image-less product on the page. Rows that share a product id are more images of
one product; the report counts them and says where their titles or categories
disagree (:func:`merge_products` decides which value wins).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .embed import LoadedImage, Preprocess, load_images, pick_device
from .fsutil import atomic_write_bytes
from .images import is_url
from .snapshot import EmbedderSlot
from .sources import Item, read_source_items
from .writer import IndexWriter, NewImage

if TYPE_CHECKING:
    from .engine import Engine

__all__ = [
    "IngestReport",
    "Reject",
    "embed_batches",
    "ingest",
    "merge_products",
    "printable",
    "storable_items",
    "unique_items",
    "update_known_products",
    "work_list",
]


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
    duplicates: int = 0  # rows repeating an earlier row's product id *and* image: ignored
    shared_id_rows: int = 0  # rows whose product id an earlier row had, with another image
    shared_id_products: int = 0  # the products those rows belong to
    disagreements: dict[str, list[str]] = field(default_factory=dict)  # product id -> fields its rows disagree on
    products_skipped: list[str] = field(default_factory=list)  # none of their images stored: not created
    seconds: float = 0.0
    removed_image_ids: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> bool:
        """Every row was rejected: the run stored nothing and found nothing unchanged."""
        return bool(self.rejected) and self.embedded == 0 and self.unchanged == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "items": self.items,
            "embedded": self.embedded,
            "unchanged": self.unchanged,
            "rejected": len(self.rejected),
            "removed_products": self.removed_products,
            "removed_images": self.removed_images,
            "duplicates": self.duplicates,
            "shared_id_rows": self.shared_id_rows,
            "shared_id_products": self.shared_id_products,
            "disagreements": self.disagreements,
            "products_skipped": len(self.products_skipped),
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
    Rows that cannot be used are listed in ``rejects.jsonl`` and the report; a product
    none of whose images could be stored is not created (``report.products_skipped``).
    """
    items = read_source_items(source) if isinstance(source, (str, os.PathLike)) else list(source)
    start = time.perf_counter()
    report = IngestReport(items=len(items))
    ordered = unique_items(storable_items(items, report), report)
    products = merge_products(ordered, report)

    with engine.writer() as writer:
        pending = update_known_products(engine, writer, products)
        work = work_list(engine, ordered, report)

        def commit(loaded: list[LoadedImage], vectors: np.ndarray) -> None:
            images = [
                NewImage(ordered[_n(x)].product_id, ordered[_n(x)].image, x.sha256, x.width, x.height, x.phash) for x in loaded
            ]
            new = [products[pid] for pid in dict.fromkeys(i.product_id for i in images) if pid in pending]
            writer.add_images(images, vectors, products=new)  # new: these products' first stored images
            pending.difference_update(p.product_id for p in new)
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
        report.products_skipped = sorted(pending)
        if prune:
            report.removed_products, report.removed_image_ids = writer.prune({(i.product_id, i.image) for i in ordered})
            report.removed_images = len(report.removed_image_ids)
        lines = "".join(json.dumps(r.__dict__) + "\n" for r in report.rejected)
        atomic_write_bytes(engine.paths.rejects, lines.encode())
        report.seconds = time.perf_counter() - start
        if center_on is not None:
            engine.fit_projection(center_on)
        else:
            writer.finish()
    return report


def storable_items(items: list[Item], report: IngestReport) -> list[Item]:
    """The items whose text SQLite can store; the others become rejects.

    A file name that is not UTF-8 reaches us as a str with lone surrogates
    (``os.fsdecode``), as does a JSON ``"\\udce9"`` escape; the catalog cannot store
    such text, and one of them used to abort the whole run."""
    kept = []
    for item in items:
        reason = _unstorable(item)
        if reason is None:
            kept.append(item)
        else:
            report.rejected.append(Reject(printable(item.product_id), printable(item.image), reason))
    return kept


def _unstorable(item: Item) -> str | None:
    """Why ``item`` cannot be stored (its first field that is not valid Unicode), or None."""
    if not _encodes(item.image):
        if is_url(item.image):
            return "image URL is not valid Unicode text; fix the manifest"
        folder, name = os.path.split(item.image)
        if _encodes(name):
            return f"folder name {printable(folder)} is not valid UTF-8; rename the folder"
        return f"file name {printable(name)} is not valid UTF-8; rename the file"
    fields: dict[str, Any] = {"id": item.product_id, "title": item.title, "category": item.category}
    fields.update({f"attribute {printable(k)!r}": v for k, v in (item.attributes or {}).items()})
    for name, value in fields.items():
        if not _encodes(name) or not _encodes(json.dumps(value, ensure_ascii=False, default=str)):
            return f"{name} {printable(str(value))} is not valid Unicode text (a lone surrogate); fix the manifest"
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name shown as ``\\xNN`` (other lone
    surrogates as ``\\uNNNN``), so a reject can name the file on any terminal."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unique_items(items: list[Item], report: IngestReport) -> list[Item]:
    """``items`` without rows that repeat an earlier row's product id and image."""
    unique: dict[tuple[str, str], Item] = {}
    for item in items:
        unique[(item.product_id, item.image)] = item
    report.duplicates = len(items) - len(unique)
    return list(unique.values())


def merge_products(items: Sequence[Item], report: IngestReport | None = None) -> dict[str, Item]:
    """One item per product id, its fields merged from every row with that id.

    Several rows with one id are several images of one product (legitimate for
    multi-image products), so they must agree on one title, category and attributes:
    for each field the last row that gives a non-empty value wins (a later row's empty
    cell does not erase an earlier row's title), which is what a later row updating
    the product would have done. ``report`` counts such rows and names the fields on
    which their non-empty values disagree."""
    rows: dict[str, list[Item]] = {}
    for item in items:
        rows.setdefault(item.product_id, []).append(item)
    merged: dict[str, Item] = {}
    for pid, group in rows.items():
        conflicts: list[str] = []
        title = _pick([i.title for i in group], "title", conflicts)
        category = _pick([i.category for i in group], "category", conflicts)
        attributes = _merge_attributes(group, conflicts)
        merged[pid] = Item(pid, group[-1].image, category=category, title=title, attributes=attributes)
        if report is not None and len(group) > 1:
            report.shared_id_rows += len(group) - 1
            report.shared_id_products += 1
            if conflicts:
                report.disagreements[pid] = conflicts
    return merged


def _merge_attributes(group: list[Item], conflicts: list[str]) -> dict[str, Any] | None:
    if all(i.attributes is None for i in group):
        return None  # no row gives attributes: keep the catalog's
    keys = dict.fromkeys(k for i in group for k in (i.attributes or {}))
    merged = {k: _pick([(i.attributes or {}).get(k) for i in group], k, conflicts) for k in keys}
    return {k: v for k, v in merged.items() if v is not None}


def _pick(values: list[Any], name: str, conflicts: list[str]) -> Any:
    """The last non-empty of ``values`` (None: not given; "": given empty); notes
    ``name`` in ``conflicts`` when the non-empty values differ."""
    given = [v for v in values if v is not None]
    filled = [v for v in given if v != ""]
    if any(v != filled[-1] for v in filled):
        conflicts.append(name)
    if filled:
        return filled[-1]
    return given[-1] if given else None


def update_known_products(engine: Engine, writer: IndexWriter, products: dict[str, Item]) -> set[str]:
    """Update the products that already have images now; return the others' ids, which
    are created (or updated) with their first stored image and not at all if none is."""
    known = [item for pid, item in products.items() if engine.catalog.images_of(pid)]
    if known:
        writer.upsert_products(known)
    return set(products) - {item.product_id for item in known}


def work_list(engine: Engine, ordered: list[Item], report: IngestReport) -> list[Work]:
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
