"""vsearch ingest --ray: decoding and embedding on a local Ray (2 CPUs) end in the
catalog and index an in-process ingest of the same source builds; re-runs embed
nothing; an interrupted run resumes from its shards."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vsearch import Engine
from vsearch.cli import main
from vsearch.errors import ConfigError
from vsearch.rayingest import init_args
from vsearch.rayshards import RUNS_DIR

from .conftest import make_image

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One private local Ray for this module (2 CPUs, its own temp dir), shut down after."""
    ray = pytest.importorskip("ray")
    folder = tempfile.mkdtemp(prefix="vsray")  # short: Ray's socket paths must fit 107 bytes
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        _temp_dir=folder,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def state(index: Path) -> dict[str, Any]:
    """Products, images (id, source, sha256, size) and vectors by image, with the rejects."""
    with Engine.open(index) as engine:
        catalog = engine.catalog
        products = catalog.products(sorted(catalog.product_ids()))
        rows = {r.id: r for pid in products for r in catalog.images_of(pid)}
        ids, vectors = zip(*catalog.iter_vectors(batch=1000))
        by_id = dict(zip(np.concatenate(ids).tolist(), np.concatenate(vectors)))
        info = {k: v for k, v in engine.info().items() if k in ("products", "images", "vectors", "dim", "model")}
    return {
        "products": {pid: (p.title, p.category, p.attributes) for pid, p in products.items()},
        "images": sorted((r.product_id, r.source, r.sha256, r.width, r.height, r.id) for r in rows.values()),
        "vectors": {(rows[i].product_id, rows[i].source): v for i, v in by_id.items()},
        "info": info,
        "rejects": (index / "rejects.jsonl").read_text(),
    }


def assert_same(a: dict[str, Any], b: dict[str, Any], *, ids: bool = True) -> None:
    assert a["products"] == b["products"]
    cut = (lambda rows: rows) if ids else (lambda rows: [r[:-1] for r in rows])
    assert cut(a["images"]) == cut(b["images"])
    assert a["vectors"].keys() == b["vectors"].keys()
    for key, vector in a["vectors"].items():
        np.testing.assert_allclose(vector, b["vectors"][key], atol=1e-4)  # a float16 step at most
    assert a["info"] == b["info"]
    assert a["rejects"] == b["rejects"]


def in_process(index: Path, source: Path) -> dict[str, Any]:
    with Engine.open(index, model=MODEL, create=True) as engine:
        engine.ingest(source, workers=0, quiet=True)
    return state(index)


