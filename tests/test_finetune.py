"""Fine-tuning, model versions, reindex, switch and rollback on the tiny model."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CATEGORIES, make_image, write_catalog, write_labelled_photos
from vsearch import Engine
from vsearch.adapter import AdaptedNet, AdapterConfig
from vsearch.catalog import BASE_MODEL
from vsearch.errors import ConfigError, TrainingDataError, VersionError
from vsearch.finetune import FinetuneConfig, FinetuneReport, finetune
from vsearch.training import Trainer

SMALL = FinetuneConfig(epochs=3, views=2, catalog_repeat=2, batch_size=16, val_fraction=0.2, patience=5)


def product_id(n: int) -> str:
    return f"{CATEGORIES[n % len(CATEGORIES)]}/p{n:02d}"


def write_photos(root: Path, per_product: int = 4) -> Path:
    return write_labelled_photos(root, "product_id", product_id, per_product)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Engine, Path]:
    engine = Engine.open(tmp_path / "index", model="tiny-test", create=True)
    engine.ingest(write_catalog(tmp_path / "catalog"), quiet=True)
    yield engine, write_photos(tmp_path / "photos")
    engine.close()


def test_zero_shot_part_equals_the_base_models_vectors(tiny: tuple[Engine, Path]) -> None:
    engine, _ = tiny
    net = AdaptedNet(AdapterConfig(base=engine.manifest.model), engine.snapshot.projection)
    batch = torch.stack([engine.preprocess(make_image(n)) for n in range(4)])
    with torch.no_grad():
        _, zero_shot = net.encode_trunk(batch)
    expected = engine.snapshot.projection.apply(engine.snapshot.embedder.get().embed_tensor(batch))
    np.testing.assert_allclose(zero_shot.numpy(), expected, atol=1e-5)


def test_training_lowers_the_loss_and_saves_a_version(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    report = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None)
    assert report.epochs[0]["epoch"] == 0 and "loss" not in report.epochs[0]  # the untrained starting point
    losses = [row["loss"] for row in report.epochs[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert report.data["train_photos"] == 80 and report.data["val_photos"] == 20
    assert all("val_recall_at_1" in row for row in report.epochs)
    for row in report.epochs:  # the reciprocal rank is 1 for a hit at 1, at most 1/2 otherwise
        assert row["val_recall_at_1"] <= row["val_mrr"] <= (1 + row["val_recall_at_1"]) / 2 + 1e-4
    best = max(report.epochs[1:], key=lambda r: (r["val_recall_at_1"], r["val_mrr"]))
    assert report.val_recall_at_1 is not None and round(report.val_recall_at_1, 4) == best["val_recall_at_1"]
    assert report.epochs[report.best_epoch] == best
    folder = engine.paths.root / "models" / report.name
    files = {"adapter.json", "weights.pt", "base_projection.npz", "report.json", "trained_products.json"}
    assert {p.name for p in folder.iterdir()} == files
    assert not list((engine.paths.root / "models").glob(".partial-*"))  # work files cleaned up
    assert [v.name for v in engine.models()] == [BASE_MODEL, report.name]
    assert engine.active == BASE_MODEL  # training alone changes nothing that serves


def curve(report: FinetuneReport) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in report.epochs]


def interrupt_in_epoch_2(engine: Engine, pairs: Path, config: FinetuneConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``finetune`` until a KeyboardInterrupt in its second epoch (after one checkpoint)."""
    real_epoch = Trainer.run_epoch

    def stop_in_epoch_2(self: Trainer, quiet: bool) -> dict[str, float]:
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, quiet)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run_epoch", stop_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            finetune(engine, pairs, config=config, quiet=True, log=lambda _: None)


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_does(
    tiny: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, pairs = tiny
    whole = finetune(engine, pairs, name="whole", config=SMALL, quiet=True, log=lambda _: None)

    interrupt_in_epoch_2(engine, pairs, SMALL, monkeypatch)
    partial = list((engine.paths.root / "models").glob(".partial-*"))
    assert len(partial) == 1 and (partial[0] / "checkpoint.pt").exists()
    resumed = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None)
    assert resumed.resumed_from_epoch == 1
    assert curve(resumed) == curve(whole)
    a = torch.load(engine.paths.root / "models" / "whole" / "weights.pt")
    b = torch.load(engine.paths.root / "models" / resumed.name / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same weights


def test_bad_pairs_are_counted_and_skipped(tiny: tuple[Engine, Path], tmp_path: Path) -> None:
    engine, pairs = tiny
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with open(pairs, "a") as fh:
        fh.write(f"{tmp_path / 'photos' / '0_0.jpg'},no-such-product\n")
        fh.write(f"{tmp_path / 'junk.jpg'},{product_id(1)}\n")
        fh.write(f"{tmp_path / 'missing.jpg'},{product_id(1)}\n")
    warnings: list[str] = []
    report = finetune(engine, pairs, config=FinetuneConfig(epochs=1, views=1, batch_size=16), quiet=True, log=warnings.append)
    assert report.data["unknown_product_pairs"] == 1
    assert report.data["unreadable_photos"] == 2
    assert any("not in the catalog" in w for w in warnings) and any("could not be read" in w for w in warnings)


def test_pairs_that_cannot_train_raise_a_clear_error(tiny: tuple[Engine, Path], tmp_path: Path) -> None:
    engine, _ = tiny
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"image,product_id\n{tmp_path / 'photos' / '0_0.jpg'},nope\n")
    with pytest.raises(TrainingDataError, match="no usable pairs.*product ids look like: Bakery/p04"):
        finetune(engine, unknown, quiet=True, log=lambda _: None)
    one = tmp_path / "one.csv"
    one.write_text(f"image,product_id\n{tmp_path / 'photos' / '0_0.jpg'},{product_id(0)}\n")
    with pytest.raises(TrainingDataError, match="at least 2 products"):
        finetune(engine, one, quiet=True, log=lambda _: None)


