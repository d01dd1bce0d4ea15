"""Day one: the server samples its shoppers' query embeddings and refits the
projection on them (issue 11 part 1); ``vsearch refit`` does it from the CLI and
goes back to the catalog's own fit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsearch import Engine, refit
from vsearch.catalog import BASE_MODEL
from vsearch.cli import main
from vsearch.config import ServeConfig
from vsearch.errors import QueryDataError
from vsearch.query import ImageQuery, SearchOptions
from vsearch.reservoir import QueryReservoir
from vsearch.service import SearchService

MODEL = "tiny-test"


def test_the_reservoir_keeps_a_bounded_uniform_sample_and_saves_it(tmp_path: Path) -> None:
    reservoir = QueryReservoir(1000, BASE_MODEL, seed=1)
    stream = np.arange(20_000, dtype=np.float32)[:, None] * np.ones((1, 4), dtype=np.float32) / 20_000
    for lo in range(0, len(stream), 64):
        reservoir.add(stream[lo : lo + 64], BASE_MODEL)
    kept = reservoir.vectors()
    assert (reservoir.seen, kept.shape) == (20_000, (1000, 4))
    # uniform over the whole stream: the mean position is the stream's middle, and
    # the last tenth holds about a tenth (a "keep the first" or "keep the newest" bug fails)
    assert abs(float(kept[:, 0].mean()) - 0.5) < 0.03
    assert 70 < int((kept[:, 0] >= 0.9).sum()) < 130
    path = tmp_path / "query_vectors.npz"
    reservoir.save(path)
    again = QueryReservoir.load(path, 1000, BASE_MODEL)
    assert again.seen == 20_000 and np.allclose(np.sort(again.vectors()[:, 0]), np.sort(kept[:, 0]), atol=1e-3)
    assert len(QueryReservoir.load(path, 1000, "ft-1")) == 0  # another version's sample does not carry over
    assert len(QueryReservoir.load(path, 10, BASE_MODEL)) == 10
    again.add(np.ones((1, 8), dtype=np.float32), BASE_MODEL)  # another dimension: a new sample
    assert (again.seen, len(again)) == (1, 1)


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def served(index_dir: Path, catalog_folder: Path) -> Engine:
    engine = Engine.open(index_dir, model=MODEL, create=True)
    engine.ingest(catalog_folder, quiet=True, workers=0)
    return engine


def test_a_server_refits_on_its_queries_keeps_every_vector_and_remembers(served: Engine, index_dir: Path) -> None:
    config = ServeConfig(index_dir=str(index_dir), query_reservoir=50, refit_after_queries=8, reload_interval_s=0)
    service = SearchService(served, config)
    service.warm_up()  # not a shopper's photo: not sampled
    assert service.learner.reservoir.seen == 0
    before = served.snapshot.projection
    for seed in range(7):
        service.search(ImageQuery(photo(seed)), SearchOptions(k=3))
    assert not service.learner.tick()  # 7 < 8: not due
    service.search(ImageQuery(photo(7)), SearchOptions(k=3))
    assert service.learner.tick()
    info = served.info()
    assert info["projection"]["fitted_from"] == "queries" and info["projection"]["fitted_on"] == 8
    assert served.snapshot.projection is not before and not np.allclose(served.snapshot.projection.mean, before.mean)
    assert info["vectors"] == info["images"] == 25  # every catalog vector is in the refitted index
    hits = service.search(ImageQuery(photo(0)), SearchOptions(k=3)).hits  # sent before: not counted again
    assert len(hits) == 3 and service.learner.reservoir.seen == 8
    service.search(ImageQuery(photo(8)), SearchOptions(k=3))
    assert service.learner.next_refit == 16  # again at the next doubling
    service.close()
    served.close()

    with Engine.open(index_dir) as engine:  # persisted: the sample and what the projection was fitted on
        assert engine.info()["projection"]["fitted_from"] == "queries"
        again = SearchService(engine, config)
        assert again.learner.reservoir.seen == 9 and again.learner.next_refit == 16
        again.close()


def test_vsearch_refit_from_queries_and_back_to_the_catalog(
    served: Engine, index_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog_fit = served.snapshot.projection
    reservoir = QueryReservoir(100, BASE_MODEL)
    reservoir.add(np.random.default_rng(0).normal(size=(12, served.snapshot.raw_dim)), BASE_MODEL)
    reservoir.save(served.paths.queries)
    served.close()

    assert main(["refit", "--index", str(index_dir), "--from-queries"]) == 1  # 12 < MIN_QUERIES
    assert "12 query photos" in capsys.readouterr().err
    monkeypatch.setattr(refit, "MIN_QUERIES", 10)
    assert main(["refit", "--index", str(index_dir), "--from-queries"]) == 0
    assert "fitted on 12 vectors from queries" in capsys.readouterr().out
    with Engine.open(index_dir) as engine:
        assert engine.info()["vectors"] == 25
        assert not np.allclose(engine.snapshot.projection.mean, catalog_fit.mean)
    assert main(["refit", "--index", str(index_dir), "--catalog"]) == 0
    assert "fitted on 25 vectors from catalog" in capsys.readouterr().out
    with Engine.open(index_dir) as engine:  # reversible: the catalog's own fit again
        assert np.allclose(engine.snapshot.projection.mean, catalog_fit.mean, atol=1e-6)
        assert engine.info()["vectors"] == 25


def test_refit_from_queries_refuses_too_few(served: Engine) -> None:
    with pytest.raises(QueryDataError, match="0 query photos"):
        refit.refit_from_queries(served)
    served.close()


def test_the_api_server_learns_in_the_background(tmp_path: Path) -> None:
    """The watcher thread of ``vsearch serve`` runs the learner: searches through the
    API are sampled, the refit lands without a request waiting for it, and the sample
    is saved with the checkpoints."""
    import time

    from fastapi.testclient import TestClient

    from vsearch.api import create_app

    from .api_helpers import build_small_index, jpeg

    index = build_small_index(tmp_path)
    config = ServeConfig(
        index_dir=str(index), refit_after_queries=4, query_reservoir=20, reload_interval_s=0.05, checkpoint_interval_s=0.2
    )
    with TestClient(create_app(config)) as client:
        assert client.get("/v1/info").json()["projection"]["fitted_from"] == "catalog"
        images = client.get("/v1/info").json()["images"]
        for seed in range(4):
            response = client.post("/v1/search", files={"image": ("q.jpg", jpeg(seed), "image/jpeg")})
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client.get("/v1/info").json()["projection"]["fitted_from"] != "queries":
            time.sleep(0.05)
        info = client.get("/v1/info").json()
        assert info["projection"]["fitted_from"] == "queries" and info["projection"]["fitted_on"] == 4
        assert info["vectors"] == info["images"] == images
        assert client.post("/v1/search", files={"image": ("q.jpg", jpeg(9), "image/jpeg")}).status_code == 200
        while time.monotonic() < deadline and not (index / "query_vectors.npz").exists():
            time.sleep(0.05)
    assert QueryReservoir.load(index / "query_vectors.npz", 20, BASE_MODEL).seen == 5


def test_a_photo_sent_again_is_not_counted_again() -> None:
    reservoir = QueryReservoir(50, BASE_MODEL)
    same = np.random.default_rng(3).normal(size=(1, 6)).astype(np.float32)
    for _ in range(300):  # a bot, or a retrying client: one photo cannot fill the sample
        reservoir.add(same, BASE_MODEL)
    assert (reservoir.seen, len(reservoir)) == (1, 1)
    other = np.random.default_rng(4).normal(size=(30, 6)).astype(np.float32)
    reservoir.add(other, BASE_MODEL)
    reservoir.add(other, BASE_MODEL)
    assert (reservoir.seen, len(reservoir)) == (31, 31)
    full = QueryReservoir(10, BASE_MODEL)
    full.add(other, BASE_MODEL)
    full.add(other, BASE_MODEL)  # those still in the sample are not counted again; evicted ones may be
    assert full.seen < 60 and len(full) == 10 and len({row.tobytes() for row in full.vectors()}) == 10


def test_a_projection_fitted_on_chosen_photos_is_not_replaced_automatically(
    served: Engine, index_dir: Path, catalog_folder: Path
) -> None:
    refit.fit_projection(served, catalog_folder)  # the merchant's --center-on photos
    chosen = served.snapshot.projection
    service = SearchService(served, ServeConfig(index_dir=str(index_dir), refit_after_queries=2, reload_interval_s=0))
    for seed in range(3):
        service.search(ImageQuery(photo(seed)), SearchOptions(k=3))
    assert service.learner.reservoir.seen == 3 and not service.learner.tick()
    assert served.snapshot.projection is chosen and served.info()["projection"]["fitted_from"] == "photos"
    service.close()
    served.close()
