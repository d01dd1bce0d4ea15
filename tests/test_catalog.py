"""The catalog's vector store: every model version's vectors in one place, with one
code path; ``base`` differs only in that its vectors cannot be dropped."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from vsearch.catalog import BASE_MODEL, Catalog
from vsearch.config import IndexConfig
from vsearch.errors import ConfigError, IndexFormatError
from vsearch.migrate import SCHEMA_VERSION

FT = "ft-1"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog.open(tmp_path / "catalog.db")
    yield catalog
    catalog.close()


def vec(value: float, dim: int = 4) -> np.ndarray:
    return np.full(dim, value, dtype=np.float32)


def stored(catalog: Catalog, model: str) -> dict[int, list[float]]:
    return {int(i): v.tolist() for ids, vectors in catalog.iter_vectors(model=model) for i, v in zip(ids, vectors)}


def vector_rows(catalog: Catalog) -> int:
    return int(catalog.db.execute("SELECT count(*) FROM model_vectors").fetchone()[0])


def add(catalog: Catalog, product: str, source: str, sha: str, vector: np.ndarray, model: str = BASE_MODEL) -> int:
    with catalog.transaction():
        catalog.upsert_product(product, category="c")
        return catalog.put_image(product, source, sha, 10, 10, vector, model=model)


@pytest.mark.parametrize("model", [BASE_MODEL, FT])
def test_every_model_is_stored_and_read_the_same_way(catalog: Catalog, model: str) -> None:
    other = FT if model == BASE_MODEL else BASE_MODEL
    a = add(catalog, "p", "a.jpg", "sha-a", vec(1.0), model=model)
    b = add(catalog, "p", "b.jpg", "sha-b", vec(2.0), model=model)
    assert stored(catalog, model) == {a: vec(1.0).tolist(), b: vec(2.0).tolist()}
    assert catalog.vector_dim(model) == 4 and catalog.vector_dim(other) == 0
    np.testing.assert_array_equal(catalog.vectors_of("p", model=model), [vec(1.0), vec(2.0)])
    assert catalog.vectors_of("p", model=other).shape == (0, 0)
    assert catalog.images_without_vectors(model) == []
    assert [r.id for r in catalog.images_without_vectors(other)] == [a, b]
    with catalog.transaction(bump=False):
        assert catalog.put_vectors(other, [(a, "sha-a", vec(3.0, dim=6))]) == 1
    assert catalog.vector_dim(other) == 6  # each model has its own dimension
    assert [r.id for r in catalog.images_without_vectors(other)] == [b]
    np.testing.assert_array_equal(catalog.sample_vectors(10, model=other), [vec(3.0, dim=6)])


def test_new_content_invalidates_every_other_models_vector(catalog: Catalog) -> None:
    image = add(catalog, "p", "a.jpg", "sha-1", vec(1.0))
    with catalog.transaction(bump=False):
        assert catalog.put_vectors(FT, [(image, "sha-1", vec(2.0))]) == 1
        assert catalog.put_vectors("ft-2", [(image, "sha-1", vec(3.0))]) == 1
    assert add(catalog, "p", "a.jpg", "sha-2", vec(4.0), model=FT) == image  # same (product, source): same id
    assert stored(catalog, FT) == {image: vec(4.0).tolist()}
    assert stored(catalog, BASE_MODEL) == {} and stored(catalog, "ft-2") == {}
    assert [r.id for r in catalog.images_without_vectors(BASE_MODEL)] == [image]
    assert catalog.sample_vectors(10).size == 0
    add(catalog, "p", "a.jpg", "sha-3", vec(5.0))  # and the other way round
    assert stored(catalog, BASE_MODEL) == {image: vec(5.0).tolist()} and stored(catalog, FT) == {}
    assert vector_rows(catalog) == 1


@pytest.mark.parametrize("model", [BASE_MODEL, FT])
def test_same_content_keeps_the_other_models_vectors(catalog: Catalog, model: str) -> None:
    other = FT if model == BASE_MODEL else BASE_MODEL
    image = add(catalog, "p", "a.jpg", "sha-1", vec(1.0), model=other)
    add(catalog, "p", "a.jpg", "sha-1", vec(2.0), model=model)
    assert stored(catalog, other) == {image: vec(1.0).tolist()}
    assert stored(catalog, model) == {image: vec(2.0).tolist()}
    add(catalog, "p", "a.jpg", "sha-1", vec(3.0), model=model)  # same content again: this model's vector replaced
    assert stored(catalog, model) == {image: vec(3.0).tolist()} and vector_rows(catalog) == 2


@pytest.mark.parametrize("model", [BASE_MODEL, FT])
def test_put_vectors_skips_rows_whose_image_changed_or_went(catalog: Catalog, model: str) -> None:
    a = add(catalog, "p", "a.jpg", "sha-a", vec(1.0), model="other")
    b = add(catalog, "q", "b.jpg", "sha-b", vec(1.0), model="other")
    rows = catalog.images_without_vectors(model)  # read, then the catalog moves on
    add(catalog, "p", "a.jpg", "sha-a2", vec(1.0), model="other")
    with catalog.transaction():
        catalog.remove_products(["q"])
    with catalog.transaction(bump=False):
        generation = catalog.generation
        stored_n = catalog.put_vectors(model, [(r.id, r.sha256, vec(9.0)) for r in rows])
    assert stored_n == 0 and stored(catalog, model) == {}
    assert catalog.generation == generation  # bump=False: the served index is still current
    assert [r.id for r in catalog.images_without_vectors(model)] == [a] and b not in stored(catalog, "other")


def test_removing_images_or_products_removes_all_their_vectors(catalog: Catalog) -> None:
    a = add(catalog, "p", "a.jpg", "sha-a", vec(1.0))
    b = add(catalog, "p", "b.jpg", "sha-b", vec(2.0))
    c = add(catalog, "q", "c.jpg", "sha-c", vec(3.0))
    with catalog.transaction(bump=False):
        catalog.put_vectors(FT, [(a, "sha-a", vec(4.0)), (b, "sha-b", vec(5.0)), (c, "sha-c", vec(6.0))])
    assert vector_rows(catalog) == 6
    with catalog.transaction():
        catalog.remove_images([a])
    assert set(stored(catalog, BASE_MODEL)) == set(stored(catalog, FT)) == {b, c}
    with catalog.transaction():
        assert catalog.remove_products(["p"]) == [b]
    assert set(stored(catalog, BASE_MODEL)) == set(stored(catalog, FT)) == {c}
    assert vector_rows(catalog) == 2


def test_only_the_base_models_vectors_cannot_be_dropped(catalog: Catalog) -> None:
    image = add(catalog, "p", "a.jpg", "sha-a", vec(1.0))
    with catalog.transaction(bump=False):
        catalog.put_vectors(FT, [(image, "sha-a", vec(2.0))])
        with pytest.raises(ValueError, match="base"):
            catalog.drop_model_vectors(BASE_MODEL)
        catalog.drop_model_vectors(FT)
    assert stored(catalog, FT) == {} and stored(catalog, BASE_MODEL) == {image: vec(1.0).tolist()}


def filled(catalog: Catalog, n: int, model: str = BASE_MODEL, dim: int = 8) -> dict[int, np.ndarray]:
    """``n`` images with random vectors (as stored: float16-rounded), every 7th removed
    again (gaps in the ids, like a catalog that lived); id -> vector of those left."""
    rng = np.random.default_rng(7)
    vectors: dict[int, np.ndarray] = {}
    with catalog.transaction():
        for k in range(n):
            catalog.upsert_product(f"p{k}")
            v = catalog.as_stored(rng.standard_normal(dim).astype(np.float32))
            vectors[catalog.put_image(f"p{k}", f"{k}.jpg", f"sha{k}", 1, 1, v, model=model)] = v
        gone = list(vectors)[::7]
        catalog.remove_images(gone)
    return {i: v for i, v in vectors.items() if i not in gone}


@pytest.mark.parametrize("model", [BASE_MODEL, FT])
@pytest.mark.parametrize("n", [100, 20])  # id range within SCAN_SPAN * n: ids read; beyond: ids drawn
def test_sample_vectors_is_seeded_uniform_and_in_id_order(
    catalog: Catalog, model: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = filled(catalog, 300, model)
    monkeypatch.setattr("vsearch.vectorstore.CHUNK", 7)  # ids looked up and vectors read (and transformed) in many chunks
    for seed in (0, 1, 42):
        sample = catalog.sample_vectors(n, seed=seed, model=model)
        ids = catalog._vectors.sample_ids(n, seed, model)
        assert len(ids) == n == len(set(ids)) and ids == sorted(ids) and set(ids) <= set(vectors)
        np.testing.assert_array_equal(sample, np.stack([vectors[i] for i in ids]))
        np.testing.assert_array_equal(sample, catalog.sample_vectors(n, seed=seed, model=model))
        assert sample.dtype == np.float32
        halves = catalog.sample_vectors(n, seed=seed, model=model, transform=lambda chunk: chunk[:, :4] / 2)
        np.testing.assert_array_equal(halves, sample[:, :4] / 2)  # applied a chunk at a time
    assert catalog._vectors.sample_ids(n, 0, model) != catalog._vectors.sample_ids(n, 1, model)
    # uniform: over 400 seeds every id is drawn about 400 * n / len(vectors) times
    counts = np.zeros(max(vectors) + 1)
    for seed in range(400):
        counts[catalog._vectors.sample_ids(n, seed, model)] += 1
    expected = 400 * n / len(vectors)
    assert counts[list(vectors)].min() > 0.5 * expected and counts[list(vectors)].max() < 1.6 * expected
    assert counts.sum() == 400 * n
    # all of them, in id order, when fewer than asked for
    np.testing.assert_array_equal(catalog.sample_vectors(1000, model=model), np.stack([vectors[i] for i in sorted(vectors)]))


def test_sampling_sparse_ids_reads_them_instead(catalog: Catalog) -> None:
    vectors = filled(catalog, 400)
    with catalog.transaction():  # 40 of 400 ids left: drawing would mostly miss
        catalog.remove_images([i for i in vectors if i % 10])
    left = sorted(i for i in vectors if i % 10 == 0)
    assert catalog._vectors._draw(np.random.default_rng(0), BASE_MODEL, min(left), max(left) - min(left) + 1, 30) is None
    ids = catalog._vectors.sample_ids(30, 0, BASE_MODEL)
    assert len(ids) == 30 and set(ids) <= set(left) and ids == catalog._vectors.sample_ids(30, 0, BASE_MODEL)
    assert catalog._vectors.sample_ids(50, 0, BASE_MODEL) == left
    assert catalog.sample_vectors(5, model="none").shape == (0, 0)


def vm_steps(catalog: Catalog, fn: Callable[[], object]) -> int:
    """SQLite virtual-machine instructions ``fn`` runs: a deterministic measure of work."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 100
        return 0

    catalog.db.conn.set_progress_handler(count, 100)
    try:
        fn()
    finally:
        catalog.db.conn.set_progress_handler(None, 0)
    return steps