def _top(engine: Engine, image: object) -> list[tuple[str, float]]:
    return [(h.product_id, round(h.score, 5)) for h in engine.search(image, k=5)]  # type: ignore[arg-type]


def test_switch_rollback_and_remove(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    query = make_image(3)
    before = _top(engine, query)
    report = engine.use_model(name, quiet=True)
    assert report.switched and report.embedded == 25 and engine.active == name
    after = _top(engine, query)
    assert after != before and after[0][0] == product_id(3)
    assert engine.index is not None and engine.index.d == engine.manifest.dim != 256
    # new products ingested now are embedded by the active version
    engine.put_product("new", images=[str(pairs.parent / "7_1.jpg")])
    assert engine.search(make_image(7), k=1)[0].product_id in {"new", product_id(7)}
    # rollback: base vectors are kept; only the new product's image needs embedding
    back = engine.use_model(BASE_MODEL, quiet=True)
    assert back.embedded == 1 and engine.active == BASE_MODEL
    rolled_back = [hit for hit in _top(engine, query) if hit[0] != "new"]
    assert rolled_back == before[: len(rolled_back)]  # the same vectors and scores as before the switch
    with pytest.raises(VersionError, match="cannot be removed"):
        engine.remove_model(BASE_MODEL)
    engine.use_model(name, quiet=True)
    with pytest.raises(VersionError, match="is active"):
        engine.remove_model(name)
    engine.use_model(BASE_MODEL, quiet=True)
    engine.remove_model(name)
    assert [v.name for v in engine.models()] == [BASE_MODEL]
    with pytest.raises(VersionError, match="no model version"):
        engine.use_model(name)


def test_the_switch_persists_and_survives_reopening(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    engine.use_model(name, quiet=True)
    expected = _top(engine, make_image(5))
    with Engine.open(engine.paths.root) as reopened:
        assert reopened.active == name
        assert _top(reopened, make_image(5)) == expected


def test_searches_during_a_switch_see_one_version_completely(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    queries = [make_image(n) for n in range(3)]
    old = [_top(engine, q) for q in queries]
    engine.use_model(name, quiet=True)
    new = [_top(engine, q) for q in queries]
    engine.use_model(BASE_MODEL, quiet=True)
    seen: list[tuple[int, list[tuple[str, float]]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                for i, q in enumerate(queries):
                    seen.append((i, _top(engine, q)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for target in (name, BASE_MODEL, name, BASE_MODEL):
        done = len(seen)
        engine.use_model(target, quiet=True)
        while len(seen) < done + 6 and not errors:  # let searches run on each version
            time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen and all(result in (old[i], new[i]) for i, result in seen)
    assert {result == new[i] for i, result in seen} == {True, False}  # both versions served meanwhile


def test_another_process_switch_is_picked_up_by_refresh(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    before = _top(engine, make_image(2))
    with Engine.open(engine.paths.root) as other:  # stands in for `vsearch reindex` in another process
        other.use_model(name, quiet=True)
        expected = _top(other, make_image(2))
    served = engine.snapshot
    assert engine.refresh() is True
    assert engine.active == name and engine.snapshot is not served and served.model == BASE_MODEL
    assert _top(engine, make_image(2)) == expected != before
    assert engine.refresh() is False  # nothing new


def test_center_on_is_refused_while_a_fine_tuned_version_serves(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    engine.use_model(name, quiet=True)
    with pytest.raises(ConfigError, match="center-on"):
        engine.fit_projection(pairs)


def test_cli_reindex_switches_a_running_server_without_failed_searches(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys
    import urllib.request

    from tests.api_helpers import jpeg
    from tests.test_browser import free_port

    with Engine.open(tmp_path / "index", model="tiny-test", create=True) as engine:
        engine.ingest(write_catalog(tmp_path / "catalog"), quiet=True)
        name = finetune(engine, write_photos(tmp_path / "photos"), config=SMALL, quiet=True, log=lambda _: None).name
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"reload_interval_s": 0.2}))
    serve = [sys.executable, "-m", "vsearch", "serve", "--index", str(tmp_path / "index"), "--port", str(port)]
    proc = subprocess.Popen([*serve, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def get(path: str) -> dict[str, object]:
        with urllib.request.urlopen(base + path, timeout=10) as r:  # noqa: S310 - loopback
            return json.loads(r.read())  # type: ignore[no-any-return]

    def search() -> list[object]:
        body, boundary = jpeg(3), "vsearchboundary"
        data = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            base + "/v1/search?k=3", data=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
            assert r.status == 200
            return [hit["product_id"] for hit in json.loads(r.read())["results"]]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get("/readyz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        info = get("/v1/info")
        assert info["active_model"] == BASE_MODEL
        before = search()
        reindex = [sys.executable, "-m", "vsearch", "reindex", "--index", str(tmp_path / "index"), "--model", name]
        switch = subprocess.Popen([*reindex, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = []
        while switch.poll() is None or get("/v1/info")["active_model"] != name:
            results.append(search())  # answered by one version or the other, never an error
            assert time.monotonic() < deadline + 120, "the server never picked up the switch"
        assert switch.returncode == 0, switch.communicate()[1]
        after = search()
        assert get("/v1/info")["dim"] != info["dim"] and after[0] == product_id(3)
        assert results and all(r in (before, after) for r in results)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_catalog_keeps_vectors_per_model_and_drops_stale_ones(tmp_path: Path) -> None:
    from vsearch.catalog import Catalog

    catalog = Catalog.open(tmp_path / "c.db")
    one, two = np.ones(4, dtype=np.float32), np.full(3, 2.0, dtype=np.float32)
    with catalog.transaction():
        catalog.upsert_product("p")
        image_id = catalog.put_image("p", "a.jpg", "sha-1", 10, 10, one)
    assert [r.id for r in catalog.images_without_vectors("ft")] == [image_id]
    with catalog.transaction(bump=False):
        generation = catalog.generation
        assert catalog.put_vectors("ft", [(image_id, "sha-1", two), (image_id + 1, "sha-x", two)]) == 1
    assert catalog.generation == generation  # vectors of a model that does not serve leave the index fresh
    assert catalog.images_without_vectors("ft") == []
    np.testing.assert_array_equal(catalog.vectors_of("p", model="ft"), [two])
    np.testing.assert_array_equal(catalog.vectors_of("p"), [one])
    with catalog.transaction():  # new content, written by "ft": base's vector is stale now
        catalog.put_image("p", "a.jpg", "sha-2", 10, 10, two, model="ft")
    assert [r.id for r in catalog.images_without_vectors(BASE_MODEL)] == [image_id]
    assert catalog.sample_vectors(10).size == 0
    with catalog.transaction():
        catalog.put_image("p", "a.jpg", "sha-3", 10, 10, one)  # and the reverse
    assert [r.id for r in catalog.images_without_vectors("ft")] == [image_id]
    with catalog.transaction():
        catalog.put_image("p", "a.jpg", "sha-3", 10, 10, two, model="ft")
        catalog.remove_products(["p"])
    assert catalog.db.execute("SELECT count(*) FROM model_vectors").fetchone()[0] == 0
    catalog.close()


def test_an_interrupted_reindex_resumes_with_what_is_missing(tiny: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from vsearch.writer import IndexWriter

    engine, pairs = tiny
    name = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None).name
    real = IndexWriter.store_vectors
    calls = 0

    def fail_on_third_batch(self: IndexWriter, model: str, rows: list[tuple[int, str, np.ndarray]]) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(self, model, rows)

    monkeypatch.setattr(IndexWriter, "store_vectors", fail_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        engine.reindex(name, quiet=True, batch_size=8)
    monkeypatch.undo()
    assert len(engine.catalog.images_without_vectors(name)) == 25 - 16
    assert engine.active == BASE_MODEL  # nothing switched
    report = engine.reindex(name, quiet=True)
    assert report.embedded == 9 and report.vectors == 25 and engine.active == name


def test_bad_settings_fail_before_any_image_is_read(tiny: tuple[Engine, Path]) -> None:
    engine, _ = tiny  # the pairs are empty: reading them would fail with another error
    with pytest.raises(ConfigError, match="train_from"):
        finetune(engine, [], config=FinetuneConfig(train_from="stage9"), quiet=True, log=lambda _: None)
    with pytest.raises(VersionError, match="bad version name"):
        finetune(engine, [], name="../escape", quiet=True, log=lambda _: None)
    with pytest.raises(TrainingDataError, match="epochs"):
        FinetuneConfig(epochs=0)


def test_epochs_that_tie_on_recall_at_1_are_told_apart_by_the_mean_reciprocal_rank(
    tiny: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, pairs = tiny
    scores = {0: (0.4, 0.5), 1: (0.6, 0.7), 2: (0.6, 0.75), 3: (0.6, 0.72), 4: (0.5, 0.74)}

    def scripted(self: Trainer) -> dict[str, float]:
        r1, mrr = scores[self.epoch]
        return {"val_recall_at_1": r1, "val_recall_at_10": 1.0, "val_mrr": mrr}

    monkeypatch.setattr(Trainer, "validate", scripted)
    report = finetune(engine, pairs, config=replace(SMALL, epochs=4), quiet=True, log=lambda _: None)
    assert report.best_epoch == 2  # not 1, the first to reach 0.6
    assert report.val_recall_at_1 == 0.6 and [row["val_mrr"] for row in report.epochs] == [0.5, 0.7, 0.75, 0.72, 0.74]


def test_training_without_a_validation_split_keeps_the_last_epoch(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    config = FinetuneConfig(epochs=2, views=1, catalog_repeat=1, batch_size=16, val_fraction=0.0)
    report = finetune(engine, pairs, config=config, quiet=True, log=lambda _: None)
    assert report.data["val_photos"] == 0 and report.val_recall_at_1 is None
    assert [row["epoch"] for row in report.epochs] == [1, 2] and report.best_epoch == 2


def test_the_demo_writes_training_pairs_with_its_own_product_ids(tmp_path: Path) -> None:
    import csv

    from vsearch.demo import _grocery_manifests

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic Image Path (str),x\n"
        "Golden-Delicious,0,Apple,0,/iconic/Fruit/Apple/Golden-Delicious/g.jpg,d\n"
        "Banana,1,Banana,1,/iconic/Fruit/Banana/b.jpg,d\n"
    )
    (dataset / "train.txt").write_text("train/Fruit/Banana/b_1.jpg, 1, 1\ntrain/Fruit/Apple/g_1.jpg, 0, 0\n")
    catalog, _ = _grocery_manifests(dataset, tmp_path)
    with open(catalog, newline="") as fh:
        ids = {row["id"] for row in csv.DictReader(fh)}
    with open(tmp_path / "demo-train-pairs.csv", newline="") as fh:
        pairs = [(row["image"], row["product_id"]) for row in csv.DictReader(fh)]
    expected = [("train/Fruit/Banana/b_1.jpg", "Banana"), ("train/Fruit/Apple/g_1.jpg", "Golden-Delicious")]
    assert pairs == [(str(dataset / path), pid) for path, pid in expected]
    assert {pid for _, pid in pairs} <= ids


def test_feature_crop_trains_on_random_crops_of_the_cached_maps(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    config = FinetuneConfig(epochs=2, views=1, catalog_repeat=2, batch_size=16, val_fraction=0.2, feature_crop=0.5)
    report = finetune(engine, pairs, config=config, quiet=True, log=lambda _: None)
    assert report.epochs[-1]["loss"] < report.epochs[1]["loss"] and report.val_recall_at_1 is not None
    trainer = Trainer.__new__(Trainer)  # only _crop's inputs: the config and the generator
    trainer.config, trainer.generator = config, torch.Generator().manual_seed(0)
    maps = torch.arange(2 * 3 * 10 * 8, dtype=torch.float32).view(2, 3, 10, 8)
    shapes = set()
    for _ in range(20):
        crop = trainer._crop(maps)
        h, w = crop.shape[-2:]
        assert 5 <= h <= 10 and 4 <= w <= 8
        top, left = int(crop[0, 0, 0, 0].item()) // 8, int(crop[0, 0, 0, 0].item()) % 8
        assert torch.equal(crop, maps[..., top : top + h, left : left + w])  # a window of the maps, not a resample
        shapes.add((h, w))
    assert len(shapes) > 3
    trainer.config = FinetuneConfig()
    assert trainer._crop(maps) is maps
    with pytest.raises(TrainingDataError, match="feature_crop"):
        FinetuneConfig(feature_crop=0)


def test_a_margin_asks_the_true_proxy_to_win_by_more(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    config = FinetuneConfig(epochs=1, views=1, catalog_repeat=1, batch_size=16, val_fraction=0.0, margin=0.0)
    plain = finetune(engine, pairs, name="plain", config=config, quiet=True, log=lambda _: None)
    margin = finetune(engine, pairs, name="margin", config=replace(config, margin=0.3), quiet=True, log=lambda _: None)
    assert margin.epochs[0]["loss"] > plain.epochs[0]["loss"] + 1.0  # 0.3 / temperature 0.05 = 6 nats at the start
    with pytest.raises(TrainingDataError, match="margin"):
        FinetuneConfig(margin=1.0)


def test_a_cosine_schedule_decays_both_learning_rates_to_zero_and_resumes_exactly(
    tiny: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, pairs = tiny
    config = replace(SMALL, lr_schedule="cosine")
    seen: list[tuple[float, float]] = []
    real_step = torch.optim.AdamW.step

    def record(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append((self.param_groups[0]["lr"], self.param_groups[1]["lr"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    whole = finetune(engine, pairs, name="whole", config=config, quiet=True, log=lambda _: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert seen[0] == (config.lr_backbone, config.lr_head)  # the configured rates at the first step
    assert all(b[0] < a[0] and b[1] < a[1] for a, b in zip(seen, seen[1:]))  # falling at every step
    assert seen[-1][0] < 0.05 * config.lr_backbone and seen[-1][1] < 0.05 * config.lr_head
    halfway = seen[len(seen) // 2][0] / config.lr_backbone
    assert 0.4 < halfway < 0.6  # a half cosine, not a straight line to zero or a step

    interrupt_in_epoch_2(engine, pairs, config, monkeypatch)
    resumed = finetune(engine, pairs, config=config, quiet=True, log=lambda _: None)
    assert resumed.resumed_from_epoch == 1 and curve(resumed) == curve(whole)
    with pytest.raises(TrainingDataError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="step")


def test_hue_jitter_bounds_how_far_the_augmented_views_turn_a_colour(tiny: tuple[Engine, Path]) -> None:
    from types import SimpleNamespace

    from PIL import Image

    from vsearch.training_cache import _augmented

    engine, _ = tiny
    base = engine.manifest.model
    net = SimpleNamespace(config=SimpleNamespace(base=base))
    mean, std = torch.tensor(base.mean).view(3, 1, 1), torch.tensor(base.std).view(3, 1, 1)
    red = Image.new("RGB", (64, 64), (200, 30, 30))

    def colours(hue: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        augment = _augmented(net, hue)  # type: ignore[arg-type]
        return [(augment(red) * std + mean).mean(dim=(1, 2)) for _ in range(30)]

    assert all(c[0] > 2 * max(c[1], c[2]) for c in colours(0.0))  # still red: only brightness, contrast, saturation
    assert any(max(c[1], c[2]) > c[0] for c in colours(0.5))  # a half turn of the colour circle leaves red
    assert FinetuneConfig().hue_for("product") == 0.0 and FinetuneConfig().hue_for("category") == 0.05
    assert FinetuneConfig(hue_jitter=0.1).hue_for("product") == 0.1
    with pytest.raises(TrainingDataError, match="hue_jitter"):
        FinetuneConfig(hue_jitter=0.6)
