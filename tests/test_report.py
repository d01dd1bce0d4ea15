"""vsearch eval --report: the self-contained HTML page, its content, and a real browser
opening it from disk without a single network request."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsearch.cli import main
from vsearch.evaluate import LabelledQuery, QueryResult
from vsearch.query import Hit
from vsearch.report import confused_pairs, recall_by_category, worst_misses

from .conftest import make_image

SCRIPT_ID = "x<script>alert(1)</script>"
SCRIPT_TITLE = "<img src=x onerror=alert(2)>"
ESCAPED_ID = "x&lt;script&gt;alert(1)&lt;/script&gt;"
P1 = 'p1 <span class="title">Pink Lady</span>'  # p1 has a title, shown after its id
CHROMIUM = os.environ.get("VSEARCH_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)


def write_data(root: Path) -> tuple[Path, Path]:
    """12 products in 3 categories plus one whose id is an HTML script, queried with
    their own images (found first), and 4 mislabelled queries, which are misses:
    three photos of p0 labelled p1 and one photo of the script product labelled p2."""
    root.mkdir(parents=True, exist_ok=True)
    gallery, queries = ["id,image,category,title"], ["image,expected_id,category"]
    for n in range(12):
        make_image(n).save(root / f"g{n}.png")
        gallery.append(f"p{n},g{n}.png,c{n % 3},{'Pink Lady' if n == 1 else ''}")
        queries.append(f"g{n}.png,p{n},c{n % 3}")
    make_image(12).save(root / "g12.png")
    gallery.append(f"{SCRIPT_ID},g12.png,c0,{SCRIPT_TITLE}")
    shutil.copy(root / "g0.png", root / "miss&a.png")
    queries += ["miss&a.png,p1,", "miss&a.png,p1,", "miss&a.png,p1,", "g12.png,p2,"]
    (root / "g.csv").write_text("\n".join(gallery) + "\n")
    (root / "q.csv").write_text("\n".join(queries) + "\n")
    return root / "g.csv", root / "q.csv"


def run_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["eval", *args, "--model", "tiny-test", "--json"]) == 0
    metrics: dict[str, object] = json.loads(capsys.readouterr().out)
    return metrics


@pytest.fixture(scope="module")
def gallery_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The page of a --gallery evaluation and the metrics the command printed."""
    root = tmp_path_factory.mktemp("report")
    gallery, queries = write_data(root / "data")
    out = root / "report"
    buffer = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(buffer):
        code = main(
            ["eval", "--gallery", str(gallery), "--queries", str(queries), "--model", "tiny-test", "--json", "--report", str(out)]
        )
    assert code == 0
    return out / "index.html", json.loads(buffer.getvalue())


def looks_like(thumb: str, seed: int) -> bool:
    """Whether a base64 JPEG thumbnail shows ``make_image(seed)`` (JPEG-close)."""
    image = Image.open(io.BytesIO(base64.b64decode(thumb))).convert("RGB")
    original = make_image(seed).resize(image.size)
    diff = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(original, dtype=np.float32))
    return image.width > 32 and float(diff.mean()) < 12


def rows(html_text: str, table_id: str) -> list[str]:
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', html_text, re.S)
    assert match, f"no table #{table_id}"
    return re.findall(r"<tr.*?</tr>", match.group(1), re.S)


def test_summary_matches_the_printed_metrics(gallery_report: tuple[Path, dict[str, object]]) -> None:
    page, metrics = gallery_report
    text = page.read_text(encoding="utf-8")
    shown = dict(re.findall(r'<tr data-metric="([^"]+)"><th>[^<]*</th><td>([^<]*)</td></tr>', text))
    assert shown == {key: "-" if value is None else str(value) for key, value in metrics.items()}
    assert metrics["n_queries"] == 16 and metrics["recall@1"] == 0.75  # the 4 mislabelled queries miss


def test_recall_per_category_rows(gallery_report: tuple[Path, dict[str, object]]) -> None:
    text = gallery_report[0].read_text(encoding="utf-8")
    cells = {name: values for name, *values in (re.findall(r">([^<>]+)</td>", row) for row in rows(text, "categories")[1:])}
    # c0: p0, p3, p6, p9 found first; c1: p1, p4, p7, p10 plus three misses labelled p1 (category from the catalog)
    assert cells["c0"][:2] == ["4", "1.0000"]
    assert cells["c1"][:2] == ["7", f"{4 / 7:.4f}"]
    assert cells["c2"][:2] == ["5", f"{4 / 5:.4f}"]  # p2, p5, p8, p11 and the script photo labelled p2


def test_confused_pairs_are_counted(gallery_report: tuple[Path, dict[str, object]]) -> None:
    text = gallery_report[0].read_text(encoding="utf-8")
    pairs = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows(text, "confused")[1:]]
    script = f'{ESCAPED_ID} <span class="title">&lt;img src=x onerror=alert(2)&gt;</span>'
    assert pairs == [[P1, "p0", "3"], ["p2", script, "1"]]