def _scan(catalog: Catalog) -> int:
    return sum(len(ids) for ids, _ in catalog.iter_vectors())


def test_sampling_costs_what_the_sample_costs_not_the_table(tmp_path: Path) -> None:
    work = {}
    for n in (2_000, 32_000):
        catalog = Catalog.open(tmp_path / f"{n}.db")
        db = catalog.db.conn
        with catalog.transaction():  # bulk, in SQL: the catalog's own rows, 16 numbers each
            db.executemany("INSERT INTO products(id, created_at, updated_at) VALUES (?, 0, 0)", [(f"p{i}",) for i in range(n)])
            db.executemany(
                "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
                "VALUES (?, ?, 's', 'h', 1, 1, 0, 0)",
                [(i + 1, f"p{i}") for i in range(n)],
            )
            db.executemany(
                "INSERT INTO model_vectors(model, image_id, vector, dtype) VALUES ('base', ?, ?, 1)",
                [(i + 1, np.full(16, i, dtype=np.float16).tobytes()) for i in range(n)],
            )
        sample, scan = functools.partial(catalog.sample_vectors, 100), functools.partial(_scan, catalog)
        work[n] = (vm_steps(catalog, sample), vm_steps(catalog, scan))
        assert len(catalog.sample_vectors(100)) == 100
        catalog.close()
    (sample_small, scan_small), (sample_big, scan_big) = work[2_000], work[32_000]
    assert scan_big > 10 * scan_small  # a scan follows the table
    assert sample_big < 2 * sample_small  # a sample does not