def test_ray_ingest_builds_the_in_process_index_and_a_rerun_embeds_nothing(
    local_ray: Any, tmp_path: Path, catalog_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (catalog_folder / "Bakery" / "broken.jpg").write_bytes(b"not an image")
    images = sorted(catalog_folder.rglob("*.jpg"))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:  # rows sharing an id, titles that disagree, an attribute column
        out = csv.writer(fh)
        out.writerow(["id", "image", "category", "title", "brand"])
        for n, path in enumerate(images):
            out.writerow([f"p{n // 2}", path, path.parent.name, f"title {n}", "acme" if n % 3 else ""])
    expected = in_process(tmp_path / "A", manifest)

    index = tmp_path / "B"
    cmd = ["ingest", str(manifest), "--index", str(index), "--model", MODEL, "--ray", "--actors", "2"]
    assert main([*cmd, "--batch-size", "4", "--keep-shards", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["items"], report["embedded"], report["unchanged"], report["rejected"]) == (26, 25, 0, 1)
    assert report["rejects"][0]["source"].endswith("broken.jpg")
    assert report["disagreements"] and report["shared_id_products"] == 13
    assert (report["ray"]["actors"], report["ray"]["computed"], report["ray"]["reused"]) == (2, 25, 0)
    assert_same(expected, state(index))  # same ids too: the pipeline keeps the source's order

    pq = pytest.importorskip("pyarrow.parquet")
    shards = sorted(Path(report["ray"]["shards_dir"]).glob("shard-*.parquet"))
    table = pq.read_table(shards[0])
    assert table.schema.metadata[b"vsearch.model"] == MODEL.encode()
    assert {"id", "image", "sha256", "vector", "category", "title", "width", "height", "brand"} <= set(table.column_names)
    vector = table.schema.field("vector").type
    assert vector.num_fields == 1 and str(vector.value_type) == "float"  # list<float32>, the raw vectors
    assert sum(pq.read_metadata(s).num_rows for s in shards) == 25

    with Engine.open(index) as engine:  # unchanged files: hashed on Ray, nothing embedded, the kept shards unused
        again = main_report(engine, manifest)
    assert (again.embedded, again.unchanged, len(again.rejected), again.computed, again.reused) == (0, 25, 1, 0, 0)
    assert not (index / RUNS_DIR).exists()
    assert_same(expected, state(index))


def main_report(engine: Engine, source: Path, **kwargs: Any) -> Any:
    from vsearch.rayingest import ray_ingest

    return ray_ingest(engine, source, quiet=True, batch_size=4, **kwargs)


def test_an_interrupted_run_resumes_from_its_shards_without_embedding_them_again(
    local_ray: Any, tmp_path: Path, catalog_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vsearch.rayshards as rayshards

    images = sorted(catalog_folder.rglob("*.jpg"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "w") as fh:  # attributes the shards cannot carry: nested values, rows without any
        for n, path in enumerate([*images[:3], broken, *images[3:]]):
            row: dict[str, Any] = {"id": f"p{n}", "image": str(path), "category": path.parent.name}
            if n % 4:
                row["size"] = {"g": n} if n % 2 else n
            fh.write(json.dumps(row) + "\n")

    written = []
    write = rayshards.write_shard

    def dies_after_the_first_shard(pa: Any, path: Path, table: Any) -> None:
        if written:
            raise KeyboardInterrupt  # as if killed: nothing more reaches the disk
        written.append(table.num_rows)
        write(pa, path, table)

    monkeypatch.setattr(rayshards, "SHARD_ROWS", 8)
    monkeypatch.setattr(rayshards, "FLUSH_EVERY_S", 1e9)  # shards by rows only: a loaded machine would flush on time
    monkeypatch.setattr(rayshards, "write_shard", dies_after_the_first_shard)
    index = tmp_path / "B"
    with Engine.open(index, model=MODEL, create=True) as engine:
        with pytest.raises(KeyboardInterrupt):
            main_report(engine, manifest, actors=1, decode="tasks")  # decoding in a CPU stage of its own
        assert engine.catalog.counts()["images"] == 0  # nothing imported yet
    monkeypatch.setattr(rayshards, "write_shard", write)
    assert len(written) == 1 and 8 <= written[0] < 25  # the first rows, as they came back
    make_image(99).save(images[0], quality=95)  # changed since it was embedded: its shard row is stale

    with Engine.open(index) as engine:
        report = main_report(engine, manifest)
    kept = written[0] - 1
    assert (report.embedded, report.reused, report.computed) == (25, kept, 25 - kept)
    assert not (index / RUNS_DIR).exists()
    assert_same(in_process(tmp_path / "A", manifest), state(index), ids=False)


def test_without_ray_installed_the_error_says_what_to_install(
    tmp_path: Path, catalog_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code = main(["ingest", str(catalog_folder), "--index", str(tmp_path / "B"), "--model", MODEL, "--ray", "--quiet"])
    assert code == 1
    assert "pip install 'vsearch[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "B").exists()


def test_address_picks_a_private_local_ray_or_a_cluster() -> None:
    local = init_args(None, 2)
    assert (local["address"], local["num_cpus"], local["include_dashboard"]) == ("local", 2, False)
    assert init_args("local", None)["num_cpus"] >= 1
    assert init_args("auto", None)["address"] == "auto"
    assert init_args("ray://head:10001", None)["address"] == "ray://head:10001"
    with pytest.raises(ConfigError, match="local Ray"):
        init_args("auto", 4)


def test_ray_options_without_ray_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", str(tmp_path), "--index", str(tmp_path / "B"), "--actors", "2"]) == 1
    assert "go with --ray" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path), "--index", str(tmp_path / "B"), "--ray", "--workers", "2"]) == 1
    assert "with --ray, actors decode" in capsys.readouterr().err
    assert not (tmp_path / "B").exists()
