"""Catalog sources: a folder of images, or a CSV / JSONL manifest.

Everything is parsed and validated before any model work starts, so a malformed
manifest fails fast with the line it is on.

A manifest's other columns become product attributes. JSONL values keep their JSON
types; CSV cells are text unless the column is declared with a type suffix:
``price:number`` (an integer or a decimal) or ``in_stock:bool`` (true/false, yes/no,
1/0), stored under the name without the suffix; an empty cell leaves the attribute out.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attributes import parse_number
from .errors import ManifestError
from .images import is_url

__all__ = ["Item", "read_source_items", "read_folder", "read_manifest", "read_pairs", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
REQUIRED = ("id", "image")
KNOWN = ("id", "image", "category", "title")
ALIASES = {"product_id": "id"}  # a pairs file (image,product_id) adds photos to existing products
TYPED = ("number", "bool")  # attribute column suffixes: price:number, in_stock:bool
BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class Item:
    """One (product, image) pair to ingest."""

    product_id: str
    image: str  # absolute local path or http(s) URL
    category: str | None = None  # None: keep what the catalog has (a new product gets "")
    title: str | None = None
    attributes: dict[str, Any] | None = None


def read_source_items(source: str | os.PathLike[str]) -> list[Item]:
    """Items from a folder, ``.csv`` or ``.jsonl`` manifest."""
    path = Path(source)
    if path.is_dir():
        return read_folder(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such file or folder")
    return read_manifest(path)


def read_folder(root: Path) -> list[Item]:
    """Category = sub-folder path, product id = relative path without extension."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root)
            category = rel.parent.as_posix() if rel.parent != Path(".") else ""
            items.append(
                Item(product_id=rel.with_suffix("").as_posix(), image=str(full.resolve()), category=category, title=rel.stem)
            )
    return items


def read_manifest(path: Path) -> list[Item]:
    return [_item(path, line, row) for line, row in _rows(path, REQUIRED)]


def read_pairs(source: str | os.PathLike[str]) -> list[Item]:
    """Labelled photos for fine-tuning from a ``.csv``/``.jsonl`` file: ``image,product_id``
    (product level) or ``image,category`` without product ids (class level: items with
    an empty ``product_id``)."""
    path = Path(source)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file (expected a CSV/JSONL of image,product_id or image,category)")
    rows = list(_rows(path, ("image",)))
    if all("id" in row for _, row in rows):
        return [_item(path, line, row) for line, row in rows]
    if any("id" in row for _, row in rows) or not all("category" in row for _, row in rows):
        raise ManifestError(f"{path}: every pair needs a product_id, or (in a file without product ids) a category")
    items = []
    for line, row in rows:
        category = str(row["category"] or "").strip().strip("/")
        if not category:
            raise ManifestError(f"{path}:{line}: empty category")
        items.append(Item(product_id="", image=_image(path, line, row), category=category))
    return items


def _rows(path: Path, required: tuple[str, ...]) -> Iterable[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _csv_rows(path, required)
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl_rows(path, required)
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None
    raise ManifestError(f"{path}: unsupported manifest type {suffix!r} (use a folder, .csv or .jsonl)")


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [ALIASES.get(h.strip(), h.strip()) for h in next(reader)]
        except StopIteration:
            raise ManifestError(f"{path}: empty manifest (expected a header with columns {', '.join(KNOWN)})") from None
        except csv.Error as exc:
            raise ManifestError(f"{path}:1: malformed CSV header: {exc}") from exc
        missing = [c for c in required if c not in header]
        if missing:
            raise ManifestError(f"{path}:1: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
        rows = []
        try:
            for values in reader:
                line = reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise ManifestError(f"{path}:{line}: expected {len(header)} fields, found {len(values)}")
                rows.append((line, dict(zip(header, values))))
        except csv.Error as exc:
            raise ManifestError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
    return rows


def _jsonl_rows(path: Path, required: tuple[str, ...]) -> Iterable[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{line}: invalid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{line}: expected a JSON object")
            row = {ALIASES.get(k, k): v for k, v in row.items()}
            missing = [c for c in required if c not in row]
            if missing:
                raise ManifestError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
            rows.append((line, row))
    return rows


def _item(path: Path, line: int, row: dict[str, Any]) -> Item:
    _check_text(path, line, row, "id")
    product_id = str(row["id"]).strip()
    if not product_id:
        raise ManifestError(f"{path}:{line}: empty id")
    image = _image(path, line, row)
    attributes = _attributes(path, line, {k: v for k, v in row.items() if k not in KNOWN})
    try:
        json.dumps(attributes, allow_nan=False)
    except ValueError:
        raise ManifestError(f"{path}:{line}: attributes must be finite numbers (not NaN or Infinity)") from None
    return Item(
        product_id=product_id,
        image=image,
        category=str(row["category"] or "").strip().strip("/") if "category" in row else None,
        title=str(row["title"] or "").strip() if "title" in row else None,
        attributes=attributes or None,
    )


def _attributes(path: Path, line: int, columns: dict[str, Any]) -> dict[str, Any]:
    """A row's attribute columns, ``name:number`` / ``name:bool`` converted."""
    out: dict[str, Any] = {}
    for column, value in columns.items():
        name, _, kind = column.rpartition(":")
        if not name or kind not in TYPED:
            out[column] = value
        elif value is None or (isinstance(value, str) and not value.strip()):
            continue
        elif isinstance(value, str):
            out[name] = _typed(path, line, column, kind, value.strip())
        else:  # JSONL: already typed; the suffix still names the attribute
            out[name] = value
    return out


def _typed(path: Path, line: int, column: str, kind: str, text: str) -> int | float | bool:
    if kind == "bool":
        if text.lower() not in BOOLS:
            raise ManifestError(f"{path}:{line}: {column} must be true/false, yes/no or 1/0, not {text!r}")
        return BOOLS[text.lower()]
    number = parse_number(text)
    if number is None:
        raise ManifestError(f"{path}:{line}: {column} must be a number, not {text!r}")
    return number


def _check_text(path: Path, line: int, row: dict[str, Any], field: str) -> None:
    if not isinstance(row[field], (str, int)) or isinstance(row[field], bool):  # JSONL null, lists, ...
        raise ManifestError(f"{path}:{line}: {field} must be a string, not {json.dumps(row[field])}")


def _image(path: Path, line: int, row: dict[str, Any]) -> str:
    """The row's image: an http(s) URL, or a local path resolved against the manifest's folder."""
    _check_text(path, line, row, "image")
    image = str(row["image"]).strip()
    if not image:
        raise ManifestError(f"{path}:{line}: empty image")
    if not is_url(image):
        if "://" in image:
            raise ManifestError(f"{path}:{line}: only local paths and http(s) URLs are supported, not {image!r}")
        image = str((path.parent / image).resolve())
    return image
