"""A damaged index directory (issue 9): derived files heal, damaged sources fail with
one clear line, and a read-only open never creates or overwrites anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vsearch import Engine
from vsearch.cli import main
from vsearch.errors import IndexFormatError

MODEL = "tiny-test"


@pytest.fixture
def built(index_dir: Path, catalog_folder: Path) -> Path:
    with Engine.open(index_dir, model=MODEL, create=True) as engine:
        engine.ingest(catalog_folder, quiet=True, workers=0)
    return index_dir


@pytest.mark.parametrize("damage", [b"", b"garbage, not a faiss index", None])
def test_a_damaged_faiss_index_is_rebuilt_from_the_catalog(
    built: Path, catalog_folder: Path, damage: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = built / "index.faiss"
    if damage is None:  # a valid faiss file of the wrong dimension
        from vsearch.index import VectorIndex

        VectorIndex.create("IDMap2,Flat", 8).save(path)
    else:
        path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="vsearch"), Engine.open(built) as engine:
        assert engine.info()["vectors"] == 25
        assert engine.search(catalog_folder / "Bakery/p04.jpg", k=1)[0].product_id == "Bakery/p04"
    assert any("rebuilt" in r.getMessage() for r in caplog.records)
    with Engine.open(built) as engine:  # healed on disk too
        assert engine.info()["vectors"] == 25


def test_a_missing_catalog_is_an_error_and_nothing_is_created(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (built / "catalog.db").unlink()
    index_before = (built / "index.faiss").read_bytes()
    with pytest.raises(IndexFormatError, match="catalog.db"):
        Engine.open(built)
    assert main(["info", "--index", str(built)]) == 1
    assert "catalog.db" in capsys.readouterr().err
    assert not (built / "catalog.db").exists()
    assert (built / "index.faiss").read_bytes() == index_before


@pytest.mark.parametrize("text", ["[]", '{"format_version": 3}', '{"format_version": 3, "model": 5}', "{"])
def test_a_garbage_manifest_is_one_clear_line(built: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    (built / "manifest.json").write_text(text)
    with pytest.raises(IndexFormatError, match="manifest"):
        Engine.open(built)
    assert main(["info", "--index", str(built)]) == 1
    err = capsys.readouterr().err
    assert "manifest" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_garbage_projection_is_one_clear_line(built: Path) -> None:
    (built / "projection.npz").write_bytes(b"not numpy")
    with pytest.raises(IndexFormatError, match="projection"):
        Engine.open(built)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["projection_fitted"]


def test_a_damaged_catalog_is_one_clear_line_and_left_as_it_is(built: Path) -> None:
    garbage = b"this is not a database" * 100
    (built / "catalog.db").write_bytes(garbage)
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (built / name).unlink(missing_ok=True)
    with pytest.raises(IndexFormatError, match="damaged catalog"):
        Engine.open(built)
    assert (built / "catalog.db").read_bytes() == garbage


def test_a_missing_projection_is_one_clear_line_not_a_server_that_answers_500(built: Path) -> None:
    (built / "projection.npz").unlink()
    with pytest.raises(IndexFormatError, match="projection.npz is missing or does not match"):
        Engine.open(built)
