"""What an index directory costs per image: bytes on disk (catalog, index file,
stored images) and in memory (the served faiss index).

All of it is cheap enough for ``vsearch info``: file sizes, two SQLite pragmas on a
read-only connection of its own, and the faiss index's structure (no
serialisation); only ``folders=True`` lists the stored-image folders, one entry
per file. :func:`table_bytes` (SQLite's ``dbstat``: it reads every page) is for
benchmarks, not for ``info``.

In memory, besides the index: the model (per process, not per image), SQLite's
page cache (2 MB), and the category filters' cached vectors (bounded by
``block_cache_mb``); none grows with the catalog but the index.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from .manifest import IndexPaths

__all__ = ["Footprint", "HASH_ENTRY", "index_ram_bytes", "measure", "table_bytes"]

# Bytes per entry of a std::unordered_map<int64, int64> (a 24-byte node rounded up
# by malloc, plus its bucket pointer): an IndexIDMap2's reverse map and an IVF
# index's direct map (Hashtable), which faiss keeps in memory but not in the file.
HASH_ENTRY = 40


@dataclass(frozen=True)
class Footprint:
    """Bytes an index directory takes, by part; per image through :meth:`to_dict`."""

    images: int
    disk: dict[str, int]  # catalog (database + WAL), index, projection, images (stored copies and thumbnails), models
    ram: dict[str, int]  # index: the served faiss index

    def to_dict(self) -> dict[str, Any]:
        disk = {**self.disk, "total": sum(self.disk.values())}
        ram = {**self.ram, "total": sum(self.ram.values())}
        return {
            "images": self.images,
            "disk_bytes": disk,
            "disk_bytes_per_image": _per(disk, self.images),
            "ram_bytes": ram,
            "ram_bytes_per_image": _per(ram, self.images),
        }


def measure(paths: IndexPaths, images: int, index: faiss.Index | None, *, folders: bool = True) -> Footprint:
    """The footprint of the directory at ``paths`` holding ``images`` catalog images,
    served by the faiss ``index`` (``VectorIndex.index``; None: none loaded). Without
    ``folders``, the stored images and fine-tuned models are not counted (listing
    them costs one entry per file)."""
    disk = {
        "catalog": sum(_size(Path(f"{paths.catalog}{suffix}")) for suffix in ("", "-wal")),
        "index": _size(paths.index),
        "projection": _size(paths.projection),
    }
    if folders:
        disk["images"] = _tree_size(paths.root / "images") + _tree_size(paths.root / "thumbs")
        disk["models"] = _tree_size(paths.root / "models")
    return Footprint(images, disk, {"index": index_ram_bytes(index) if index is not None else 0})


def index_ram_bytes(index: faiss.Index) -> int:
    """Memory a faiss index holds, from its structure: codes and ids, the id maps
    faiss keeps only in memory, the coarse quantizer and trained tables. An index
    type not described here counts as its serialised size."""
    index = faiss.downcast_index(index)
    n = int(index.ntotal)
    if isinstance(index, faiss.IndexIDMap2):
        return n * (8 + HASH_ENTRY) + index_ram_bytes(index.index)
    if isinstance(index, faiss.IndexIDMap):
        return n * 8 + index_ram_bytes(index.index)
    if isinstance(index, faiss.IndexIVF):
        direct = {int(faiss.DirectMap.Hashtable): HASH_ENTRY, int(faiss.DirectMap.Array): 8}  # type: ignore[attr-defined]
        per_vector = int(index.code_size) + 8 + direct.get(int(index.direct_map.type), 0)
        return n * per_vector + index_ram_bytes(index.quantizer) + _trained_bytes(index)
    if isinstance(index, faiss.IndexFlatCodes):
        return n * int(index.code_size)
    return int(faiss.serialize_index(index).nbytes)


def table_bytes(path: Path) -> dict[str, int] | None:
    """Bytes of each table and index of the SQLite database at ``path`` (from
    ``dbstat``, which reads every page: a benchmark's measure); None where this
    SQLite lacks dbstat."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {name: int(size) for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")}
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def _trained_bytes(index: Any) -> int:
    """An IVF index's trained tables: PQ centroids, or the scalar quantizer's ranges."""
    pq = getattr(index, "pq", None)
    if pq is not None:
        return int(pq.M) * int(pq.ksub) * int(pq.dsub) * 4
    sq = getattr(index, "sq", None)
    return int(sq.trained.size()) * 4 if sq is not None else 0


def _per(values: dict[str, int], images: int) -> dict[str, float | None]:
    return {k: round(v / images, 1) if images else None for k, v in values.items()}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(_size(Path(root) / name) for name in files)
    return total
