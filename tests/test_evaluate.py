from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsearch.cli import main
from vsearch.evaluate import LabelledQuery, score
from vsearch.query import Hit

from .conftest import make_image


def hit(product_id: str, category: str = "") -> Hit:
    return Hit(product_id, 0, 1.0, "", category, {}, "")


def test_score_recall_and_map() -> None:
    queries = [LabelledQuery("a", "p1"), LabelledQuery("b", "p2"), LabelledQuery("c", "p9")]
    results = [
        [hit("p1"), hit("p2")],
        [hit("p1"), hit("p3"), hit("p4"), hit("p5"), hit("p2")],
        [hit("p1")],
    ]
    m = score(queries, results, {})
    assert m["recall@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["recall@5"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["map@10"] == pytest.approx((1 + 1 / 5 + 0) / 3, abs=1e-4)
    assert m["category_precision@10"] is None and m["n_queries"] == 3


def test_score_category_level() -> None:
    queries = [LabelledQuery("a", category="shirt")]
    results = [[hit("x", "shirt"), hit("y", "pants"), hit("z", "shirt")]]
    m = score(queries, results, {"shirt": 2, "pants": 5})
    assert m["category_precision@10"] == pytest.approx(0.2)
    assert m["map@10"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)
    assert m["recall@1"] is None


def test_eval_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery, queries = ["id,image,category"], ["image,expected_id,category"]
    for n in range(12):
        make_image(n).save(tmp_path / f"g{n}.png")
        make_image(n).rotate(3).save(tmp_path / f"q{n}.png")
        gallery.append(f"p{n},g{n}.png,c{n % 3}")
        queries.append(f"q{n}.png,p{n},c{n % 3}")
    (tmp_path / "g.csv").write_text("\n".join(gallery) + "\n")
    (tmp_path / "q.csv").write_text("\n".join(queries) + "\n")
    code = main(
        ["eval", "--gallery", str(tmp_path / "g.csv"), "--queries", str(tmp_path / "q.csv"), "--model", "tiny-test", "--json"]
    )
    metrics = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "map@10", "category_precision@10", "n_queries", "images_per_s"}
    assert metrics["n_queries"] == 12 and metrics["recall@10"] == 1.0
    assert metrics["recall@1"] >= 0.5  # slightly rotated copies of the gallery images
