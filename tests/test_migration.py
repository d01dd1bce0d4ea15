"""An index directory written by the previous release (format 1 or 2: base vectors
inline in ``images.vector``) opens in this one: the catalog migrates itself to one
vector store, keeps every vector and its generation (so the saved faiss index stays
valid), and a crash during the migration loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vsearch.catalog import BASE_MODEL, Catalog
from vsearch.engine import Engine
from vsearch.manifest import FORMAT_VERSION, IndexManifest, IndexPaths

# vsearch/catalog.py's SCHEMA in the previous release (index formats 1 and 2), verbatim.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    category TEXT NOT NULL DEFAULT '',
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id TEXT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vector BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (product_id, source)
);
CREATE INDEX IF NOT EXISTS images_product ON images(product_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, image_id)
);
"""
IMAGE_COLUMNS = "id, product_id, source, sha256, width, height, created_at, updated_at"
MODEL = "tiny-test"
FT = "ft-old"  # a fine-tuned version's vectors (only the catalog's part of one)
SEARCHED = "Dairy/Milk/p02"


@dataclass
class OldCatalog:
    """What a previous-release catalog.db holds."""

    products: list[tuple[Any, ...]]
    images: list[tuple[Any, ...]]  # IMAGE_COLUMNS
    base: dict[int, np.ndarray]
    ft: dict[int, np.ndarray]
    meta: list[tuple[str, str]]
    sequence: int  # images' AUTOINCREMENT high-water mark

    def write(self, path: Path) -> None:
        """The catalog.db the previous release would have written for this content."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(OLD_SCHEMA)
        db.execute("BEGIN")
        db.executemany("INSERT INTO products VALUES (?, ?, ?, ?, ?, ?)", self.products)
        sha = {}
        for row in self.images:
            vector = self.base.get(int(row[0]))
            blob = None if vector is None else vector.astype(np.float32).tobytes()
            db.execute(f"INSERT INTO images({IMAGE_COLUMNS}, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [*row, blob])
            sha[row[0]] = row[3]
        db.executemany(
            "INSERT INTO model_vectors(model, image_id, sha256, vector) VALUES (?, ?, ?, ?)",
            [(FT, i, sha[i], v.astype(np.float32).tobytes()) for i, v in self.ft.items()],
        )
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", self.meta)
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'images'", [self.sequence])
        db.execute("COMMIT")
        db.close()


def stored(catalog: Catalog, model: str) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vectors in catalog.iter_vectors(model=model) for i, v in zip(ids, vectors)}


def assert_same_vectors(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for i in want:
        np.testing.assert_array_equal(got[i], want[i])


def synthetic_old_catalog(n: int = 40, dim: int = 16) -> OldCatalog:
    rng = np.random.default_rng(3)
    products = [(f"p{k}", f"P{k}", f"cat{k % 3}", "{}", 1.0, 1.0) for k in range(n // 2)]
    images = [(i, f"p{(i - 1) // 2}", f"{i}.jpg", f"sha{i}", 10, 10, 1.0, 1.0) for i in range(1, n + 1)]
    base = {i: rng.standard_normal(dim).astype(np.float32) for i in range(1, n + 1) if i != 5}  # image 5: no vector yet
    ft = {i: rng.standard_normal(dim // 2).astype(np.float32) for i in range(1, n + 1, 3)}
    return OldCatalog(products, images, base, ft, [("generation", "17")], sequence=n + 3)


@pytest.fixture(scope="module")
def old_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, OldCatalog]:
    """An index directory built by this release from the test catalog, and the
    content of its catalog (read back through the public API) to write the old way."""
    from .conftest import write_catalog

    tmp = tmp_path_factory.mktemp("old_index")
    folder = write_catalog(tmp / "catalog")
    root = tmp / "index"
    with Engine.open(root, model=MODEL, create=True) as engine:
        engine.ingest(folder, quiet=True, workers=0)
        newest = max(int(i) for ids in engine.catalog.category_image_ids().values() for i in ids)
        removed = engine.catalog.image_products([newest])[newest]
        assert removed != SEARCHED
        engine.remove_products([removed])  # AUTOINCREMENT's mark now passes max(id)
        with engine.writer() as writer:
            writer.save()  # the saved index reflects the catalog, as an old release left it
    catalog = Catalog.open(root / "catalog.db")
    base = stored(catalog, BASE_MODEL)
    rng = np.random.default_rng(0)
    ft = {i: rng.standard_normal(12).astype(np.float32) for i in base}
    db = catalog.db
    content = OldCatalog(
        products=db.execute("SELECT id, title, category, attributes, created_at, updated_at FROM products").fetchall(),
        images=db.execute(f"SELECT {IMAGE_COLUMNS} FROM images ORDER BY id").fetchall(),
        base=base,
        ft=ft,
        meta=db.execute("SELECT key, value FROM meta WHERE key NOT IN ('schema_version', 'changes_floor')").fetchall(),
        sequence=int(db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()[0]),
    )
    catalog.close()
    assert content.sequence > max(base) and len(base) == 24
    return root, folder, content


def copy_as_old(old_index: tuple[Path, Path, OldCatalog], dest: Path, format_version: int) -> Path:
    """``dest``: the index directory as the previous release left it, format 1 or 2."""
    root, _, content = old_index
    dest.mkdir()
    for name in ("index.faiss", "projection.npz"):
        (dest / name).write_bytes((root / name).read_bytes())
    content.write(dest / "catalog.db")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = format_version
    manifest["index"]["extra"] = {}  # IndexConfig.extra, always empty, dropped in format 3
    if format_version == 1:
        del manifest["active_model"]  # format 1 is format 2 without model versions
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


@pytest.mark.parametrize("format_version", [1, 2])
def test_an_old_index_opens_with_its_vectors_generation_and_saved_index(
    old_index: tuple[Path, Path, OldCatalog], tmp_path: Path, format_version: int
) -> None:
    _, folder, content = old_index
    root = copy_as_old(old_index, tmp_path / "index", format_version)
    saved_index = (root / "index.faiss").read_bytes()
    generation = int(dict(content.meta)["generation"])
    with Engine.open(root) as engine:
        catalog = engine.catalog
        assert catalog.generation == generation
        assert_same_vectors(stored(catalog, BASE_MODEL), content.base)
        assert_same_vectors(stored(catalog, FT), content.ft)
        assert catalog.images_without_vectors(FT) == [] == catalog.images_without_vectors(BASE_MODEL)
        assert engine.info()["vectors"] == 24
        hits = engine.search(folder / f"{SEARCHED}.jpg", k=3)
        assert hits[0].product_id == SEARCHED
        assert engine.manifest.active_model == BASE_MODEL
    assert (root / "index.faiss").read_bytes() == saved_index, "a valid saved index must not be rebuilt"
    # the manifest says the current format as soon as the catalog is migrated, even after a
    # read-only open, so an older vsearch refuses the directory instead of failing on it
    assert json.loads((root / "manifest.json").read_text())["format_version"] == FORMAT_VERSION

    paths = IndexPaths(root)
    manifest = IndexManifest.load(paths)
    manifest.save(paths)
    assert json.loads((root / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 4
    with Engine.open(root) as engine:  # reopening: nothing left to migrate, nothing changes
        assert engine.catalog.generation == generation
        assert_same_vectors(stored(engine.catalog, BASE_MODEL), content.base)
        with engine.catalog.transaction():  # FAISS ids are never reused, migrated or not
            engine.catalog.upsert_product("new")
            new_id = engine.catalog.put_image("new", "n.jpg", "sha-n", 1, 1, np.zeros(4, dtype=np.float32))
        assert new_id == content.sequence + 1
    assert (root / "index.faiss").read_bytes() == saved_index


def test_the_migrated_catalog_has_the_new_layout_and_is_migrated_once(tmp_path: Path) -> None:
    content = synthetic_old_catalog()
    path = tmp_path / "catalog.db"
    content.write(path)
    catalog = Catalog.open(path)
    db = catalog.db
    assert "vector" not in {r[1] for r in db.execute("PRAGMA table_info(images)")}
    assert "sha256" not in {r[1] for r in db.execute("PRAGMA table_info(model_vectors)")}
    assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%_v1'").fetchall()
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r.id for r in catalog.images_without_vectors(BASE_MODEL)] == [5]
    assert_same_vectors(stored(catalog, BASE_MODEL), content.base)
    assert_same_vectors(stored(catalog, FT), content.ft)
    assert catalog.generation == 17
    with catalog.transaction():  # the cascade still holds after the tables were swapped
        catalog.remove_products(["p0"])
    assert 1 not in stored(catalog, BASE_MODEL) and 1 not in stored(catalog, FT)
    catalog.close()
    before = path.read_bytes()
    Catalog.open(path).close()
    assert path.read_bytes() == before


def test_a_stale_fine_tuned_vector_is_not_carried_over(tmp_path: Path) -> None:
    # The previous release deleted other models' vectors when an image's content
    # changed, so none should be stale; one that is must not come back as current.
    content = synthetic_old_catalog()
    path = tmp_path / "catalog.db"
    content.write(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE model_vectors SET sha256 = 'older' WHERE image_id = 4")
    catalog = Catalog.open(path)
    assert 4 not in stored(catalog, FT) and 4 in [r.id for r in catalog.images_without_vectors(FT)]
    assert 1 in stored(catalog, FT)  # the current ones are carried
    catalog.close()


KILLER = textwrap.dedent(
    """
    import os, signal, sqlite3, sys

    import vsearch.vectorstore as vs

    vs.MIGRATE_CHUNK = 1  # many small steps for the kill to land between
    path, kill_at = sys.argv[1], int(sys.argv[2])
    steps = 0
    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA cache_size=1")  # spill the transaction's pages to the WAL as it goes

        def progress():
            global steps
            steps += 1
            if kill_at and steps >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return 0

        conn.set_progress_handler(progress, 50)
        return conn

    sqlite3.connect = connect
    from vsearch.catalog import Catalog

    Catalog.open(path).close()
    print(steps)
    """
)


def migrate_in_subprocess(path: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLER, str(path), str(kill_at)], env=env, capture_output=True, text=True)


def test_a_migration_killed_midway_leaves_the_old_layout_whole(tmp_path: Path) -> None:
    content = synthetic_old_catalog(n=200)
    dry = tmp_path / "dry.db"
    content.write(dry)
    done = migrate_in_subprocess(dry, 0)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.strip())

    path = tmp_path / "catalog.db"
    content.write(path)
    killed = migrate_in_subprocess(path, total // 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wal = Path(f"{path}-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the kill must land mid-write for this test to mean anything"

    with sqlite3.connect(path) as db:  # what a reader (or the previous release) sees: the old layout, whole
        assert "vector" in {r[1] for r in db.execute("PRAGMA table_info(images)")}
        inline = {i: np.frombuffer(v, dtype=np.float32) for i, v in db.execute("SELECT id, vector FROM images") if v}
        assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%_v1'").fetchall()
    assert_same_vectors(inline, content.base)

    catalog = Catalog.open(path)  # and the next open migrates it
    assert_same_vectors(stored(catalog, BASE_MODEL), content.base)
    assert_same_vectors(stored(catalog, FT), content.ft)
    assert catalog.generation == 17
    catalog.close()
