from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vsearch import Engine
from vsearch.engine import SearchOptions
from vsearch.errors import FilterError, IndexFormatError, IndexNotFoundError
from vsearch.writer import IndexWriter, NewImage

from .conftest import make_image

MODEL = "tiny-test"


def build(index_dir: Path, source: Path, **kw: object) -> Engine:
    engine = Engine.open(index_dir, model=MODEL, create=True)
    engine.ingest(source, quiet=True, workers=0, **kw)  # type: ignore[arg-type]
    return engine


def vector_ids(engine: Engine) -> list[int]:
    assert engine.index is not None
    import faiss

    return sorted(faiss.vector_to_array(engine.index.index.id_map).tolist())


def test_ingest_then_search_finds_the_same_image(index_dir: Path, catalog_folder: Path) -> None:
    with build(index_dir, catalog_folder) as engine:
        info = engine.info()
        assert (info["products"], info["images"], info["vectors"]) == (25, 25, 25)
        assert info["raw_dim"] == engine.snapshot.embedder.get().dim and info["tuning"] is None  # Flat: nothing to tune
        index_ram = info["footprint"]["ram_bytes_per_image"]["index"]
        assert info["dim"] * 4 + 8 <= index_ram <= info["dim"] * 4 + 64  # a Flat code and an id (+ its map entry)
        catalog_bytes = info["footprint"]["disk_bytes"]["catalog"]
        assert catalog_bytes == sum(p.stat().st_size for p in index_dir.glob("catalog.db*") if not p.name.endswith("-shm"))
        hits = engine.search(catalog_folder / "Dairy/Milk/p02.jpg", k=5)
        assert hits[0].product_id == "Dairy/Milk/p02"
        assert hits[0].score > 0.9 > hits[1].score  # query TTA averages in a centre crop
        assert len({h.product_id for h in hits}) == 5


def test_rerun_does_no_model_work(index_dir: Path, catalog_folder: Path) -> None:
    build(index_dir, catalog_folder).close()
    with Engine.open(index_dir) as engine:
        report = engine.ingest(catalog_folder, quiet=True, workers=0)
        assert (report.embedded, report.unchanged) == (0, 25)
        assert not engine.snapshot.embedder.loaded, "unchanged images must not even load the model"


def test_changed_image_is_reembedded_under_the_same_id(index_dir: Path, catalog_folder: Path) -> None:
    target = catalog_folder / "Bakery/p04.jpg"
    with build(index_dir, catalog_folder) as engine:
        before = engine.catalog.image("Bakery/p04", str(target.resolve()))
        make_image(999).save(target)
        report = engine.ingest(catalog_folder, quiet=True, workers=0)
        assert report.embedded == 1
        after = engine.catalog.image("Bakery/p04", str(target.resolve()))
        assert before is not None and after is not None
        assert after.id == before.id and after.sha256 != before.sha256
        assert engine.search(target, k=1)[0].product_id == "Bakery/p04"
        assert engine.info()["vectors"] == 25


def test_prune_removes_absent_products_and_ids_are_never_reused(index_dir: Path, catalog_folder: Path) -> None:
    with build(index_dir, catalog_folder) as engine:
        ids_before = vector_ids(engine)
        (catalog_folder / "Bakery/p04.jpg").unlink()
        report = engine.ingest(catalog_folder, prune=True, quiet=True, workers=0)
        assert report.removed_products == 1
        assert engine.info()["vectors"] == 24
        make_image(4).save(catalog_folder / "Bakery/p04.jpg")
        engine.ingest(catalog_folder, quiet=True, workers=0)
        ids_after = vector_ids(engine)
        assert len(ids_after) == 25
        assert max(ids_after) > max(ids_before), "a deleted id must not be handed out again"
        assert set(ids_before) - set(ids_after) == {min(set(ids_before) - set(ids_after))}


