"""The catalog's vector store: every model version's vectors in one place, with one
code path; ``base`` differs only in that its vectors cannot be dropped."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vsearch.catalog import BASE_MODEL, Catalog
from vsearch.errors import IndexFormatError
from vsearch.vectorstore import SCHEMA_VERSION

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


def old_sample(ids: list[int], vectors: dict[int, np.ndarray], n: int, seed: int) -> np.ndarray:
    """sample_vectors as the previous release computed it, for the same data."""
    if len(ids) > n:
        ids = sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
    return np.stack([vectors[i] for i in ids])


@pytest.mark.parametrize("model", [BASE_MODEL, FT])
def test_sample_vectors_draws_what_it_always_drew(catalog: Catalog, model: str) -> None:
    rng = np.random.default_rng(7)
    vectors: dict[int, np.ndarray] = {}
    with catalog.transaction():
        for n in range(300):
            catalog.upsert_product(f"p{n}")
            v = rng.standard_normal(8).astype(np.float32)
            vectors[catalog.put_image(f"p{n}", f"{n}.jpg", f"sha{n}", 1, 1, v, model=model)] = v
        catalog.remove_images(list(vectors)[::7])  # gaps in the ids, like a catalog that lived
    ids = sorted(set(vectors) - set(list(vectors)[::7]))
    for seed in (0, 1, 42):
        sample = catalog.sample_vectors(100, seed=seed, model=model)
        np.testing.assert_array_equal(sample, old_sample(ids, vectors, 100, seed))
        np.testing.assert_array_equal(sample, catalog.sample_vectors(100, seed=seed, model=model))
    assert not np.array_equal(catalog.sample_vectors(100, seed=0, model=model), catalog.sample_vectors(100, seed=1, model=model))
    np.testing.assert_array_equal(catalog.sample_vectors(1000, model=model), np.stack([vectors[i] for i in ids]))


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
