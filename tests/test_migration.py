"""An index directory written by the previous release (format 1 or 2: base vectors
inline in ``images.vector``) opens in this one: the catalog migrates itself to one
vector store, keeps every vector and its generation (so the saved faiss index stays
valid), and a crash during the migration loses nothing."""

from __future__ import annotations

import json
import os
import shutil
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

from vsearch import changelog
from vsearch.allowed import image_ids
from vsearch.attributes import AttributeFilter
from vsearch.catalog import BASE_MODEL, TABLES, Catalog
from vsearch.engine import Engine
from vsearch.manifest import FORMAT_VERSION, IndexManifest, IndexPaths
from vsearch.migrate import SCHEMA_VERSION

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

    import vsearch.migrate as migrate

    migrate.MIGRATE_CHUNK = 1  # many small steps for the kill to land between
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


# Schema 4 -> 5 ----------------------------------------------------------------
# Schema 4's model_vectors, verbatim: every blob float32, no dtype column. Its other
# tables, indexes and change-log triggers are schema 5's (unchanged since).
SCHEMA_4_VECTORS = """
CREATE TABLE IF NOT EXISTS model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, image_id)
);
CREATE INDEX IF NOT EXISTS model_vectors_image ON model_vectors(image_id);
"""
BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"


def schema_4_catalog(path: Path, n: int = 20, dim: int = 16) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """A schema-4 catalog.db as the previous release wrote it: two write transactions
    (n images with float32 vectors, then image 3 removed), each in the change log.
    Returns its (base, ft) vectors."""
    rng = np.random.default_rng(5)
    base = {i: rng.standard_normal(dim).astype(np.float32) for i in range(1, n + 1)}
    ft = {i: rng.standard_normal(dim // 2).astype(np.float32) for i in range(1, n + 1, 2)}
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(TABLES + SCHEMA_4_VECTORS)
    for statement in changelog.STATEMENTS:
        db.execute(statement)
    db.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?)", [("schema_version", "4"), ("generation", "0"), ("changes_floor", "0")]
    )
    db.execute("BEGIN")
    for i in range(1, n + 1):
        db.execute(
            "INSERT INTO products(id, title, category, attributes, created_at, updated_at) VALUES (?, '', 'c', ?, 1, 1)",
            [f"p{i}", json.dumps({"price": i, "brand": "AB"[i % 2], "tags": ["x", "y"][: i % 3]})],
        )
        db.execute(
            "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
            "VALUES (?, ?, 'a.jpg', ?, 1, 1, 1, 1)",
            [i, f"p{i}", f"sha{i}"],
        )
    db.executemany(
        "INSERT INTO model_vectors(model, image_id, vector) VALUES (?, ?, ?)",
        [*((BASE_MODEL, i, v.tobytes()) for i, v in base.items()), *((FT, i, v.tobytes()) for i, v in ft.items())],
    )
    db.execute(BUMP)
    db.execute("COMMIT")
    db.execute("BEGIN")
    db.execute("DELETE FROM images WHERE id = 3")
    db.execute(BUMP)
    db.execute("COMMIT")
    db.close()
    del base[3], ft[3]
    return base, ft