def test_bad_files_are_rejected_and_the_rest_ingested(index_dir: Path, catalog_folder: Path) -> None:
    (catalog_folder / "Bakery/empty.jpg").write_bytes(b"")
    (catalog_folder / "Bakery/text.jpg").write_text("hello")
    good = (catalog_folder / "Bakery/p04.jpg").read_bytes()
    (catalog_folder / "Bakery/truncated.jpg").write_bytes(good[: len(good) // 3])
    with build(index_dir, catalog_folder) as engine:
        assert engine.info()["images"] == 25
        rejects = [json.loads(line) for line in (index_dir / "rejects.jsonl").read_text().splitlines()]
        reasons = {Path(r["source"]).name: r["reason"] for r in rejects}
        assert reasons["empty.jpg"] == "empty file"
        assert "not an image" in reasons["text.jpg"]
        assert "truncated" in reasons["truncated.jpg"]


def test_crash_after_a_batch_resumes_without_loss_or_duplicates(
    index_dir: Path, catalog_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine.open(index_dir, model=MODEL, create=True)
    calls = 0
    original = IndexWriter.add_images

    def crash_after_first_batch(self: IndexWriter, images: list[NewImage], vectors: np.ndarray, products: Any = ()) -> list[int]:
        nonlocal calls
        calls += 1
        ids = original(self, images, vectors, products)
        if calls == 1:
            raise KeyboardInterrupt  # stands in for Ctrl-C in the middle of a run
        return ids

    monkeypatch.setattr(IndexWriter, "add_images", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        engine.ingest(catalog_folder, quiet=True, workers=0, batch_size=8)
    monkeypatch.undo()
    committed = engine.catalog.counts()["images"]
    engine.close()
    assert committed == 8

    with Engine.open(index_dir) as engine:
        report = engine.ingest(catalog_folder, quiet=True, workers=0, batch_size=8)
        assert (report.embedded, report.unchanged) == (17, 8)
        assert engine.info()["vectors"] == engine.info()["images"] == 25
        assert vector_ids(engine) == sorted(set(vector_ids(engine)))


def test_stale_index_is_rebuilt_from_the_catalog(index_dir: Path, catalog_folder: Path) -> None:
    build(index_dir, catalog_folder).close()
    (index_dir / "index.faiss").unlink()  # as if killed before the index was written
    with Engine.open(index_dir) as engine:
        assert engine.info()["vectors"] == 25
        assert not engine.snapshot.embedder.loaded


def test_category_filters_prefix_and_exclude(index_dir: Path, catalog_folder: Path) -> None:
    with build(index_dir, catalog_folder) as engine:
        query = catalog_folder / "Dairy/Milk/p02.jpg"
        fruit = engine.search(query, k=10, categories=["Fruit"])
        assert len(fruit) == 10 and all(h.category.startswith("Fruit/") for h in fruit)
        two = engine.search(query, k=10, categories=["Fruit/Apple", "Bakery"])
        assert len(two) == 10 and {h.category for h in two} == {"Fruit/Apple", "Bakery"}
        no_dairy = engine.search(query, k=25, exclude_categories=["Dairy"])
        assert len(no_dairy) == 15 and not any(h.category.startswith("Dairy") for h in no_dairy)
        with pytest.raises(FilterError, match="Fruti"):
            engine.search(query, categories=["Fruti"])


def test_filtered_results_equal_brute_force_over_the_category(index_dir: Path, catalog_folder: Path) -> None:
    with build(index_dir, catalog_folder) as engine:
        query = catalog_folder / "Dairy/Milk/p02.jpg"
        raw = engine.embed_queries([engine.load_query(query)])
        hits = engine.search_vectors(raw, SearchOptions(k=3, categories=["Dairy"]))[0]
        xq = engine.snapshot.projection.apply(raw)[0]
        ids, vectors = zip(*[(int(i), v) for chunk_ids, chunk in engine.catalog.iter_vectors() for i, v in zip(chunk_ids, chunk)])
        owners = engine.catalog.image_products(list(ids))
        scored = sorted(
            (
                (float(engine.snapshot.projection.apply(v[None])[0] @ xq), owners[i])
                for i, v in zip(ids, vectors)
                if owners[i].startswith("Dairy/")
            ),
            reverse=True,
        )
        assert [h.product_id for h in hits] == [p for _, p in scored[:3]]


def test_several_images_per_product_take_one_slot(tmp_path: Path, index_dir: Path) -> None:
    rows = ["id,image,category,title"]
    for n in range(6):
        path = tmp_path / f"i{n}.png"
        make_image(n).save(path)
        rows.append(f"sku{n % 3},{path},Shirts,Shirt {n % 3}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with build(index_dir, tmp_path / "m.csv") as engine:
        assert engine.info()["products"] == 3 and engine.info()["vectors"] == 6
        grouped = engine.search(tmp_path / "i0.png", k=3)
        assert [h.product_id for h in grouped][0] == "sku0" and len({h.product_id for h in grouped}) == 3
        ungrouped = engine.search(tmp_path / "i0.png", k=6, group_by_product=False)
        assert len(ungrouped) == 6


def test_open_errors(tmp_path: Path, index_dir: Path, catalog_folder: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="vsearch ingest"):
        Engine.open(tmp_path / "missing")
    build(index_dir, catalog_folder).close()
    with pytest.raises(IndexFormatError, match="built with model 'tiny-test'"):
        Engine.open(index_dir, model="efficientnet-lite0")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["format_version"] = 999
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format 999"):
        Engine.open(index_dir)


def test_manifest_describes_the_index(index_dir: Path, catalog_folder: Path) -> None:
    build(index_dir, catalog_folder).close()
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    assert manifest["model"]["layers"] == ["stage3", "head"] and manifest["model"]["pooling"] == "gem"
    assert manifest["factory"] == "IDMap2,Flat"
    assert manifest["counts"] == {"products": 25, "images": 25, "categories": 5, "vectors": 25}
    assert manifest["dim"] == manifest["raw_dim"] > 0


def test_pca_reduces_the_index_when_enough_vectors_fit_it(index_dir: Path, catalog_folder: Path) -> None:
    from vsearch.config import ProjectionConfig

    with Engine.open(index_dir, model=MODEL, projection=ProjectionConfig(pca_dim=8), create=True) as engine:
        engine.ingest(catalog_folder, quiet=True, workers=0)
        assert engine.info()["dim"] == 8 and engine.manifest.raw_dim > 8
        assert engine.search(catalog_folder / "Bakery/p04.jpg", k=1)[0].product_id == "Bakery/p04"
    with Engine.open(index_dir.with_name("big"), model=MODEL, projection=ProjectionConfig(pca_dim=64), create=True) as engine:
        engine.ingest(catalog_folder, quiet=True, workers=0)
        assert engine.info()["dim"] == engine.manifest.raw_dim, "25 vectors cannot fit 64 components"


def test_center_on_photos_fits_the_projection_on_them(index_dir: Path, catalog_folder: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(5):
        make_image(100 + n).save(photos / f"{n}.png")
    with build(index_dir, catalog_folder, center_on=photos) as engine:
        assert engine.snapshot.projection.fitted_on == 5
        assert engine.search(catalog_folder / "Bakery/p04.jpg", k=1)[0].product_id == "Bakery/p04"


def test_region_search_scores_products_by_their_best_region(index_dir: Path, catalog_folder: Path) -> None:
    from PIL import Image

    from vsearch.presets import resolve_model

    photo = Image.new("RGB", (400, 400), (128, 128, 128))  # square: no padding, so the full box is the whole input
    photo.paste(Image.open(catalog_folder / "Bakery/p09.jpg").resize((180, 150)), (200, 220))
    with Engine.open(index_dir, model=resolve_model(MODEL, image_size=256), create=True) as engine:
        engine.ingest(catalog_folder, quiet=True, workers=0)
        embedder = engine.snapshot.embedder.get()
        full = embedder.embed_regions(photo, [(0.0, 0.0, 1.0, 1.0)])
        np.testing.assert_allclose(full, embedder.embed_images([photo]), atol=1e-5)  # same maps, same pooling
        corner = embedder.embed_regions(photo, [(0.5, 0.45, 0.5, 0.55)])
        assert not np.allclose(corner, full)
        regions = engine.search_regions(photo, SearchOptions(k=25))
        whole = {h.product_id: h.score for h in engine.search(photo, k=25)}
        assert len(regions) == 25 and len({h.product_id for h in regions}) == 25
        assert all(h.score >= whole[h.product_id] - 1e-6 for h in regions), "the whole photo is one of the regions"
        assert [h.score for h in regions] == sorted((h.score for h in regions), reverse=True)


def test_input_box_follows_the_resize_mode() -> None:
    from vsearch.embed import Preprocess
    from vsearch.presets import resolve_model

    pad = Preprocess(resolve_model(MODEL, resize="pad"))
    assert pad.input_box((200, 100), (0.0, 0.0, 1.0, 1.0)) == (0.0, 0.25, 1.0, 0.5)
    crop = Preprocess(resolve_model(MODEL, resize="crop"))
    assert crop.input_box((200, 100), (0.25, 0.0, 0.5, 1.0)) == (0.0, 0.0, 1.0, 1.0)


def test_eval_against_an_existing_index(index_dir: Path, catalog_folder: Path, tmp_path: Path) -> None:
    from vsearch.evaluate import evaluate_index

    build(index_dir, catalog_folder).close()
    rows = ["image,expected_id,category"] + [
        f"{catalog_folder / c / f'p{n:02d}.jpg'},{c}/p{n:02d},{c}" for n, c in [(0, "Fruit/Apple"), (7, "Dairy/Milk")]
    ]
    (tmp_path / "q.csv").write_text("\n".join(rows) + "\n")
    for regions in (False, True):
        metrics = evaluate_index(index_dir, tmp_path / "q.csv", regions=regions)
        assert metrics["recall@1"] == 1.0 and metrics["n_queries"] == 2


def test_a_pairs_file_adds_photos_to_existing_products(index_dir: Path, catalog_folder: Path, tmp_path: Path) -> None:
    photo = tmp_path / "shopper.png"
    make_image(4).rotate(5).save(photo)
    (tmp_path / "pairs.csv").write_text(f"image,product_id\n{photo},Bakery/p04\n")
    with build(index_dir, catalog_folder) as engine:
        engine.ingest(tmp_path / "pairs.csv", quiet=True, workers=0)
        product = engine.product("Bakery/p04")
        assert product.product.category == "Bakery" and product.product.title == "p04"  # kept
        assert len(product.images) == 2 and engine.info()["vectors"] == 26
        hits = engine.search(photo, k=5)
        assert hits[0].product_id == "Bakery/p04" and [h.product_id for h in hits].count("Bakery/p04") == 1


def test_suggested_categories_follow_the_nearest_matches() -> None:
    from vsearch.categories import suggest_categories

    # the best match's category wins over a category that merely has more neighbours
    votes = suggest_categories(["Veg/Carrots", "Fruit/Melon", "Veg/Potato", "Fruit/Melon", "Fruit/Melon", "Dairy"])
    assert votes[0][0] == "Veg/Carrots"
    assert abs(sum(share for _, share in votes) - 1) < 1e-3


def test_filtered_searches_see_each_write_even_without_a_block_cache(index_dir: Path, catalog_folder: Path) -> None:
    build(index_dir, catalog_folder).close()
    photo = (catalog_folder / "Dairy/Milk/p02.jpg").read_bytes()
    for cache_bytes in (0, 1 << 20):
        with Engine.open(index_dir, block_cache_bytes=cache_bytes) as engine:
            assert "new" not in {h.product_id for h in engine.search(photo, k=10, categories=["Bakery"])}
            engine.put_product("new", title="New", category="Bakery", images=[photo])
            hits = engine.search(photo, k=10, categories=["Bakery"])
            assert hits[0].product_id == "new" and all(h.category == "Bakery" for h in hits)
            assert engine.snapshot.filters.cache.nbytes <= cache_bytes
            engine.delete_product("new")
            assert "new" not in {h.product_id for h in engine.search(photo, k=10, categories=["Bakery"])}


def test_a_search_on_a_retired_snapshot_still_answers(index_dir: Path, catalog_folder: Path) -> None:
    """A search reads the snapshot once; a refit (swap) and a write may land before it
    searches, so its category blocks can name images its index never had."""
    with build(index_dir, catalog_folder) as engine:
        photo = (catalog_folder / "Bakery/p04.jpg").read_bytes()
        retired = engine.snapshot
        raw = engine.embed_queries([engine.load_query(photo)], retired)
        engine.fit_projection()  # a new snapshot serves from now on
        assert engine.snapshot is not retired
        engine.put_product("new", category="Bakery", images=[photo])
        hits = engine.search_vectors(raw, SearchOptions(k=10, categories=["Bakery"]), snapshot=retired)[0]
        assert hits[0].product_id == "Bakery/p04" and "new" not in {h.product_id for h in hits}
        current = engine.search_vectors(raw, SearchOptions(k=2, categories=["Bakery"]))[0]
        assert {h.product_id for h in current} == {"new", "Bakery/p04"}  # the same photo twice
        engine.close()
        assert engine.search_vectors(raw, SearchOptions(k=3), snapshot=retired) == [[]]  # closed: empty, no error


def test_a_write_after_another_processes_commit_keeps_every_vector(index_dir: Path, catalog_folder: Path, tmp_path: Path) -> None:
    """A server (one engine) takes a product write after an ingest elsewhere (another
    engine on the same directory, as a second process would be) committed images it
    has not seen: its saved index must not claim the newer generation without them."""
    build(index_dir, catalog_folder).close()
    more = tmp_path / "more"
    for n in range(4):
        (more / "Bakery").mkdir(parents=True, exist_ok=True)
        make_image(300 + n).save(more / "Bakery" / f"m{n}.jpg")
    with Engine.open(index_dir) as server, Engine.open(index_dir) as cli:
        cli.ingest(more, quiet=True, workers=0)
        server.put_product("api", category="Dairy", images=[(catalog_folder / "Bakery/p04.jpg").read_bytes()])
        assert server.info()["vectors"] == server.info()["images"] == 30
    with Engine.open(index_dir) as engine:
        assert engine.info()["vectors"] == engine.info()["images"] == 30
        images = [row.id for pid in engine.catalog.product_ids() for row in engine.catalog.images_of(pid)]
        assert vector_ids(engine) == sorted(images)


def test_an_index_whose_active_version_is_missing_still_opens(index_dir: Path, catalog_folder: Path) -> None:
    build(index_dir, catalog_folder).close()
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["active_model"] = "gone"
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with Engine.open(index_dir) as engine:  # the model is loaded only when needed
        assert engine.info()["active_model"] == "gone"
        engine.use_model("base", quiet=True)  # the way back
        assert engine.search(catalog_folder / "Bakery/p04.jpg", k=1)[0].product_id == "Bakery/p04"
