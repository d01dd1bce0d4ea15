"""Writes when the disk says no (issue 9): a failed index save after a commit is not
an error (the catalog has the change and an open replays it), a catalog that cannot
be written is one clear 503 with nothing changed, and removed images take their
stored files and thumbnails with them."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from vsearch import Engine, imagestore
from vsearch.api import create_app
from vsearch.catalog import Catalog
from vsearch.config import ServeConfig
from vsearch.dirlock import DirLock
from vsearch.errors import StorageError
from vsearch.index import VectorIndex
from vsearch.manifest import IndexManifest, IndexPaths
from vsearch.query import SearchOptions

from .api_helpers import build_small_index, jpeg

KEY = {"Authorization": "Bearer write-key"}


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return build_small_index(tmp_path)


def _disk_full(self: VectorIndex, path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _found(engine: Engine, product_id: str) -> bool:
    hits = engine.search_vectors(engine.product_vector(product_id), SearchOptions(k=1))[0]
    return bool(hits) and hits[0].product_id == product_id


def test_a_full_disk_at_the_index_save_keeps_the_committed_write(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VectorIndex, "save", _disk_full)
    with Engine.open(index) as engine:
        for n in range(70):  # past a checkpoint, which fails and is retried later
            engine.put_product(f"new{n}", category="New", images=[jpeg(500 + n)])
        assert _found(engine, "new69")
    monkeypatch.undo()
    with Engine.open(index) as engine:  # the saved index lacks them: replayed from the change log
        assert engine.index is not None and engine.index.ntotal == 25 + 70
        assert _found(engine, "new0") and _found(engine, "new69")


def test_a_full_disk_at_the_index_save_answers_201_through_the_api(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vsearch.writer.CHECKPOINT_EVERY", 1)  # every write saves
    monkeypatch.setattr(VectorIndex, "save", _disk_full)
    config = ServeConfig(index_dir=str(index), api_key="write-key")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        upload = {"image": ("a.jpg", jpeg(9), "image/jpeg")}
        response = client.post("/v1/products", data={"id": "full"}, files=upload, headers=KEY)
        assert response.status_code == 201, response.text
        assert client.get("/v1/products/full").status_code == 200


@pytest.fixture
def read_only(index: Path) -> Iterator[Engine]:
    with Engine.open(index) as engine:
        engine.catalog.db.execute("PRAGMA query_only = ON")  # what a read-only file or mount does to writes
        yield engine


def test_a_catalog_that_cannot_be_written_changes_nothing(read_only: Engine) -> None:
    engine = read_only
    before = engine.catalog.generation
    with pytest.raises(StorageError, match="nothing was changed"):
        engine.put_product("nope", category="New", images=[jpeg(77)])
    with pytest.raises(StorageError):
        engine.delete_product("Bakery/p04")
    assert engine.catalog.generation == before
    assert engine.index is not None and engine.index.ntotal == 25  # the index was re-synced to the catalog
    assert _found(engine, "Bakery/p04")
    engine.catalog.db.execute("PRAGMA query_only = OFF")
    engine.put_product("yes", category="New", images=[jpeg(78)])
    assert engine.index.ntotal == 26 and _found(engine, "yes")


def test_a_catalog_that_cannot_be_written_is_a_json_503(index: Path) -> None:
    config = ServeConfig(index_dir=str(index), api_key="write-key")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        engine.catalog.db.execute("PRAGMA query_only = ON")
        response = client.delete("/v1/products/Bakery/p04", headers=KEY)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert response.headers["Retry-After"]
        engine.catalog.db.execute("PRAGMA query_only = OFF")
        assert client.get("/v1/products/Bakery/p04").status_code == 200


def test_removed_images_take_their_files_and_thumbnails(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagestore, "GRACE_S", -1.0)
    with Engine.open(index) as engine:
        store = engine.image_store
        engine.put_product("a", images=[jpeg(1), jpeg(2)])
        engine.put_product("b", images=[jpeg(2)])  # shares one file with a
        first, shared = (row for row in engine.catalog.images_of("a"))
        thumb = store.thumbs / f"{first.id}-{first.sha256[:16]}-256.jpg"
        thumb.parent.mkdir(exist_ok=True)
        thumb.write_bytes(b"thumbnail")
        assert store.path(first.sha256) is not None
        engine.put_product("a", images=[jpeg(3)])  # replaces both of a's images
        assert store.path(first.sha256) is None and not thumb.exists()
        assert store.path(shared.sha256) is not None  # b still uses it
        engine.delete_product("b")
        engine.delete_product("a")
        assert sorted(p.name for p in store.folder.iterdir()) == []


def test_a_schema_2_catalog_gets_a_change_log_and_keeps_its_saved_index(index: Path) -> None:
    """Format 3 (catalog schema 2, no change log) opens as format 4 without a rebuild."""
    catalog = Catalog.open(index / "catalog.db")
    conn = catalog.db.conn
    for name in ("log_vector_insert", "log_vector_update", "log_vector_delete", "log_image_delete"):
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE image_changes")
    conn.execute("DROP INDEX images_sha256")
    conn.execute("DELETE FROM meta WHERE key = 'changes_floor'")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    catalog.close()
    paths = IndexPaths(index)
    manifest = IndexManifest.load(paths)
    manifest.format_version = 3
    manifest.save(paths)
    saved = (index / "index.faiss").read_bytes()
    with Engine.open(index) as engine:
        assert engine.manifest.format_version == 4
        assert (index / "index.faiss").read_bytes() == saved
        assert engine.catalog.changed_images(engine.catalog.generation) == []
        engine.put_product("logged", images=[jpeg(5)])
        (new_id,) = (row.id for row in engine.catalog.images_of("logged"))
        assert engine.catalog.changed_images(engine.catalog.generation - 1) == [new_id]
        assert np.isfinite(engine.product_vector("logged")).all()


def test_a_damaged_index_in_a_directory_that_cannot_be_written_heals_in_memory(
    index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (index / "index.faiss").write_bytes(b"garbage")

    def cannot_write(self: DirLock) -> int:
        raise StorageError(f"cannot write to {self.path.parent}: Read-only file system")

    monkeypatch.setattr(DirLock, "_acquire", cannot_write)
    with Engine.open(index) as engine:  # what `vsearch search` on a read-only mount does
        assert engine.index is not None and engine.index.ntotal == 25
        assert _found(engine, "Bakery/p04")
    assert (index / "index.faiss").read_bytes() == b"garbage"  # nothing written


def test_the_server_checkpoints_in_the_background_not_in_the_request(index: Path) -> None:
    config = ServeConfig(index_dir=str(index), api_key="write-key", reload_interval_s=0.05, checkpoint_interval_s=0.2)
    paths = IndexPaths(index)
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        upload = {"image": ("a.jpg", jpeg(11), "image/jpeg")}
        assert client.post("/v1/products", data={"id": "bg"}, files=upload, headers=KEY).status_code == 201
        assert IndexManifest.load(paths).catalog_generation < engine.catalog.generation  # the request did not save
        deadline = time.monotonic() + 10
        while IndexManifest.load(paths).catalog_generation != engine.catalog.generation and time.monotonic() < deadline:
            time.sleep(0.05)
        assert IndexManifest.load(paths).catalog_generation == engine.catalog.generation
