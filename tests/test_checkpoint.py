"""A checkpoint (the background save of a server) copies the index in memory under
the engine's locks and writes the file without them: writes go on meanwhile, and
the saved file and manifest describe the copy, not whatever came after (issue 10)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vsearch import Engine
from vsearch import checkpoint as checkpoint_module
from vsearch.index import VectorIndex
from vsearch.manifest import IndexManifest, IndexPaths

from .api_helpers import build_small_index, jpeg


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return build_small_index(tmp_path)


def test_writes_go_on_while_a_checkpoint_writes_the_file(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = threading.Event(), threading.Event()
    save = VectorIndex.save

    def slow_disk(self: VectorIndex, path: Path) -> None:
        writing.set()
        assert release.wait(30)
        save(self, path)

    with Engine.open(index) as engine:
        engine.put_product("before", category="New", images=[jpeg(900)])
        captured = engine.catalog.generation
        monkeypatch.setattr(VectorIndex, "save", slow_disk)
        saved: list[bool] = []
        checkpoint = threading.Thread(target=lambda: saved.append(engine.checkpoint()))
        checkpoint.start()
        assert writing.wait(30)
        # the checkpoint is on the disk now: a write must not wait for it
        writer = threading.Thread(target=lambda: engine.put_product("during", category="New", images=[jpeg(901)]))
        writer.start()
        writer.join(30)
        still_blocked = writer.is_alive()
        release.set()
        checkpoint.join(30)
        writer.join(30)
        assert not still_blocked, "a write waited for the checkpoint's disk write"
        assert saved == [True]
        manifest = IndexManifest.load(IndexPaths(index))
        assert manifest.catalog_generation == captured  # the copy's generation, not the later write's
        assert engine.catalog.generation > captured
        monkeypatch.undo()
    with Engine.open(index) as engine:  # the later write is replayed from the change log
        assert engine.index is not None and engine.index.ntotal == 27
        for product_id in ("before", "during"):
            assert engine.search_vectors(engine.product_vector(product_id))[0][0].product_id == product_id


def test_a_checkpoint_that_is_not_due_writes_nothing(index: Path) -> None:
    with Engine.open(index) as engine:
        assert engine.checkpoint() is False  # the saved index is current
        engine.put_product("new", category="New", images=[jpeg(902)])
        assert engine.checkpoint(every=5) is False  # one generation behind, five asked
        assert engine.checkpoint() is True
        assert IndexManifest.load(IndexPaths(index)).catalog_generation == engine.catalog.generation


def test_an_outgrown_index_is_rebuilt_aside_with_writes_going_on(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vsearch.sizing.FLAT_MAX", 30)  # past 30 vectors: IVF
    build = checkpoint_module.build_index
    during: list[bool] = []

    def build_with_a_write_meanwhile(*args: object, **kwargs: object) -> VectorIndex:
        writer = threading.Thread(target=lambda: engine.put_product("during", category="New", images=[jpeg(950)]))
        writer.start()
        writer.join(60)
        during.append(not writer.is_alive())  # the build holds no write lock
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_module, "build_index", build_with_a_write_meanwhile)
    with Engine.open(index) as engine:
        assert engine.upgrade_index() is False  # 25 vectors: Flat still fits
        for n in range(8):
            engine.put_product(f"new{n}", category="New", images=[jpeg(960 + n)])
        assert engine.manifest.factory.startswith("IDMap")  # a request never upgrades
        assert engine.upgrade_index() is True
        assert during == [True]
        assert engine.manifest.factory.startswith("IVF") and engine.index is not None and engine.index.ntotal == 34
        for product_id in ("new0", "during"):  # written before and during the build
            assert engine.search_vectors(engine.product_vector(product_id))[0][0].product_id == product_id
    with Engine.open(index) as engine:
        assert engine.manifest.factory.startswith("IVF") and engine.index is not None and engine.index.ntotal == 34