def test_misses_show_query_results_and_expected_product(gallery_report: tuple[Path, dict[str, object]]) -> None:
    text = gallery_report[0].read_text(encoding="utf-8")
    misses = re.findall(r'<div class="miss" data-expected="([^"]*)">(.*?)</div>(?=<div class="miss"|</div>)', text, re.S)
    assert sorted(expected for expected, _ in misses) == ["p1", "p1", "p1", "p2"]
    for expected, body in misses:
        captions = re.findall(r"<figcaption>(.*?)<br>", body)
        assert captions[0] == "query" and captions[-1] == f"expected: {P1 if expected == 'p1' else expected}"
        assert len(captions) == 1 + 5 + 1  # the query, its top 5, the expected product
        assert body.count('<img class="thumb"') == 7 and "no image" not in body
        first = "p0" if expected == "p1" else ESCAPED_ID
        assert captions[1].startswith(f"1. {first}")
        assert ("miss&amp;a.png" if expected == "p1" else "g12.png") in body
        thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]*)"', body)
        assert looks_like(thumbs[0], 0 if expected == "p1" else 12)  # the query photo
        assert looks_like(thumbs[-1], int(expected[1:]))  # the expected product's catalog image
        assert not looks_like(thumbs[-1], 0 if expected == "p1" else 12)


def test_page_escapes_data_and_requests_nothing(gallery_report: tuple[Path, dict[str, object]]) -> None:
    text = gallery_report[0].read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "<img src=x" not in text
    assert ESCAPED_ID in text and "&lt;img src=x onerror=alert(2)&gt;" in text
    assert not EXTERNAL.findall(text)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)


def test_report_of_an_existing_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery, queries = write_data(tmp_path / "data")
    index = tmp_path / "index"
    assert main(["ingest", str(gallery), "--index", str(index), "--model", "tiny-test"]) == 0
    capsys.readouterr()
    metrics = run_eval(["--index", str(index), "--queries", str(queries), "--report", str(tmp_path / "out")], capsys)
    text = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert f'<tr data-metric="recall@1"><th>recall@1</th><td>{metrics["recall@1"]}</td></tr>' in text
    assert f'<tr data-expected="p1" data-first="p0"><td>{P1}</td><td>p0</td><td class="num">3</td></tr>' in text
    assert text.count('<div class="miss" data-expected="p1">') == 3
    assert not EXTERNAL.findall(text) and "<script" not in text.lower()


def test_report_into_a_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery, queries = write_data(tmp_path / "data")
    (tmp_path / "taken").write_text("not a folder")
    code = main(["eval", "--gallery", str(gallery), "--queries", str(queries), "--report", str(tmp_path / "taken")])
    assert code == 1
    assert "--report" in capsys.readouterr().err


def test_help_names_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "DIR/index.html" in capsys.readouterr().out


def hit(product_id: str) -> Hit:
    return Hit(product_id, 0, 1.0, "", "", {}, "")


def test_analysis_functions() -> None:
    results = [
        QueryResult(LabelledQuery("a", "p1", "c"), [hit("p1")]),
        QueryResult(LabelledQuery("b", "p1"), [hit("p2"), hit("p1")]),
        QueryResult(LabelledQuery("c", "p3"), [hit("p2"), hit("p4")]),
        QueryResult(LabelledQuery("d", "p1"), [hit("p2")]),
        QueryResult(LabelledQuery("e", category="c"), [hit("p2")]),  # no expected product: no recall, no miss
    ]
    assert [r.rank for r in results] == [1, 2, None, None, None]
    assert confused_pairs(results) == [("p1", "p2", 2), ("p3", "p2", 1)]
    assert [r.query.image for r in worst_misses(results)] == ["c", "d", "b"]
    assert [r.query.image for r in worst_misses(results, limit=1)] == ["c"]
    table = recall_by_category(results, {"p1": "fruit", "p3": "veg"})
    assert table == {
        "c": {"queries": 1, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0},
        "fruit": {"queries": 2, "recall@1": 0.0, "recall@5": 0.5, "recall@10": 0.5},
        "veg": {"queries": 1, "recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0},
    }


def test_report_in_chromium(gallery_report: tuple[Path, dict[str, object]]) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e .[test])")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium); never downloads a browser")
    page_path = gallery_report[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            playwright.expect(page.locator("#summary")).to_be_visible()
            playwright.expect(page.locator("#summary tr[data-metric='recall@1'] td")).to_have_text("0.75")
            playwright.expect(page.locator("#categories tr[data-category='c1']")).to_be_visible()
            widths = page.eval_on_selector_all("img.thumb", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len(widths) == 4 * 7 and all(w > 0 for w in widths), widths
            assert page.evaluate("() => document.querySelectorAll('script').length") == 0
        finally:
            browser.close()
    outside = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert requests and not outside, f"the page made network requests: {outside}"
