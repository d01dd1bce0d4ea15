"""vsearch import / export: precomputed embeddings from Parquet shards end in the same
catalog and index as ``vsearch ingest`` of the same images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vsearch import Engine
from vsearch.bulkimport import ImportReport, export_parquet, import_shards
from vsearch.cli import main
from vsearch.errors import ManifestError
from vsearch.writer import IndexWriter

from .conftest import committed_images

MODEL = "tiny-test"


@pytest.fixture
def ingested(tmp_path: Path, catalog_folder: Path) -> Path:
    index = tmp_path / "A"
    with Engine.open(index, model=MODEL, create=True) as engine:
        engine.ingest(catalog_folder, workers=0, quiet=True)
    return index


@pytest.fixture
def shard(tmp_path: Path, ingested: Path) -> Path:
    out = tmp_path / "a.parquet"
    with Engine.open(ingested) as engine:
        assert export_parquet(engine, out, batch_size=7) == 25
    return out


def state(index: Path) -> dict[str, Any]:
    """Products, images and stored vectors of an index, comparable across indexes."""
    with Engine.open(index) as engine:
        catalog = engine.catalog
        products = catalog.products(sorted(catalog.product_ids()))
        images = {pid: [(r.id, r.source, r.sha256, r.width, r.height) for r in catalog.images_of(pid)] for pid in products}
        ids, vectors = zip(*catalog.iter_vectors(batch=1000))
        info = engine.info()
    return {
        "products": {pid: (p.title, p.category, p.attributes) for pid, p in products.items()},
        "images": images,
        "ids": np.concatenate(ids),
        "vectors": np.concatenate(vectors),
        "info": {
            k: v for k, v in info.items() if k not in ("path", "catalog_generation", "footprint")
        },  # where, how often written, file sizes
    }


def write_vectors(path: Path, vectors: np.ndarray) -> Path:
    """A shard of one product per row of ``vectors`` (ids p0, p1, ...; image URLs)."""
    n, dim = vectors.shape
    table = pa.table(
        {
            "id": [f"p{i}" for i in range(n)],
            "image": [f"https://example.com/{i}.jpg" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "vector": pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel())
            ),
        }
    )
    pq.write_table(table, path)
    return path


def phashes(index: Path) -> dict[int, int | None]:
    with Engine.open(index) as engine:
        return dict(engine.catalog.db.execute("SELECT id, phash FROM images"))


def searches(index: Path, queries: list[Path]) -> list[list[tuple[str, float]]]:
    with Engine.open(index) as engine:
        return [[(h.product_id, h.score) for h in engine.search(q, k=5)] for q in queries]


def test_import_of_an_export_rebuilds_the_ingested_index(
    tmp_path: Path, ingested: Path, shard: Path, catalog_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pq.read_table(shard)
    assert table.schema.metadata[b"vsearch.model"] == MODEL.encode()
    assert {"id", "image", "sha256", "vector", "category", "title", "width", "height", "phash"} <= set(table.column_names)

    code = main(["import", str(shard), "--index", str(tmp_path / "B"), "--batch-size", "10", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "25 rows from 1 shard: 25 added, 0 unchanged, 0 rejected" in out  # model taken from the shard

    a, b = state(ingested), state(tmp_path / "B")
    assert a["products"] == b["products"]
    assert a["images"] == b["images"]  # same ids, sources, hashes and sizes
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-6)
    assert a["info"] == b["info"]
    assert phashes(ingested) == phashes(tmp_path / "B") and None not in phashes(ingested).values()  # near-duplicates alike

    queries = sorted(catalog_folder.rglob("*.jpg"))[::6]
    for hits_a, hits_b in zip(searches(ingested, queries), searches(tmp_path / "B", queries)):
        assert [pid for pid, _ in hits_a] == [pid for pid, _ in hits_b]
        np.testing.assert_allclose([s for _, s in hits_a], [s for _, s in hits_b], atol=1e-4)


def test_wrong_dimension_is_one_line_naming_the_file_and_stores_nothing(
    tmp_path: Path, shard: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pq.read_table(shard)
    dim = len(table.column("vector")[0].as_py())
    wrong = table.set_column(
        table.schema.get_field_index("vector"),
        pa.field("vector", pa.list_(pa.float32())),
        pa.array([[0.5] * (dim + 3)] * table.num_rows, type=pa.list_(pa.float32())),
    )
    bad = tmp_path / "wrong.parquet"
    pq.write_table(wrong, bad)
    index = tmp_path / "B"

    code = main(["import", str(shard), str(bad), "--index", str(index), "--quiet"])  # the good shard first
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"vsearch: error: {bad}: vectors have {dim + 3} numbers")
    assert f"makes {dim}" in err
    with Engine.open(index) as engine:
        assert engine.catalog.counts()["images"] == 0 and engine.catalog.counts()["products"] == 0


def test_shard_of_another_model_is_refused(tmp_path: Path, shard: Path) -> None:
    table = pq.read_table(shard)
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata({b"vsearch.model": b"efficientnet-lite0"}), other)
    with Engine.open(tmp_path / "B", model=MODEL, create=True) as engine:
        with pytest.raises(ManifestError, match="efficientnet-lite0"):
            import_shards(engine, [other], quiet=True)
        missing = tmp_path / "missing.parquet"
        pq.write_table(table.drop_columns(["sha256"]), missing)
        with pytest.raises(ManifestError, match="missing column"):
            import_shards(engine, [missing], quiet=True)
        assert engine.catalog.counts()["images"] == 0


def test_killed_import_resumes_with_the_rest(
    tmp_path: Path, ingested: Path, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    add = IndexWriter.add_images

    def dies_at_the_third_batch(self: IndexWriter, *args: Any, **kwargs: Any) -> list[int]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return add(self, *args, **kwargs)

    index = tmp_path / "B"
    with Engine.open(index, model=MODEL, create=True) as engine:
        monkeypatch.setattr(IndexWriter, "add_images", dies_at_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            import_shards(engine, [shard], batch_size=5, quiet=True)
        monkeypatch.setattr(IndexWriter, "add_images", add)
    with Engine.open(index) as engine:
        assert engine.catalog.counts()["images"] == 10  # two batches committed
        report = import_shards(engine, [shard], batch_size=5, quiet=True)
    assert isinstance(report, ImportReport)
    assert (report.rows, report.added, report.unchanged) == (25, 15, 10)

    a, b = state(ingested), state(index)
    assert a["images"] == b["images"] and a["products"] == b["products"]
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-6)
    assert a["info"] == b["info"]


def test_library_import_normalises_keeps_attributes_and_rejects_bad_rows(tmp_path: Path, shard: Path) -> None:
    dim = len(pq.read_table(shard).column("vector")[0].as_py())
    rng = np.random.default_rng(0)
    vectors: list[list[float] | None] = [list(rng.normal(size=dim) * 3) for _ in range(6)]
    vectors[3] = None
    vectors[4] = [float("nan")] * dim
    vectors[5] = [0.0] * dim
    table = pa.table(
        {
            "id": [f"p{i}" for i in range(6)],
            "image": [f"https://example.com/{i}.jpg" for i in range(6)],
            "sha256": [f"{i:064x}" for i in range(6)],
            "vector": pa.array(vectors, type=pa.list_(pa.float64())),
            "category": ["Fruit/Apple/", "Dairy", None, "x", "x", "x"],
            "brand": ["acme", None, "zeta", "x", "x", "x"],
            "size_g": [100, 200, None, 1, 1, 1],
        }
    )
    path = tmp_path / "s.parquet"
    pq.write_table(table, path, row_group_size=2)
    with Engine.open(tmp_path / "B", model=MODEL, create=True) as engine:
        report = import_shards(engine, [path], batch_size=4, quiet=True)
        assert (report.rows, report.added, len(report.rejected)) == (6, 3, 3)
        assert sorted(r.reason for r in report.rejected) == ["no vector", "vector is all zeros", "vector is not finite"]
        assert engine.product("p0").product.attributes == {"brand": "acme", "size_g": 100}
        assert engine.product("p0").product.category == "Fruit/Apple"
        assert engine.product("p1").product.attributes == {"size_g": 200}
        assert engine.product("p2").product.category == ""
        ids, stored = next(engine.catalog.iter_vectors())
        # normalised before storing; stored as float16 (the default), read back as float32
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-3)
        np.testing.assert_allclose(stored[0], np.array(vectors[0]) / np.linalg.norm(vectors[0]), atol=1e-3)
        assert engine.info()["vectors"] == 3
        assert (tmp_path / "B" / "rejects.jsonl").read_text().count("\n") == 3


def test_kill_9_mid_import_then_rerun_adds_only_the_rest(tmp_path: Path, shard: Path) -> None:
    dim = len(pq.read_table(shard).column("vector")[0].as_py())
    n = 10_000
    vectors = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    big = write_vectors(tmp_path / "big.parquet", vectors)
    index = tmp_path / "B"
    cmd = [sys.executable, "-m", "vsearch", "import", str(big), "--index", str(index), "--model", MODEL, "--quiet"]
    cmd += ["--batch-size", "100", "--pca", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and committed_images(index / "catalog.db") < 500:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = committed_images(index / "catalog.db")
    assert 0 < before < n, "the kill must land mid-run for this test to mean anything"
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert (report["added"], report["unchanged"]) == (n - before, before)
    assert report["index"]["images"] == report["index"]["vectors"] == n
    with Engine.open(index) as engine:
        ids, stored = zip(*engine.catalog.iter_vectors(batch=5000))
    order = np.argsort(np.concatenate(ids))
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(np.concatenate(stored)[order], expected, atol=1e-3)  # float16 storage


def test_raw_vectors_float32_is_kept_by_the_index_and_stores_exact_vectors(tmp_path: Path, shard: Path) -> None:
    exact = np.stack(pq.read_table(shard).column("vector").to_pylist()).astype(np.float32)
    for setting, atol in (("float32", 0.0), ("float16", 1e-3)):
        index = tmp_path / setting
        assert main(["import", str(shard), "--index", str(index), "--raw-vectors", setting, "--quiet"]) == 0
        with Engine.open(index) as engine:  # reopened: the setting is the index's, from its manifest
            assert engine.manifest.index.raw_vectors == setting
            _, stored = next(engine.catalog.iter_vectors(batch=1000))
        np.testing.assert_allclose(stored, exact / np.linalg.norm(exact, axis=1, keepdims=True), rtol=0, atol=atol or 1e-7)
        assert (setting == "float32") == bool(
            np.allclose(stored, exact / np.linalg.norm(exact, axis=1, keepdims=True), atol=1e-6)
        )


def test_an_ivf_index_records_its_tuned_nprobe_in_the_manifest_and_info(tmp_path: Path, shard: Path) -> None:
    dim = len(pq.read_table(shard).column("vector")[0].as_py())
    n = 3000
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(30, dim))
    vectors = (centres[rng.integers(0, 30, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    write_vectors(tmp_path / "ivf.parquet", vectors)
    index = tmp_path / "ivf"
    args = ["import", str(tmp_path / "ivf.parquet"), "--index", str(index), "--model", MODEL, "--factory", "IVF16,SQ8"]
    assert main([*args, "--quiet"]) == 0
    saved = json.loads((index / "manifest.json").read_text())["tuning"]
    assert saved is not None and saved["target"] == 0.95 and saved["vectors"] == n and saved["exact"]
    with Engine.open(index) as engine:
        info = engine.info()
        assert engine.index is not None and info["tuning"] == saved and saved["nprobe"] == engine.index.nprobe
        assert 1 <= saved["nprobe"] <= 16 and 0 < saved["recall_at_10"] <= 1


def test_an_import_into_a_new_index_never_loads_the_model(tmp_path: Path, shard: Path) -> None:
    """The dimension a new index expects comes from the model's architecture (random
    weights), so importing embeddings needs no weights on this machine."""
    with Engine.open(tmp_path / "new", model=MODEL, create=True) as engine:
        report = import_shards(engine, [shard], quiet=True)
        assert report.added == 25 and engine.info()["raw_dim"] == len(pq.read_table(shard).column("vector")[0].as_py())
        assert not engine.snapshot.embedder.loaded
