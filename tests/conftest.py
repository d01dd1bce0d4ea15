from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CATEGORIES = ["Fruit/Apple", "Fruit/Banana", "Dairy/Milk", "Dairy/Yoghurt", "Bakery"]


def make_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic picture: a coloured background with a few shapes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        box = (x0, y0, x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_catalog(root: Path) -> Path:
    """25 products in 5 categories, one JPEG each, in a folder catalog at ``root``."""
    for n in range(25):
        folder = root / CATEGORIES[n % len(CATEGORIES)]
        folder.mkdir(parents=True, exist_ok=True)
        make_image(n).save(folder / f"p{n:02d}.jpg", quality=95)
    return root


def write_labelled_photos(root: Path, column: str, label: Callable[[int], str], per_product: int) -> Path:
    """Shopper-photo stand-ins for the 25 products of :func:`write_catalog`: crops of
    each product's picture in other light, in ``root/pairs.csv`` as ``image,COLUMN``
    with ``label(n)`` for product ``n``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"image,{column}"]
    for n in range(25):
        picture = make_image(n)
        w, h = picture.size
        for j in range(per_product):
            photo = ImageEnhance.Brightness(picture.crop((3 * j, 2 * j, w - 5, h - 4))).enhance(0.7 + 0.15 * j)
            path = root / f"{n}_{j}.jpg"
            photo.save(path)
            lines.append(f"{path},{label(n)}")
    pairs = root / "pairs.csv"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs


@pytest.fixture
def catalog_folder(tmp_path: Path) -> Path:
    return write_catalog(tmp_path / "catalog")


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VSEARCH_"):
            monkeypatch.delenv(name)


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"needs ../shared/datasets/{name} (not present in this checkout)")
    return path


def committed_images(db_path: Path) -> int:
    """Images a catalog holds now (0 if it is missing or locked): for kill -9 tests
    that watch another process's progress."""
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=0.1) as db:
            return int(db.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0
