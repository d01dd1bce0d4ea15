"""The demo: build an index from a local product-image folder.

The Grocery Store Dataset (MIT; github.com/marcusklasson/GroceryStoreDataset) is
recognised and turned into a catalog of its 81 products (iconic images, with their
category paths, and attributes: the dataset's coarse and fine class and its product
description text, ``description``, which keyword search reads too, plus a price
and an in-stock flag that are made up by a seeded generator and named
``synthetic_price`` / ``synthetic_in_stock`` so that no one mistakes them for
data), centred on a sample of its unlabelled in-store photos. Any other folder is
ingested as a folder catalog.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from .engine import Engine
from .errors import ConfigError

__all__ = ["build_demo", "find_demo_data"]

CANDIDATES = ("../shared/datasets/grocery-store", "shared/datasets/grocery-store")
CENTER_SAMPLE = 600  # > 2 x 256, so PCA to 256 can be fitted
SYNTHETIC_SEED = 0  # the demo's made-up synthetic_price / synthetic_in_stock attributes


def find_demo_data(data: str | None) -> Path:
    if data:
        path = Path(data)
        if not path.is_dir():
            raise ConfigError(f"demo data folder {path} does not exist")
        return path
    for candidate in CANDIDATES:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise ConfigError(
        "no demo data: pass --data FOLDER (e.g. --data ../shared/datasets/grocery-store, a clone of "
        "github.com/marcusklasson/GroceryStoreDataset) or set VSEARCH_DEMO_DATA"
    )


def build_demo(data: str | None, index_dir: Path, *, quiet: bool = False) -> Engine:
    """Build (or bring up to date) the demo index and return it open."""
    root = find_demo_data(data).resolve()  # the manifests written below hold absolute paths
    grocery = root / "dataset" / "classes.csv"
    index_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine.open(index_dir, create=True)
    try:
        if grocery.exists():
            catalog, photos = _grocery_manifests(root / "dataset", index_dir)
            report = engine.ingest(catalog, quiet=quiet, center_on=photos if not engine.manifest.projection_fitted else None)
        else:
            report = engine.ingest(root, quiet=quiet)
    except BaseException:
        engine.close()
        raise
    info = engine.info()
    print(
        f"demo index {index_dir}: {info['products']} products, {info['vectors']} vectors "
        f"({report.embedded} embedded now, {len(report.rejected)} rejected)"
    )
    if info["vectors"] == 0:
        raise ConfigError(f"no image in {root} could be used; see {index_dir / 'rejects.jsonl'}")
    return engine


def _grocery_manifests(dataset: Path, out: Path) -> tuple[Path, Path]:
    """The catalog and centring manifests the demo ingests, plus ``demo-train-pairs.csv``
    (the labelled train photos, with the demo's product ids) for ``vsearch finetune``."""
    catalog = out / "demo-catalog.csv"
    photos = out / "demo-center-photos.csv"
    names: dict[str, str] = {}  # the dataset's numeric class id -> the demo's product id
    with open(dataset / "classes.csv", newline="") as fh, open(catalog, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(
            [
                "id",
                "image",
                "category",
                "title",
                "coarse_class",
                "fine_class",
                "description",
                "synthetic_price:number",
                "synthetic_in_stock:bool",
            ]
        )
        shop = random.Random(SYNTHETIC_SEED)  # noqa: S311 - made-up prices for the filter examples, not a secret
        for row in csv.reader(fh):
            if row[0].startswith("Class Name"):
                continue
            name, class_id, coarse, _, iconic = row[:5]
            description = row[5] if len(row) > 5 else ""
            names[class_id] = name
            category = f"{Path(iconic).parts[2]}/{coarse}"  # e.g. Fruit/Apple, Packages/Milk
            price, in_stock = round(shop.uniform(0.5, 6.0), 2), shop.random() < 0.8
            title = name.replace("-", " ")
            text = _description(dataset, description)
            writer.writerow([name, str(dataset) + iconic, category, title, coarse, name, text, price, str(in_stock).lower()])
    lines = [line for line in (dataset / "train.txt").read_text().splitlines() if line.strip()]
    with open(out / "demo-train-pairs.csv", "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "product_id"])
        for line in lines:
            path, class_id, _ = (part.strip() for part in line.split(","))
            writer.writerow([str(dataset / path), names[class_id]])
    step = max(1, len(lines) // CENTER_SAMPLE)
    with open(photos, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "image"])
        for n, line in enumerate(lines[::step]):
            writer.writerow([f"photo{n}", str(dataset / line.split(",")[0].strip())])
    return catalog, photos


def _description(dataset: Path, relative: str) -> str:
    """A product's description text (``Product Description Path``), on one line; ""
    if the file is missing (some products have an empty one)."""
    path = dataset / relative.strip().lstrip("/")
    try:
        return " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return ""
