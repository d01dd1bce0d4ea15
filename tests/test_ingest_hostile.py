"""Issue 9, ingestion findings: sources that fail, or half fail, in ways a user cannot
see from the counts. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vsearch import Engine
from vsearch.cli import main

from .conftest import make_image

MODEL = "tiny-test"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ingest_args(source: Path, index: Path) -> list[str]:
    return ["ingest", str(source), "--index", str(index), "--model", MODEL, "--quiet", "--workers", "0"]


def rejects(index: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (index / "rejects.jsonl").read_text().splitlines()]


# 1. rows whose images fail ------------------------------------------------------------
def test_a_manifest_of_missing_files_creates_nothing_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """100k rows of missing files once exited 0 and added 100k image-less products in
    50 empty categories; now nothing is created and the run fails in one line."""
    rows = "".join(f"sku{n},missing/{n}.jpg,Cat{n % 3},Title {n}\n" for n in range(12))
    (tmp_path / "m.csv").write_text("id,image,category,title\n" + rows)
    index = tmp_path / "idx"
    code, out, err = cli(capsys, *ingest_args(tmp_path / "m.csv", index))
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"vsearch: error: nothing ingested from {tmp_path / 'm.csv'}: all 12 items were rejected, e.g. ")
    assert "missing/0.jpg" in err and str(index / "rejects.jsonl") in err
    assert len(rejects(index)) == 12
    with Engine.open(index) as engine:
        info = engine.info()
        assert (info["products"], info["images"], info["categories"]) == (0, 0, 0)


def test_a_product_is_created_only_with_a_stored_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(1).save(tmp_path / "a.jpg")
    make_image(2).save(tmp_path / "c.jpg")
    (tmp_path / "m.csv").write_text(
        "id,image,category,title\n"
        "sku1,a.jpg,Dairy,Milk\n"
        "sku2,gone.jpg,Ghosts,Nothing\n"  # its only image fails: no product
        "sku3,gone-too.jpg,Bakery,Bread\n"  # one of two images fails: the product is created
        "sku3,c.jpg,Bakery,Bread\n"
    )
    index = tmp_path / "idx"
    code, out, _ = cli(capsys, *ingest_args(tmp_path / "m.csv", index))
    assert code == 0
    assert "4 items: 2 embedded, 0 unchanged, 2 rejected" in out
    assert "1 product not created: none of its images could be stored" in out
    assert {Path(r["source"]).name for r in rejects(index)} == {"gone.jpg", "gone-too.jpg"}
    with Engine.open(index) as engine:
        assert engine.catalog.product_ids() == {"sku1", "sku3"}
        assert set(engine.catalog.category_counts()) == {"Dairy", "Bakery"}
    # A re-run that finds every image unchanged is no failure; nor is the JSON summary
    code, out, _ = cli(capsys, *ingest_args(tmp_path / "m.csv", index), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["unchanged"] == 2 and summary["products_skipped"] == 1


def test_a_product_with_images_is_updated_even_when_its_new_image_fails(tmp_path: Path) -> None:
    make_image(1).save(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("id,image,category,title\nsku1,a.jpg,Dairy,Milk\n")
    (tmp_path / "n.csv").write_text("id,image,category,title\nsku1,gone.jpg,Dairy/Milk,Whole milk\n")
    with Engine.open(tmp_path / "idx", model=MODEL, create=True) as engine:
        engine.ingest(tmp_path / "m.csv", quiet=True, workers=0)
        report = engine.ingest(tmp_path / "n.csv", quiet=True, workers=0)
        assert report.failed and report.products_skipped == []
        product = engine.catalog.product("sku1")
        assert (product.title, product.category) == ("Whole milk", "Dairy/Milk")


# 2. a file name that is not UTF-8 ------------------------------------------------------
def test_a_non_utf8_file_name_is_rejected_by_name_and_the_rest_ingested(
    catalog_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = os.path.join(os.fsencode(catalog_folder / "Bakery"), b"caf\xe9.jpg")
    try:
        make_image(99).save(os.fsdecode(bad), format="JPEG")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    index = tmp_path / "idx"
    code, out, _ = cli(capsys, *ingest_args(catalog_folder, index))
    assert code == 0
    assert "26 items: 25 embedded, 0 unchanged, 1 rejected" in out
    assert "rejected " + str(catalog_folder / "Bakery") + "/caf\\xe9.jpg: file name caf\\xe9.jpg is not valid UTF-8" in out
    (reject,) = rejects(index)
    assert reject["source"].endswith("/Bakery/caf\\xe9.jpg") and "caf\\xe9.jpg" in reject["reason"]
    with Engine.open(index) as engine:
        assert engine.info()["images"] == 25


def test_a_jsonl_lone_surrogate_is_a_reject_not_a_crash(tmp_path: Path) -> None:
    make_image(1).save(tmp_path / "a.jpg")
    (tmp_path / "m.jsonl").write_text(
        '{"id": "ok", "image": "a.jpg"}\n'
        '{"id": "bad\\udce9", "image": "a.jpg"}\n'
        '{"id": "x", "image": "a.jpg", "note": "\\ud800"}\n'
    )
    with Engine.open(tmp_path / "idx", model=MODEL, create=True) as engine:
        report = engine.ingest(tmp_path / "m.jsonl", quiet=True, workers=0)
        assert engine.catalog.product_ids() == {"ok"}
    reasons = sorted(r.reason for r in report.rejected)
    assert reasons[0].startswith("attribute 'note' \\ud800 is not valid Unicode text")
    assert reasons[1].startswith("id bad\\xe9 is not valid Unicode text")


# 3. rows that share a product id -------------------------------------------------------
def test_rows_sharing_an_id_are_reported_and_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for n, name in enumerate("abcd"):
        make_image(n).save(tmp_path / f"{name}.jpg")
    (tmp_path / "m.csv").write_text(
        "id,image,category,title\n"
        "sku1,a.jpg,Dairy,Milk\n"
        "sku1,b.jpg,Dairy,Whole milk\n"  # disagrees on the title: the last wins
        "sku2,c.jpg,Bakery,Bread\n"
        "sku2,d.jpg,,\n"  # empty cells erase nothing
        "sku2,d.jpg,,\n"  # the same id and image again: ignored
    )
    index = tmp_path / "idx"
    code, out, _ = cli(capsys, *ingest_args(tmp_path / "m.csv", index))
    assert code == 0 and "4 embedded" in out
    assert "2 rows share a product id with an earlier row (2 products): treated as more images of that product" in out
    assert "the rows of 1 product disagree on title (e.g. sku1: title): the last row's non-empty value wins" in out
    assert "1 row repeats an earlier row's id and image: ignored" in out
    with Engine.open(index) as engine:
        milk, bread = engine.catalog.product("sku1"), engine.catalog.product("sku2")
        assert (milk.title, milk.category) == ("Whole milk", "Dairy")
        assert (bread.title, bread.category) == ("Bread", "Bakery")
        assert len(engine.catalog.images_of("sku1")) == len(engine.catalog.images_of("sku2")) == 2
    code, out, _ = cli(capsys, *ingest_args(tmp_path / "m.csv", index), "--json")
    summary = json.loads(out)
    assert (summary["shared_id_rows"], summary["shared_id_products"], summary["duplicates"]) == (2, 2, 1)
    assert summary["disagreements"] == {"sku1": ["title"]}


# earlier fixes, end to end -------------------------------------------------------------
def test_a_latin1_csv_and_a_null_jsonl_id_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "latin.csv").write_bytes("id,image,title\nsku1,a.jpg,Crème brûlée\n".encode("latin-1"))
    code, out, err = cli(capsys, *ingest_args(tmp_path / "latin.csv", tmp_path / "idx"))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"vsearch: error: {tmp_path / 'latin.csv'}: not UTF-8 text (byte 0xe8 ")
    (tmp_path / "null.jsonl").write_text('{"id": null, "image": "a.jpg"}\n')
    code, out, err = cli(capsys, *ingest_args(tmp_path / "null.jsonl", tmp_path / "idx"))
    assert code == 1 and out == "" and err == f"vsearch: error: {tmp_path / 'null.jsonl'}:1: id must be a string, not null\n"
