"""Fine-tuning's input: labelled photos checked against the catalog, split into
training and validation photos, plus catalog images to validate against.

Two levels of label: ``(photo, product_id)`` pairs teach the model to tell
products apart (validated by product Recall@1 against the products' catalog
images); ``(photo, category)`` pairs teach it what makes a category ("more dresses
like this"), validated by category precision@10 against a seeded sample of the
catalog's images of those categories."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from .categories import matches_category
from .config import FinetuneConfig
from .errors import ImageError, TrainingDataError
from .images import decode_image, read_source
from .sources import Item

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Level", "TrainingData", "GALLERY_PER_CATEGORY", "load_image", "prepare"]

Level = Literal["product", "category"]
GALLERY_PER_CATEGORY = 200  # catalog images per category that class-level validation searches


@dataclass
class TrainingData:
    train: list[tuple[str, str]]  # (image source, label: product id or category)
    val: list[tuple[str, str]]
    gallery: list[tuple[bytes, str]]  # catalog images: (bytes, label)
    products: list[str]  # the labels, in the order of their proxies
    stats: dict[str, Any]
    warnings: list[str]
    level: Level = "product"


def load_image(source: str | bytes) -> Image.Image:
    """A photo (path or URL) or a catalog image's bytes, decoded."""
    if isinstance(source, bytes):
        return decode_image(source, "<catalog image>")
    return decode_image(read_source(source), source)


def pairs_level(items: list[Item]) -> Level:
    """Class level when no pair names a product (``image,category`` files)."""
    return "category" if items and all(not it.product_id and it.category for it in items) else "product"


def prepare(engine: Engine, items: list[Item], config: FinetuneConfig) -> TrainingData:
    """Check the pairs against the catalog, split photos into train/validation."""
    if pairs_level(items) == "category":
        return _prepare_categories(engine, items, config)
    known = engine.catalog.product_ids()
    warnings: list[str] = []
    unknown = [it for it in items if it.product_id not in known]
    if unknown:
        sample = ", ".join(sorted({it.product_id for it in unknown})[:5])
        warnings.append(f"{len(unknown)} of {len(items)} pairs name products not in the catalog (e.g. {sample}); skipped")
    readable, unreadable = _readable(sorted({(it.image, it.product_id) for it in items if it.product_id in known}))
    if unreadable:
        warnings.append(f"{unreadable} photos could not be read; skipped")
    if not readable:
        hint = f" (the index's product ids look like: {', '.join(sorted(known)[:3])})" if known and unknown else ""
        raise TrainingDataError(
            f"no usable pairs: {len(items)} given, {len(unknown)} unknown products, {unreadable} unreadable{hint}"
        )
    by_product: dict[str, list[str]] = {}
    for source, pid in readable:
        by_product.setdefault(pid, []).append(source)
    products = sorted(by_product)
    gallery = _gallery(engine, products)
    if len(products) < 2:
        raise TrainingDataError(f"photos of at least 2 products are needed to learn to tell them apart, got {len(products)}")
    single = sum(1 for v in by_product.values() if len(v) < 2)
    if single:
        warnings.append(f"{single} products have a single photo: they train but cannot be validated")
    without_gallery = len(set(products) - {pid for _, pid in gallery})
    if without_gallery:
        warnings.append(f"{without_gallery} products have no readable catalog image; their photos train only their proxy")
    train, val = _split(readable, by_product, config)
    stats = {
        "pairs": len(items),
        "unknown_product_pairs": len(unknown),
        "unreadable_photos": unreadable,
        "products": len(products),
        "train_photos": len(train),
        "val_photos": len(val),
        "catalog_images": len(gallery),
        "single_photo_products": single,
    }
    return TrainingData(sorted(train), sorted(val), gallery, products, stats, warnings)


def _prepare_categories(engine: Engine, items: list[Item], config: FinetuneConfig) -> TrainingData:
    readable, unreadable = _readable(sorted({(it.image, str(it.category)) for it in items}))
    if not readable:
        raise TrainingDataError(f"no usable pairs: {len(items)} given, {unreadable} unreadable")
    by_label: dict[str, list[str]] = {}
    for source, label in readable:
        by_label.setdefault(label, []).append(source)
    labels = sorted(by_label)
    if len(labels) < 2:
        raise TrainingDataError(f"photos of at least 2 categories are needed to learn to tell them apart, got {len(labels)}")
    warnings = [f"{unreadable} photos could not be read; skipped"] if unreadable else []
    train, val = _split(readable, by_label, config)
    gallery, per_label = _category_gallery(engine, labels, {_sha256(source) for source, _ in val}, config.seed)
    empty = [label for label in labels if not per_label[label]]
    if empty:
        sample = ", ".join(empty[:5])
        warnings.append(f"{len(empty)} categories have no catalog images (e.g. {sample}): validation cannot find them")
    stats = {
        "level": "category",
        "pairs": len(items),
        "unreadable_photos": unreadable,
        "categories": len(labels),
        "train_photos": len(train),
        "val_photos": len(val),
        "catalog_images": len(gallery),
    }
    return TrainingData(sorted(train), sorted(val), gallery, labels, stats, warnings, level="category")


def _category_gallery(
    engine: Engine, labels: list[str], exclude_sha256: set[str], seed: int
) -> tuple[list[tuple[bytes, str]], dict[str, int]]:
    """A seeded sample of up to GALLERY_PER_CATEGORY catalog images per label (a
    label matches its sub-categories), without the validation photos themselves."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible sample, not a secret
    leaves = engine.catalog.category_image_ids()
    gallery: list[tuple[bytes, str]] = []
    per_label = dict.fromkeys(labels, 0)
    for label in labels:
        ids = sorted(int(i) for leaf, block in leaves.items() if matches_category(leaf, label) for i in block)
        rng.shuffle(ids)
        for image_id in ids:
            if per_label[label] >= GALLERY_PER_CATEGORY:
                break
            row = engine.catalog.image_by_id(image_id)
            if row is None or row.sha256 in exclude_sha256:
                continue
            try:
                gallery.append((engine.image_bytes(row), label))
            except ImageError:
                continue
            per_label[label] += 1
    return gallery, per_label


def _sha256(source: str) -> str:
    return hashlib.sha256(read_source(source)).hexdigest()


def _readable(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """The pairs whose photo decodes, and how many did not."""
    readable, unreadable = [], 0
    for source, pid in pairs:  # decoded as training will decode them, so caching cannot fail later
        try:
            load_image(source)
            readable.append((source, pid))
        except ImageError:
            unreadable += 1
    return readable, unreadable


def _gallery(engine: Engine, products: list[str]) -> list[tuple[bytes, str]]:
    """The products' readable catalog images."""
    gallery = []
    for pid in products:
        for row in engine.catalog.images_of(pid):
            try:
                gallery.append((engine.image_bytes(row), pid))
            except ImageError:
                continue
    return gallery


def _split(
    readable: list[tuple[str, str]], by_product: dict[str, list[str]], config: FinetuneConfig
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A seeded train/validation split; a product's last photo always trains."""
    rng = random.Random(config.seed)  # noqa: S311 - a reproducible split, not a secret
    order = list(readable)
    rng.shuffle(order)
    want_val = round(config.val_fraction * len(order))
    left = {pid: len(v) for pid, v in by_product.items()}
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for source, pid in order:
        if len(val) < want_val and left[pid] > 1:
            val.append((source, pid))
            left[pid] -= 1
        else:
            train.append((source, pid))
    return train, val
