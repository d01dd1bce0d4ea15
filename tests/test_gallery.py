"""The per-product blend of a fine-tuned version's catalog vectors (vsearch.gallery)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image, write_catalog
from tests.test_finetune import SMALL, product_id, write_photos
from vsearch import Engine
from vsearch.adapter import AdapterConfig
from vsearch.errors import ModelError
from vsearch.finetune import finetune
from vsearch.gallery import TRAINED_FILE, GalleryWeights
from vsearch.versions import gallery_for, version_dir


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_untrained_products_get_the_untrained_share_and_stay_unit_length() -> None:
    rng = np.random.default_rng(0)
    w, u, adapted_dim = 0.5, 0.7, 8
    zero, adapted = _unit(rng, 6, 12), _unit(rng, 6, adapted_dim)
    raw = np.hstack([math.sqrt(w) * zero, math.sqrt(1 - w) * adapted])
    gallery = GalleryWeights(adapted_dim, w, u, frozenset({"a", "b"}))
    products = ["a", "x", "b", None, "y", "a"]
    out = gallery.apply(products, raw)
    untrained = np.array([p not in {"a", "b"} for p in products])
    np.testing.assert_array_equal(out[~untrained], raw[~untrained])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # a query keeps share w: its similarity to an untrained image weighs the zero-shot part by sqrt(w * u)
    qz, qa = _unit(rng, 1, 12)[0], _unit(rng, 1, adapted_dim)[0]
    query = np.concatenate([math.sqrt(w) * qz, math.sqrt(1 - w) * qa])
    expected = math.sqrt(w * u) * zero @ qz + math.sqrt((1 - w) * (1 - u)) * adapted @ qa
    np.testing.assert_allclose((out @ query)[untrained], expected[untrained], atol=1e-6)
    np.testing.assert_array_equal(gallery.apply(["a", "b"], raw[:2]), raw[:2])
    with pytest.raises(ModelError):
        GalleryWeights(adapted_dim, 0.5, 1.5, frozenset())


def _indexed(engine: Engine, ids: list[int]) -> np.ndarray:
    assert engine.index is not None
    return engine.index.reconstruct(np.array(ids, dtype=np.int64))


def _stored(engine: Engine, ids: list[int], products: list[str] | None = None) -> np.ndarray:
    """The stored vectors of ``ids``, reweighted as the products ``products`` (if
    given) by the served gallery weights, and projected: what the index should hold."""
    got, raw = engine.catalog.vectors_by_id(ids, engine.active)
    assert list(got) == ids
    snap = engine.snapshot
    if products is not None:
        assert snap.gallery is not None
        raw = snap.gallery.apply(products, raw)
    return snap.projection.apply(raw)


@pytest.fixture
def half_trained(tmp_path: Path) -> tuple[Engine, str]:
    """A fine-tuned version whose pairs name products 0-14 only (15-24 have no photos)."""
    engine = Engine.open(tmp_path / "index", model="tiny-test", create=True)
    engine.ingest(write_catalog(tmp_path / "catalog"), quiet=True)
    pairs = write_photos(tmp_path / "photos")
    lines = pairs.read_text().splitlines()
    kept = [line for line in lines[1:] if int(Path(line.split(",")[0]).stem.split("_")[0]) < 15]
    pairs.write_text("\n".join([lines[0], *kept]))
    report = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None)
    yield engine, report.name
    engine.close()


def test_a_version_records_its_trained_products_and_indexes_the_others_reweighted(half_trained: tuple[Engine, str]) -> None:
    engine, name = half_trained
    folder = version_dir(engine.paths.root, name)
    trained = set(json.loads((folder / TRAINED_FILE).read_text()))
    assert trained and trained <= {product_id(n) for n in range(15)}  # the validation split may hold some back
    assert AdapterConfig.load(folder).untrained_weight == 0.7
    engine.use_model(name, quiet=True)
    gallery = engine.snapshot.gallery
    assert gallery is not None and gallery.trained == trained
    owners = engine.catalog.image_products(list(range(1, 200)))
    ids = sorted(owners)
    np.testing.assert_allclose(_indexed(engine, ids), _stored(engine, ids, [owners[i] for i in ids]), atol=1e-5)
    untrained = [i for i in ids if owners[i] not in trained]
    assert untrained and not np.allclose(_indexed(engine, untrained), _stored(engine, untrained), atol=1e-3)

    # a write path (a new product is untrained) and a rebuild index the same vectors
    photo = engine.paths.root.parent / "new.jpg"
    make_image(30).save(photo)
    engine.put_product("new", images=[str(photo)])
    new_id = max(engine.catalog.image_products(list(range(1, 200))))
    np.testing.assert_allclose(_indexed(engine, [new_id]), _stored(engine, [new_id], ["new"]), atol=1e-5)
    before = _indexed(engine, [*ids, new_id])
    with engine.writer() as writer:
        writer.rebuild()
    np.testing.assert_allclose(_indexed(engine, [*ids, new_id]), before, atol=1e-5)


def test_untrained_products_are_found_by_their_own_catalog_image(half_trained: tuple[Engine, str]) -> None:
    engine, name = half_trained
    engine.use_model(name, quiet=True)
    for n in (16, 20, 24):
        assert engine.search(make_image(n), k=1)[0].product_id == product_id(n)


def test_versions_without_a_record_of_trained_products_index_as_before(half_trained: tuple[Engine, str]) -> None:
    engine, name = half_trained
    folder = version_dir(engine.paths.root, name)
    config = json.loads((folder / "adapter.json").read_text())
    del config["untrained_weight"]  # as written before trained products were recorded
    (folder / "adapter.json").write_text(json.dumps(config))
    (folder / TRAINED_FILE).unlink()
    assert gallery_for(engine.paths, name) is None
    engine.use_model(name, quiet=True)
    owners = engine.catalog.image_products(list(range(1, 200)))
    ids = sorted(owners)
    np.testing.assert_allclose(_indexed(engine, ids), _stored(engine, ids), atol=1e-5)


def test_a_version_that_lost_its_trained_products_file_still_opens(half_trained: tuple[Engine, str]) -> None:
    engine, name = half_trained
    engine.use_model(name, quiet=True)
    (version_dir(engine.paths.root, name) / TRAINED_FILE).unlink()
    root = engine.paths.root
    engine.close()
    with Engine.open(root) as reopened:
        assert reopened.active == name and reopened.snapshot.gallery is None
        assert reopened.search(make_image(20), k=1)[0].product_id == product_id(20)
