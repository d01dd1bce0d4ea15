"""Bytes per image: the default float16 rows keep the default model's raw vectors in
one 4 KiB page each (float32 took two), and :func:`vsearch.footprint.measure`
reports the directory's parts on disk and the served index's memory."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from vsearch.catalog import Catalog
from vsearch.footprint import HASH_ENTRY, index_ram_bytes, measure, table_bytes
from vsearch.index import VectorIndex
from vsearch.manifest import IndexPaths

DIM = 1752  # the default model's raw vector


def catalog_of(path: Path, n: int, raw_vectors: str) -> Catalog:
    catalog = Catalog.open(path, raw_vectors=raw_vectors)
    rng = np.random.default_rng(0)
    with catalog.transaction():
        for k in range(n):
            v = rng.standard_normal(DIM).astype(np.float32)
            catalog.upsert_product(f"p{k}", category="c")
            catalog.put_image(f"p{k}", f"{k}.jpg", f"{k:064x}", 1, 1, v / np.linalg.norm(v))
    catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return catalog


@pytest.mark.parametrize(("raw_vectors", "most"), [("float16", 4096 + 64), ("float32", 2 * 4096 + 64)])
def test_raw_vectors_per_image_on_disk(tmp_path: Path, raw_vectors: str, most: int) -> None:
    n = 200
    catalog = catalog_of(tmp_path / "catalog.db", n, raw_vectors)
    catalog.close()
    tables = table_bytes(tmp_path / "catalog.db")
    if tables is None:
        pytest.skip("this SQLite has no dbstat")
    per_image = (tables["model_vectors"] + tables["sqlite_autoindex_model_vectors_1"] + tables["model_vectors_image"]) / n
    assert most - 4096 < per_image <= most


def test_index_ram_follows_the_structure_faiss_keeps_in_memory() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    for factory, per_vector in (
        ("IDMap2,Flat", 16 * 4 + 8 + HASH_ENTRY),
        ("IVF8,SQ8", 16 + 8 + HASH_ENTRY),
        ("IVF8,PQ4x4", 4 // 2 + 8 + HASH_ENTRY),
    ):
        index = VectorIndex.create(factory, 16)
        if not index.is_trained:
            index.train(x)
        empty = index_ram_bytes(index.index)
        index.add(np.arange(len(x)), x)
        assert index_ram_bytes(index.index) - empty == len(x) * per_vector, factory
        # the file holds codes and ids (and an IVF's direct map); memory, the id maps too
        serialised = int(faiss.serialize_index(index.index).nbytes)
        assert serialised - 200 < index_ram_bytes(index.index) <= serialised + len(x) * HASH_ENTRY, factory


def test_measure_reports_each_part_and_per_image(tmp_path: Path) -> None:
    paths = IndexPaths(tmp_path)
    catalog = catalog_of(paths.catalog, 20, "float16")
    index = VectorIndex.create("IDMap2,Flat", 8)
    index.add(np.arange(1, 21), np.eye(20, 8, dtype=np.float32))
    index.save(paths.index)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x" * 1000)
    (tmp_path / "thumbs").mkdir()
    (tmp_path / "thumbs" / "1-256.jpg").write_bytes(b"x" * 200)

    found = measure(paths, 20, index.index).to_dict()
    disk = found["disk_bytes"]
    assert disk["catalog"] == paths.catalog.stat().st_size + Path(f"{paths.catalog}-wal").stat().st_size
    assert disk["index"] == paths.index.stat().st_size and disk["projection"] == 0 == disk["models"]
    assert disk["images"] == 1200 and disk["total"] == sum(v for k, v in disk.items() if k != "total")
    assert found["disk_bytes_per_image"]["total"] == round(disk["total"] / 20, 1)
    assert found["ram_bytes"] == {"index": 20 * (8 * 4 + 8 + HASH_ENTRY), "total": 20 * (8 * 4 + 8 + HASH_ENTRY)}
    assert found["ram_bytes_per_image"]["index"] == 8 * 4 + 8 + HASH_ENTRY

    quick = measure(paths, 0, None, folders=False).to_dict()
    assert "images" not in quick["disk_bytes"] and quick["ram_bytes"]["index"] == 0
    assert quick["disk_bytes_per_image"]["total"] is None
    catalog.close()
