"""Category blocks follow writes image by image (issue 10: every write used to drop
every block and its cached vectors, so the next filtered search re-read the whole
catalog): after any mix of writes the blocks equal a fresh read, and the cached
vectors of categories a write did not touch are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vsearch import Engine
from vsearch.index import VectorIndex
from vsearch.query import SearchOptions

from .api_helpers import build_small_index, jpeg
from .conftest import make_image

CATEGORIES = ["Fruit/Apple", "Fruit/Banana", "Dairy/Milk", "Dairy/Yoghurt", "Bakery", "New"]


def _blocks(engine: Engine) -> dict[str, list[int]]:
    leaves = engine.snapshot.filters._leaves
    assert leaves is not None
    return {c: ids.tolist() for c, ids in sorted(leaves.items())}


def _fresh(engine: Engine) -> dict[str, list[int]]:
    return {c: ids.tolist() for c, ids in sorted(engine.catalog.category_image_ids().items())}


def test_blocks_follow_random_writes_and_keep_untouched_caches(tmp_path: Path) -> None:
    index = build_small_index(tmp_path)
    rng = np.random.default_rng(7)
    with Engine.open(index) as engine:
        query = engine.embed_queries([make_image(3)])
        engine.search_vectors(query, SearchOptions(k=3, categories=("Bakery",)))  # reads the blocks, caches Bakery
        for step in range(30):
            action = rng.integers(3)
            name = f"w{int(rng.integers(8))}"
            category = CATEGORIES[int(rng.integers(1, 4))]  # never Bakery
            if action == 0:
                engine.put_product(name, category=category, images=[jpeg(int(rng.integers(1000)))])
            elif action == 1 and name in engine.catalog.product_ids():
                engine.put_product(name, category=CATEGORIES[int(rng.integers(1, 4))])  # moved, images kept
            elif name in engine.catalog.product_ids():
                engine.delete_product(name)
            assert _blocks(engine) == _fresh(engine), f"step {step}"
            assert "Bakery" in engine.snapshot.filters.cache._entries, "an untouched category's vectors were dropped"
            hits = engine.search_vectors(query, SearchOptions(k=50, categories=("Fruit",), group_by_product=False))[0]
            products = engine.catalog.products(sorted(engine.catalog.product_ids()))
            fruit = {pid for pid, p in products.items() if p.category.startswith("Fruit")}
            assert {h.product_id for h in hits} == fruit
        engine.put_product("Bakery/p04", category="Dairy/Milk")  # a move out of the cached category drops its vectors
        assert "Bakery" not in engine.snapshot.filters.cache._entries
        assert _blocks(engine) == _fresh(engine)


def test_a_filtered_search_votes_from_a_sample_not_a_second_exhaustive_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    search = VectorIndex.search

    def counted(self: VectorIndex, xq: np.ndarray, k: int, *args: object, **kwargs: object) -> object:
        calls.append(bool(args and args[0] is not None or kwargs.get("blocks") is not None))
        return search(self, xq, k, *args, **kwargs)  # type: ignore[arg-type]

    index = build_small_index(tmp_path)  # its ingest searches too (near-duplicates): not counted
    monkeypatch.setattr(VectorIndex, "search", counted)
    with Engine.open(index) as engine:
        raw = engine.product_vector("Bakery/p04")
        filtered = SearchOptions(k=3, categories=("Dairy",))
        engine.search_and_suggest(raw, filtered)
        assert calls == [True, False]  # a catalog no bigger than the sample: the full search votes
        monkeypatch.setattr("vsearch.categories.VOTE_SAMPLE", 10)  # 25 images: every 3rd votes
        calls.clear()
        _, votes = engine.search_and_suggest(raw, filtered)
        assert calls == [True]  # the filtered search only
        assert votes[0] and abs(sum(share for _, share in votes[0]) - 1) < 1e-3
        assert {c for c, _ in votes[0]} <= {"Fruit/Apple", "Fruit/Banana", "Dairy/Milk", "Dairy/Yoghurt", "Bakery"}
        sampled = engine.snapshot.filters.sample_neighbours(raw_projected(engine, raw), 20, engine.index.reconstruct)  # type: ignore[union-attr]
        assert sampled is not None and sampled.shape == (1, 10)  # every 3rd of each category's 5: 10, all ranked
        # a write to a category replaces its cached sample vectors, never serves stale ones
        engine.put_product("Bakery/p04", category="Bakery", images=[jpeg(990)])
        again = engine.snapshot.filters.sample_neighbours(raw_projected(engine, raw), 20, engine.index.reconstruct)  # type: ignore[union-attr]
        assert again is not None
        ids = np.sort(again[0])
        cache = engine.snapshot.filters.cache
        for key, (cached_ids, xb) in cache._entries.items():
            if key.startswith("\0vote:"):
                np.testing.assert_array_equal(xb, engine.index.reconstruct(cached_ids))  # type: ignore[union-attr]
        assert len(ids) == 10


def raw_projected(engine: Engine, raw: np.ndarray) -> np.ndarray:
    return engine.snapshot.projection.apply(raw)
