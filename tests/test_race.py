"""Searches running while an ingest writes: each sees a write completely or not at all."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vsearch import Engine
from vsearch.index import VectorIndex
from vsearch.query import SearchOptions
from vsearch.sources import Item

from .conftest import make_image

MODEL = "tiny-test"
BATCH = 4


def _items(folder: Path, start: int, n: int) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(start, start + n):
        path = folder / f"img{i:04d}.png"
        make_image(i, size=(40, 36)).save(path)
        items.append(Item(product_id=f"p{i:04d}", image=str(path), category=f"C{i % 3}"))
    return items


def test_searches_during_ingest_see_whole_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small batches, each added to faiss in two halves with a pause between (as a
    slow add on a big index would be), into a Flat index that reallocates as it grows.
    Every search must return the seed products plus a whole number of batches, in
    commit order: never half a batch, never a crash."""
    seed = _items(tmp_path / "seed", 0, 8)
    later = _items(tmp_path / "later", 8, 240)
    original_add = VectorIndex.add

    def slow_add(self: VectorIndex, ids: np.ndarray, xb: np.ndarray, new: bool = False) -> None:
        half = len(ids) // 2
        original_add(self, ids[:half], xb[:half], new)
        time.sleep(0.002)  # a search landing here would see half a batch
        original_add(self, ids[half:], xb[half:], new)

    with Engine.open(tmp_path / "index", model=MODEL, create=True) as engine:
        engine.ingest(seed, quiet=True, workers=0)
        monkeypatch.setattr(VectorIndex, "add", slow_add)
        query = engine.embed_queries([make_image(3)])
        options = SearchOptions(k=1000, group_by_product=False)
        stop = threading.Event()
        seen: list[set[str]] = []
        errors: list[BaseException] = []

        def search() -> None:
            try:
                while not stop.is_set():
                    seen.append({hit.product_id for hit in engine.search_vectors(query, options)[0]})
                    filtered = engine.search_vectors(query, SearchOptions(k=1000, categories=["C1"]))[0]
                    seen.append({hit.product_id for hit in filtered} | {"filtered"})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=search) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            report = engine.ingest(later, quiet=True, workers=0, batch_size=BATCH)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not errors, errors[0]
        assert report.embedded == len(later)
        assert len(seen) > 20, "the searches never overlapped the ingest"

    order = [item.product_id for item in seed + later]
    states = [set(order[: len(seed) + n]) for n in range(0, len(later) + 1, BATCH)]
    filtered_states = [{p for p in s if int(p[1:]) % 3 == 1} | {"filtered"} for s in states]
    torn = [s for s in seen if s not in (filtered_states if "filtered" in s else states)]
    assert not torn, f"{len(torn)} of {len(seen)} searches saw a partial batch, e.g. {len(torn[0]) - 1} products"
