from __future__ import annotations

from pathlib import Path

import pytest

from vsearch.errors import ManifestError
from vsearch.sources import read_source_items


def test_folder_categories_and_ids(catalog_folder: Path) -> None:
    items = read_source_items(catalog_folder)
    assert len(items) == 25
    first = items[0]
    assert first.category == "Bakery" and first.product_id.startswith("Bakery/p")
    assert Path(first.image).is_absolute()


def test_csv_extra_columns_become_attributes(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image,category,title,brand\nsku1,img/a.jpg,Dairy/Milk,Milk,Arla\n")
    (item,) = read_source_items(tmp_path / "m.csv")
    assert item.attributes == {"brand": "Arla"}
    assert item.image == str((tmp_path / "img/a.jpg").resolve())
    assert item.category == "Dairy/Milk"


def test_csv_missing_column_names_the_header(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("sku,image\n1,a.jpg\n")
    with pytest.raises(ManifestError, match=r"m.csv:1: missing column\(s\) id"):
        read_source_items(tmp_path / "m.csv")


def test_csv_malformed_row_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image,category\n1,a.jpg,X\n2,b.jpg\n")
    with pytest.raises(ManifestError, match="m.csv:3: expected 3 fields, found 2"):
        read_source_items(tmp_path / "m.csv")


def test_csv_empty_id_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image\n,a.jpg\n")
    with pytest.raises(ManifestError, match="m.csv:2: empty id"):
        read_source_items(tmp_path / "m.csv")


def test_jsonl_bad_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"id": "1", "image": "https://example.com/a.jpg"}\n{"id": 2,\n')
    with pytest.raises(ManifestError, match="m.jsonl:2: invalid JSON"):
        read_source_items(tmp_path / "m.jsonl")
    (tmp_path / "n.jsonl").write_text('{"id": "1"}\n')
    with pytest.raises(ManifestError, match=r"n.jsonl:1: missing field\(s\) image"):
        read_source_items(tmp_path / "n.jsonl")


def test_jsonl_urls_are_kept(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"id": "1", "image": "https://example.com/a.jpg", "price": 3}\n')
    (item,) = read_source_items(tmp_path / "m.jsonl")
    assert item.image == "https://example.com/a.jpg" and item.attributes == {"price": 3}


def test_unknown_manifest_type(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="unsupported manifest"):
        read_source_items(tmp_path / "m.txt")


def test_pairs_name_products_or_only_categories(tmp_path: Path) -> None:
    from vsearch.sources import read_pairs

    (tmp_path / "p.csv").write_text("image,product_id\nphotos/a.jpg,Banana\n")
    (item,) = read_pairs(tmp_path / "p.csv")
    assert (item.product_id, item.image) == ("Banana", str(tmp_path / "photos" / "a.jpg"))
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "category": "/dress/"}\n')
    (item,) = read_pairs(tmp_path / "c.jsonl")
    assert (item.product_id, item.category, item.image) == ("", "dress", str(tmp_path / "a.jpg"))
    (tmp_path / "mixed.jsonl").write_text('{"image": "a.jpg", "category": "dress"}\n{"image": "b.jpg", "product_id": "x"}\n')
    with pytest.raises(ManifestError, match="every pair needs a product_id"):
        read_pairs(tmp_path / "mixed.jsonl")
    (tmp_path / "bare.csv").write_text("image\na.jpg\n")
    with pytest.raises(ManifestError, match="every pair needs a product_id"):
        read_pairs(tmp_path / "bare.csv")
    (tmp_path / "empty.csv").write_text("image,category\na.jpg,\n")
    with pytest.raises(ManifestError, match=r"empty.csv:2: empty category"):
        read_pairs(tmp_path / "empty.csv")
    with pytest.raises(ManifestError, match="no such file"):
        read_pairs(tmp_path / "missing.csv")
