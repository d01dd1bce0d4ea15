"""Class-level fine-tuning: ``image,category`` pairs, no product ids (issue 11, part 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CATEGORIES, make_image, write_catalog, write_labelled_photos
from vsearch import Engine
from vsearch.cli import main
from vsearch.errors import TrainingDataError
from vsearch.finetune import FinetuneConfig, finetune
from vsearch.images import sha256_bytes
from vsearch.sources import read_pairs
from vsearch.training_data import prepare

SMALL = FinetuneConfig(epochs=3, views=2, batch_size=16, val_fraction=0.2, patience=5)


def write_category_photos(root: Path, per_product: int = 3) -> Path:
    """Photos labelled only with their product's top-level category (Fruit, Dairy, Bakery)."""
    return write_labelled_photos(root, "category", lambda n: CATEGORIES[n % len(CATEGORIES)].split("/")[0], per_product)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Engine, Path]:
    engine = Engine.open(tmp_path / "index", model="tiny-test", create=True)
    engine.ingest(write_catalog(tmp_path / "catalog"), quiet=True)
    yield engine, write_category_photos(tmp_path / "photos")
    engine.close()


def test_category_pairs_train_a_version_validated_by_category_precision(tiny: tuple[Engine, Path]) -> None:
    engine, pairs = tiny
    report = finetune(engine, pairs, config=SMALL, quiet=True, log=lambda _: None)
    assert report.level == "category" and report.data["categories"] == 3
    assert report.data["train_photos"] + report.data["val_photos"] == 75 and report.data["val_photos"] == 15
    assert report.val_recall_at_1 is None
    curve = [row["val_precision_at_10"] for row in report.epochs]
    assert len(curve) == 4 and all(0.0 <= p <= 1.0 for p in curve)
    assert report.val_precision_at_10 == max(curve[1:]) == report.epochs[report.best_epoch]["val_precision_at_10"]
    losses = [row["loss"] for row in report.epochs[1:]]
    assert losses[-1] < losses[0]
    engine.use_model(report.name, quiet=True)  # a class-level version serves like any other
    assert engine.search(make_image(3), k=3)


def test_the_validation_gallery_matches_sub_categories_and_leaves_out_the_validation_photos(
    tiny: tuple[Engine, Path], tmp_path: Path
) -> None:
    engine, pairs = tiny
    # the catalog's own image of product 0 (Fruit/Apple) labelled as a photo: validation must not find it in the gallery
    catalog_image = tmp_path / "catalog" / "Fruit" / "Apple" / "p00.jpg"
    with open(pairs, "a") as fh:
        fh.write(f"{catalog_image},Fruit\n")
    data = prepare(engine, read_pairs(pairs), FinetuneConfig(val_fraction=0.5))
    assert data.level == "category" and data.products == ["Bakery", "Dairy", "Fruit"]
    by_label = {label: sum(1 for _, g in data.gallery if g == label) for label in data.products}
    held_out = {sha256_bytes(Path(source).read_bytes()) for source, _ in data.val}
    assert sha256_bytes(catalog_image.read_bytes()) in held_out  # val_fraction 0.5 holds it out (seeded)
    assert by_label == {"Bakery": 5, "Dairy": 10, "Fruit": 9}  # Fruit/Apple + Fruit/Banana, less the held-out one
    assert not held_out & {sha256_bytes(image) for image, _ in data.gallery}


def test_one_category_cannot_train(tiny: tuple[Engine, Path], tmp_path: Path) -> None:
    engine, _ = tiny
    one = tmp_path / "one.csv"
    one.write_text(f"image,category\n{tmp_path / 'photos' / '0_0.jpg'},Fruit\n{tmp_path / 'photos' / '0_1.jpg'},Fruit\n")
    with pytest.raises(TrainingDataError, match="at least 2 categories"):
        finetune(engine, one, quiet=True, log=lambda _: None)


def test_cli_finetune_reports_category_precision(tiny: tuple[Engine, Path], capsys: pytest.CaptureFixture[str]) -> None:
    engine, pairs = tiny
    index = str(engine.paths.root)
    engine.close()
    args = ["finetune", "--index", index, "--pairs", str(pairs), "--epochs", "1", "--views", "1", "--quiet"]
    assert main([*args, "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "val category precision@10" in out and "train photos" in out
    assert main([*args, "--batch-size", "16", "--name", "as-json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["level"] == "category"