def test_iter_vectors_pages_in_id_order(catalog: Catalog) -> None:
    with catalog.transaction():
        for n in range(10):
            catalog.upsert_product(f"p{n}")
            catalog.put_image(f"p{n}", "x.jpg", f"sha{n}", 1, 1, vec(float(n)))
    pages = list(catalog.iter_vectors(batch=4))
    assert [len(ids) for ids, _ in pages] == [4, 4, 2]
    ids = np.concatenate([ids for ids, _ in pages])
    assert ids.tolist() == sorted(ids.tolist())
    np.testing.assert_array_equal(np.concatenate([v for _, v in pages])[:, 0], np.arange(10, dtype=np.float32))


def test_a_new_catalog_has_the_current_schema_and_reopening_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = Catalog.open(path)
    add(catalog, "p", "a.jpg", "sha-a", vec(1.0))
    generation = catalog.generation
    columns = {r[1] for r in catalog.db.execute("PRAGMA table_info(images)")}
    assert "vector" not in columns
    version = catalog.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert int(version) == SCHEMA_VERSION
    catalog.close()
    before = path.read_bytes()
    catalog = Catalog.open(path)
    assert catalog.generation == generation and catalog.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    catalog.close()
    assert path.read_bytes() == before


def test_a_catalog_from_a_newer_vsearch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    Catalog.open(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    with pytest.raises(IndexFormatError, match="newer"):
        Catalog.open(path)


def test_rows_are_float16_by_default_and_every_read_is_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    unit = rng.standard_normal(64).astype(np.float32)
    unit /= np.linalg.norm(unit)
    huge, tiny = unit * 1e6, unit * 1e-6  # past float16's range; in its subnormals
    odd = np.full(64, np.nan, dtype=np.float32)
    catalog = Catalog.open(tmp_path / "catalog.db")
    ids = [add(catalog, f"p{k}", "a.jpg", f"sha{k}", v) for k, v in enumerate([unit, huge, tiny, odd])]
    rows = catalog.db.execute("SELECT image_id, dtype, length(vector) FROM model_vectors ORDER BY image_id").fetchall()
    assert rows == [(ids[0], 1, 128), (ids[1], 0, 256), (ids[2], 0, 256), (ids[3], 0, 256)]  # kept exact where float16 fails
    batch = np.stack([unit, huge, tiny, odd])
    want = catalog.as_stored(batch)  # what the index should hold: what a read gives back
    assert want.dtype == np.float32 and np.array_equal(want[1:], batch[1:], equal_nan=True)
    np.testing.assert_array_equal(want[0], unit.astype(np.float16).astype(np.float32))
    assert np.abs(want[0] - unit).max() < 1e-3 and not np.array_equal(want[0], unit)
    got_ids, got = catalog.vectors_by_id(ids)
    assert got.dtype == np.float32 and got.flags.writeable
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.concatenate([v for _, v in catalog.iter_vectors(batch=3)]), want, equal_nan=True)
    np.testing.assert_array_equal(catalog.vectors_of("p0"), want[:1])
    assert catalog.vector_dim() == 64
    catalog.close()
    with pytest.raises(ConfigError, match="raw_vectors"):
        Catalog.open(tmp_path / "other.db", raw_vectors="int8")
    assert not (tmp_path / "other.db").exists()
    with pytest.raises(ConfigError, match="raw_vectors"):
        IndexConfig(raw_vectors="int8")
    assert IndexConfig().raw_vectors == "float16"