def test_a_schema_4_catalog_keeps_its_float32_rows_and_its_log_and_writes_float16(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    base, ft = schema_4_catalog(path)
    catalog = Catalog.open(path)
    db = catalog.db
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    # schema 6: the attributes products already had are filterable (image 3 is gone)
    assert image_ids(catalog, AttributeFilter.from_json({"price": {"lte": 5}})).tolist() == [1, 2, 4, 5]
    assert image_ids(catalog, AttributeFilter.from_json({"brand": "A", "tags": "y"})).tolist() == [2, 8, 14, 20]
    assert db.execute("SELECT DISTINCT dtype FROM model_vectors").fetchall() == [(0,)]  # read as written
    assert_same_vectors(stored(catalog, BASE_MODEL), base)
    assert_same_vectors(stored(catalog, FT), ft)
    assert catalog.generation == 2 and catalog.changes_floor == 0
    assert catalog.changed_images(1) == [3]  # the log goes on: an index saved at 1 is caught up, not rebuilt
    assert catalog.vector_dim(BASE_MODEL) == 16 and catalog.vector_dim(FT) == 8

    new = np.random.default_rng(6).standard_normal(16).astype(np.float32)
    with catalog.transaction():
        catalog.upsert_product("p21")
        image = catalog.put_image("p21", "a.jpg", "sha21", 1, 1, new)
    assert db.execute("SELECT dtype, length(vector) FROM model_vectors WHERE image_id = ?", [image]).fetchone() == (1, 32)
    want = {**base, image: new.astype(np.float16).astype(np.float32)}
    assert_same_vectors(stored(catalog, BASE_MODEL), want)  # both encodings in one read
    ids, vectors = catalog.vectors_by_id([1, 2, image])
    assert ids.tolist() == [1, 2, image] and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, np.stack([want[1], want[2], want[image]]))
    np.testing.assert_array_equal(catalog.vectors_of("p21"), [want[image]])
    np.testing.assert_array_equal(catalog.sample_vectors(100), np.stack([want[i] for i in sorted(want)]))
    assert catalog.vector_dim(BASE_MODEL) == 16
    catalog.close()
    before = path.read_bytes()
    Catalog.open(path).close()  # migrated once
    assert path.read_bytes() == before

    exact = Catalog.open(path, raw_vectors="float32")  # the setting applies to new rows
    with exact.transaction():
        exact.upsert_product("p22")
        image = exact.put_image("p22", "a.jpg", "sha22", 1, 1, new)
    assert exact.db.execute("SELECT dtype FROM model_vectors WHERE image_id = ?", [image]).fetchone() == (0,)
    np.testing.assert_array_equal(exact.vectors_by_id([image])[1], [new])
    exact.close()


def as_schema_4(root: Path) -> None:
    """Turn a current index directory's catalog into schema 4's (float32 blobs, no
    dtype column, the log as it was): what the previous release left."""
    db = sqlite3.connect(root / "catalog.db", isolation_level=None)
    rows = db.execute("SELECT model, image_id, vector, dtype FROM model_vectors").fetchall()
    db.execute("BEGIN")
    last_logged = db.execute("SELECT coalesce(max(rowid), 0) FROM image_changes").fetchone()[0]
    db.execute("ALTER TABLE model_vectors DROP COLUMN dtype")
    for model, image_id, blob, dtype in rows:
        vector = np.frombuffer(blob, dtype=np.float16 if dtype == 1 else np.float32).astype(np.float32)
        db.execute("UPDATE model_vectors SET vector = ? WHERE model = ? AND image_id = ?", [vector.tobytes(), model, image_id])
    db.execute("DELETE FROM image_changes WHERE rowid > ?", [last_logged])  # a re-encoding, not a change
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.execute("COMMIT")
    db.close()


def test_an_index_with_a_schema_4_catalog_catches_up_across_the_upgrade(
    old_index: tuple[Path, Path, OldCatalog], tmp_path: Path
) -> None:
    source, folder, content = old_index
    root = tmp_path / "index"
    shutil.copytree(source, root)
    as_schema_4(root)
    with sqlite3.connect(root / "catalog.db") as db:  # the previous release removes a product after its last save
        db.execute("PRAGMA foreign_keys=ON")  # as it always had: its vectors cascade
        gone = db.execute("SELECT product_id FROM images WHERE product_id != ? ORDER BY id LIMIT 1", [SEARCHED]).fetchone()[0]
        db.execute("DELETE FROM images WHERE product_id = ?", [gone])
        db.execute("DELETE FROM products WHERE id = ?", [gone])
        db.execute(BUMP)
    saved_index = (root / "index.faiss").read_bytes()
    with Engine.open(root) as engine:
        assert engine.info()["vectors"] == 23 == engine.catalog.counts()["images"]
        assert engine.catalog.generation == engine.index_generation == int(dict(content.meta)["generation"]) + 1
        hits = engine.search(folder / f"{SEARCHED}.jpg", k=25)
        assert hits[0].product_id == SEARCHED and gone not in {h.product_id for h in hits}
        want = {i: v for i, v in content.base.items() if i in stored(engine.catalog, BASE_MODEL)}
        assert_same_vectors(stored(engine.catalog, BASE_MODEL), want)
    assert (root / "index.faiss").read_bytes() == saved_index, "caught up from the log, not rebuilt"


# Schema 6 -> 7 ----------------------------------------------------------------
def as_schema_6(path: Path) -> None:
    """A current catalog.db without the keyword index (schema 6's layout)."""
    db = sqlite3.connect(path, isolation_level=None)
    for trigger in ("keywords_insert", "keywords_update", "keywords_delete"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE product_text")
    db.execute("DROP TABLE product_keys")
    db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    db.close()


def test_a_schema_6_catalog_gets_its_keyword_index_filled_and_kept(tmp_path: Path) -> None:
    from vsearch import keywords
    from vsearch.query import SearchOptions

    path = tmp_path / "catalog.db"
    catalog = Catalog.open(path)
    with catalog.transaction():
        for n, (title, attrs) in enumerate([("Red apple", {"description": "crisp"}), ("Milk", {"tags": ["fresh", 3]})]):
            catalog.upsert_product(f"p{n}", title=title, attributes=attrs)
            catalog.put_image(f"p{n}", "a.jpg", f"sha{n}", 1, 1, np.ones(4, dtype=np.float32))
        catalog.upsert_product("gone")
    with catalog.transaction():
        catalog.remove_products(["gone"])
    generation = catalog.generation
    catalog.close()
    as_schema_6(path)

    catalog = Catalog.open(path)
    assert catalog.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert catalog.generation == generation and catalog.changed_images(generation) == []  # no change to replay

    def found(text: str) -> list[str]:
        return [h.product_id for h in keywords.search(catalog, SearchOptions(text=text), 10)]

    assert found("apples") == ["p0"] and found("fresh") == ["p1"] and set(found("crisp milk")) == {"p0", "p1"}
    assert dict(catalog.db.execute("SELECT product_id, key FROM product_keys")) == {"p0": 1, "p1": 2}
    with catalog.transaction():  # the triggers work on the migrated catalog
        catalog.upsert_product("p0", title="Green pear")
        catalog.remove_products(["p1"])
    assert found("apple") == [] and found("pear") == ["p0"] and found("fresh") == []
    catalog.db.execute("INSERT INTO product_text(product_text) VALUES ('integrity-check')")
    catalog.close()
    before = path.read_bytes()
    Catalog.open(path).close()  # migrated once
    assert path.read_bytes() == before


# Schema 7 -> 8 ----------------------------------------------------------------
def as_schema_7(path: Path) -> None:
    """A current catalog.db without near-duplicate links (schema 7's layout)."""
    db = sqlite3.connect(path, isolation_level=None)
    for trigger in ("images_pending", "images_relink", "images_unlink", "products_ungroup"):
        db.execute(f"DROP TRIGGER {trigger}")
    for table in ("image_links", "variant_groups", "variant_dirty", "variant_pending"):
        db.execute(f"DROP TABLE {table}")
    db.execute("ALTER TABLE images DROP COLUMN phash")
    db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    db.close()


def test_a_schema_7_catalog_queues_its_images_for_near_duplicate_links(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = Catalog.open(path)
    with catalog.transaction():
        for n in range(3):
            catalog.upsert_product(f"p{n}")
            catalog.put_image(f"p{n}", "a.jpg", f"sha{n}", 1, 1, np.ones(4, dtype=np.float32))
        catalog.db.execute("DELETE FROM variant_pending")  # as if linked
    generation = catalog.generation
    catalog.close()
    as_schema_7(path)

    catalog = Catalog.open(path)
    db = catalog.db
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "8"
    assert catalog.generation == generation
    ids = [r[0] for r in db.execute("SELECT id FROM images ORDER BY id")]
    assert [r[0] for r in db.execute("SELECT image_id FROM variant_pending ORDER BY image_id")] == ids
    assert [r[0] for r in db.execute("SELECT phash FROM images")] == [None] * 3
    with catalog.transaction():  # the triggers work on the migrated catalog
        catalog.remove_products(["p1"])
        catalog.put_image("p2", "b.jpg", "sha9", 1, 1, np.ones(4, dtype=np.float32))
    pending = [r[0] for r in db.execute("SELECT image_id FROM variant_pending ORDER BY image_id")]
    assert ids[1] not in pending and ids[0] in pending and len(pending) == 3
    catalog.close()
    before = path.read_bytes()
    Catalog.open(path).close()  # migrated once
    assert path.read_bytes() == before
