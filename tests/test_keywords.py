"""Keyword + photo (issue 12, part 3): the FTS5 index over titles and text
attributes and the triggers that keep it in sync, hostile text, keyword-only
search with filters, reciprocal rank fusion with a photo (and with an open_clip
text tower), through the library, the API and the CLI."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsearch import Engine
from vsearch.attributes import AttributeFilter
from vsearch.catalog import Catalog
from vsearch.cli import main
from vsearch.errors import ConfigError, FilterError
from vsearch.fusion import DEFAULT_TEXT_WEIGHT, RRF_K, reciprocal_rank_fusion
from vsearch.keywords import MAX_WORDS, TOKENIZER, match_expression, words
from vsearch.query import Hit, SearchOptions

from .api_helpers import jpeg
from .conftest import make_image
from .test_api import client_for

MODEL = "tiny-test"
# words the porter stemmer leaves as they are, so a Python reference can tokenize like FTS5
VOCAB = ["kiwi", "plum", "fig", "oat", "rye", "tea", "jam", "nut", "bun", "ham"]
N = 16  # products in the seeded catalog


# ------------------------------------------------------------------------------ hostile text
HOSTILE = ['"', '""', "NOT", "a AND", "OR OR", "*", "NEAR(a b", "title:x", "^x", "(", ")", "a - b", "x\x00y", "\ud800", "'; DROP"]


def _fts() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE t USING fts5(title, body, content='', tokenize='{TOKENIZER}')")
    db.execute("INSERT INTO t(rowid, title, body) VALUES (1, 'not near apple', 'x')")
    return db


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.sampled_from(HOSTILE))
def test_no_text_makes_an_fts_syntax_error(text: str) -> None:
    expression = match_expression(text)
    if expression is None:
        assert words(text) == []
        return
    _fts().execute("SELECT rowid FROM t WHERE t MATCH ?", [expression]).fetchall()  # never raises
    assert len(words(text)) <= MAX_WORDS


def test_operators_are_plain_words_and_punctuation_is_nothing() -> None:
    db = _fts()
    assert db.execute("SELECT rowid FROM t WHERE t MATCH ?", [match_expression("NOT")]).fetchall() == [(1,)]
    assert db.execute("SELECT rowid FROM t WHERE t MATCH ?", [match_expression('"Apples*"')]).fetchall() == [(1,)]
    assert match_expression("!!! ... '\"") is None and match_expression("") is None
    assert words("Crème BRÛLÉE, crème") == ["crème", "brûlée"]


# ------------------------------------------------------------------------------ the index follows every write
def _reference(products: dict[str, tuple[str, dict[str, Any]]]) -> Counter[tuple[str, str, int]]:
    """(term, product, column) for every token FTS5 should hold: the title's, then the text attributes'."""
    out: Counter[tuple[str, str, int]] = Counter()
    for pid, (title, attrs) in products.items():
        out.update((w, pid, 0) for w in title.lower().split())
        values = [v for v in attrs.values() if isinstance(v, str)]
        values += [e for v in attrs.values() if isinstance(v, list) for e in v if isinstance(e, str)]
        out.update((w, pid, 1) for v in values for w in v.lower().split())
    return out


def _indexed(catalog: Catalog) -> Counter[tuple[str, str, int]]:
    db = catalog.db.conn
    db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab USING fts5vocab(main, product_text, instance)")
    owners = dict(db.execute("SELECT key, product_id FROM product_keys"))
    rows = db.execute("SELECT v.term, v.doc, c.cid FROM temp.vocab v JOIN pragma_table_info('product_text') c ON c.name = v.col")
    return Counter((term, owners[doc], col) for term, doc, col in rows)


def _random_product(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    pick = lambda n: " ".join(rng.choice(VOCAB, size=n).tolist())  # noqa: E731
    title = pick(int(rng.integers(0, 4))).title()  # capitals: FTS5 folds case
    attrs: dict[str, Any] = {"price": int(rng.integers(1, 9)), "organic": bool(rng.random() < 0.5)}
    if rng.random() < 0.7:
        attrs["description"] = pick(int(rng.integers(1, 6)))
    if rng.random() < 0.4:
        attrs["tags"] = [pick(1), 7, pick(2)]  # list elements: the strings count
    return title, attrs


def test_triggers_keep_the_index_equal_to_the_products_through_every_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    catalog = Catalog.open(tmp_path / "catalog.db")
    want: dict[str, tuple[str, dict[str, Any]]] = {}
    keys_before_vacuum: dict[str, int] = {}
    for step in range(40):
        with catalog.transaction():
            for _ in range(int(rng.integers(1, 5))):
                pid = f"p{int(rng.integers(0, 12))}"
                action = rng.random()
                if action < 0.25 and pid in want:
                    catalog.remove_products([pid])
                    del want[pid]
                elif action < 0.5 and pid in want:  # the title alone, or the attributes alone
                    title, attrs = want[pid]
                    if rng.random() < 0.5:
                        title = _random_product(rng)[0]
                        catalog.upsert_product(pid, title=title)
                    else:
                        attrs = _random_product(rng)[1]
                        catalog.upsert_product(pid, attributes=attrs)
                    want[pid] = (title, attrs)
                else:
                    want[pid] = _random_product(rng)
                    catalog.upsert_product(pid, title=want[pid][0], attributes=want[pid][1])
        assert _indexed(catalog) == _reference(want), f"step {step}"
        if step == 20:  # VACUUM may renumber the products' implicit rowids; the keys stay
            keys_before_vacuum = dict(catalog.db.execute("SELECT product_id, key FROM product_keys").fetchall())
            catalog.db.execute("DELETE FROM products WHERE id = 'nobody'")
            catalog.db.execute("VACUUM")
            assert dict(catalog.db.execute("SELECT product_id, key FROM product_keys").fetchall()) == keys_before_vacuum
    assert sorted(r[0] for r in catalog.db.execute("SELECT product_id FROM product_keys")) == sorted(want)
    catalog.db.execute("INSERT INTO product_text(product_text) VALUES ('integrity-check')")
    for word in VOCAB:  # and a search finds exactly the products that have the word
        found = {h.product_id for h in _keyword_hits(catalog, word)}
        assert found == {pid for (term, pid, _) in _reference(want) if term == word}
    catalog.close()


def _keyword_hits(catalog: Catalog, text: str) -> list[Hit]:
    from vsearch import keywords

    with catalog.transaction(bump=False):  # every product needs an image to be a hit
        for pid in catalog.product_ids():
            if not catalog.images_of(pid):
                catalog.put_image(pid, "a.jpg", "sha", 1, 1, np.ones(4, dtype=np.float32))
    return keywords.search(catalog, SearchOptions(text=text), 1000)


def test_a_write_costs_an_index_lookup_not_a_scan(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path / "catalog.db")
    plans: list[str] = []
    db = catalog.db.conn
    for statement in (
        "SELECT key FROM product_keys WHERE product_id = ?",
        "DELETE FROM product_keys WHERE product_id = ?",
        "UPDATE product_keys SET product_id = ? || 'x' WHERE product_id = ?",
    ):
        args = ["p"] * statement.count("?")
        plans += [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", args)]
    assert plans and all("USING" in p and "INDEX" in p or "PRIMARY KEY" in p for p in plans), plans
    catalog.close()


# ------------------------------------------------------------------------------ a seeded catalog
def write_manifest(root: Path) -> Path:
    """N products, one picture each; titles and descriptions from VOCAB, two unique words."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(N):
        make_image(n).save(root / f"{n}.jpg", quality=95)
        title = f"{VOCAB[n % len(VOCAB)]} {'rare' if n == 9 else ''}".strip()
        description = f"{VOCAB[(n + 3) % len(VOCAB)]} with {VOCAB[(n * 7) % len(VOCAB)]}"
        rows.append([f"p{n:02d}", str(root / f"{n}.jpg"), ["Fruit/Apple", "Fruit/Pear", "Dairy"][n % 3], title, description, n])
    manifest = root / "catalog.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "category", "title", "description", "price:number"])
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keywords")
    index = root / "index"
    with Engine.open(index, model=MODEL, create=True) as engine:
        engine.ingest(write_manifest(root / "catalog"), quiet=True, workers=0)
    return index


def _reference_matches(text: str) -> set[str]:
    wanted = set(words(text))
    found = set()
    for n in range(N):
        title = f"{VOCAB[n % len(VOCAB)]} {'rare' if n == 9 else ''}"
        description = f"{VOCAB[(n + 3) % len(VOCAB)]} with {VOCAB[(n * 7) % len(VOCAB)]}"
        if wanted & set(f"{title} {description}".split()):
            found.add(f"p{n:02d}")
    return found


def test_text_alone_is_a_keyword_search_ranked_by_bm25(index: Path) -> None:
    with Engine.open(index) as engine:
        assert engine.snapshot.has_text is False
        hits = engine.search(text="kiwi", k=20)
        assert {h.product_id for h in hits} == _reference_matches("kiwi")
        assert hits[0].score == 1.0 and all(0 < h.score <= 1 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        titled = {f"p{n:02d}" for n in range(N) if VOCAB[n % len(VOCAB)] == "kiwi"}
        assert {h.product_id for h in hits[: len(titled)]} == titled  # the title weighs more than the description
        assert engine.search(text="RARE!", k=5)[0].product_id == "p09"
        assert engine.search(text="nothing matches this", k=5) == []
        assert [h.image for h in engine.search(text="rare")] == [engine.product("p09").images[0].source]
        with pytest.raises(ConfigError, match="no words"):
            engine.search(text="?! ...", k=5)


def test_products_with_every_word_come_first(index: Path) -> None:
    with Engine.open(index) as engine:
        for text in ("plum rye", "fig tea rye"):  # p01: plum, rye with nut; p02: fig, tea with rye
            hits = engine.search(text=text, k=N)
            every = set.intersection(*(_reference_matches(w) for w in text.split()))
            assert every and {h.product_id for h in hits[: len(every)]} == every, text
            assert {h.product_id for h in hits} == _reference_matches(text)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_keyword_results_honour_filters_and_paging(index: Path) -> None:
    with Engine.open(index) as engine:
        text = "kiwi plum tea"
        every = engine.search(text=text, k=100)
        assert {h.product_id for h in every} == _reference_matches(text)
        page = engine.search_keywords(SearchOptions(text=text, k=3, offset=2))[0]
        assert [h.product_id for h in page] == [h.product_id for h in every[2:5]]
        cheap = AttributeFilter.from_json({"price": {"lt": 8}})
        filtered = engine.search(text=text, k=100, where=cheap, categories=["Fruit"], exclude_categories=["Fruit/Pear"])
        want = [h.product_id for h in every if h.category == "Fruit/Apple" and h.attributes["price"] < 8]
        assert [h.product_id for h in filtered] == want and want
        options = SearchOptions(text=text, k=100, exclude_products=("p00",))
        assert "p00" not in {h.product_id for h in engine.search_keywords(options)[0]}
        hits, votes = engine.search_keywords(SearchOptions(text=text, k=2))
        assert votes and votes[0][0] in {h.category for h in every}
        with pytest.raises(FilterError):
            engine.search(text=text, categories=["Nope"])


def test_a_word_moves_its_product_up_the_photo_ranking(index: Path) -> None:
    with Engine.open(index) as engine:
        photo = make_image(3)
        alone = engine.search(photo, k=N)
        target = next(h for h in alone[3:] if h.product_id == "p09")  # somewhere below the top 3
        rank = [h.product_id for h in alone].index("p09") + 1
        fused = engine.search(photo, text="rare", k=N)
        assert fused[0].product_id == "p09" and fused[1].product_id == alone[0].product_id
        assert fused[0].score == pytest.approx(1 / (RRF_K + rank) + DEFAULT_TEXT_WEIGHT / (RRF_K + 1))
        assert fused[0].image_id == target.image_id  # the photo's best image of it
        assert {h.product_id for h in fused} == {h.product_id for h in alone}
        weak = engine.search(photo, text="rare", text_weight=0.001, k=N)
        assert [h.product_id for h in weak] == [h.product_id for h in alone]  # order kept, scores fused
        off = engine.search(photo, text="rare", text_weight=0, k=N)
        assert [(h.product_id, h.score) for h in off] == [(h.product_id, h.score) for h in alone]
        nothing = engine.search(photo, text="...", k=N)  # no word: the photo alone
        assert [(h.product_id, h.score) for h in nothing] == [(h.product_id, h.score) for h in alone]
        kiwis = engine.search(photo, text="kiwi", k=5, categories=["Dairy"])
        assert all(h.category == "Dairy" for h in kiwis)


def test_reciprocal_rank_fusion() -> None:
    def hits(*ids: str) -> list[Hit]:
        return [Hit(i, n, 0.0, "", "") for n, i in enumerate(ids)]

    fused = reciprocal_rank_fusion([(hits("a", "b", "c"), 1.0), (hits("c", "d"), 2.0)])
    scores = {h.product_id: h.score for h in fused}
    assert [h.product_id for h in fused] == ["c", "d", "a", "b"]
    assert scores["c"] == pytest.approx(1 / 63 + 2 / 61) and scores["d"] == pytest.approx(2 / 62)
    assert [h.product_id for h in reciprocal_rank_fusion([(hits("a", "b"), 1.0), (hits("b", "a"), 1.0)])] == ["a", "b"]


def test_open_clip_fuses_its_text_tower_with_the_keywords(tmp_path: Path) -> None:
    index = tmp_path / "clip"
    with Engine.open(index, model="tiny-clip:random", create=True) as engine:
        engine.ingest(write_manifest(tmp_path / "catalog"), quiet=True, workers=0)
        tower = engine.search(text="rare", text_weight=0, k=N)  # the text tower alone: cosine scores
        assert len(tower) == N and all(-1 <= h.score <= 1 for h in tower)
        fused = engine.search(text="rare", k=N)
        assert fused[0].product_id == "p09"
        rank = [h.product_id for h in tower].index("p09") + 1
        assert fused[0].score == pytest.approx(1 / (RRF_K + rank) + DEFAULT_TEXT_WEIGHT / (RRF_K + 1))


# ------------------------------------------------------------------------------ API and CLI
def test_api_text_alone_beside_a_photo_and_in_a_batch(index: Path) -> None:
    with client_for(index) as c:
        alone = c.post("/v1/search?k=3", data={"text": "rare"}).json()
        assert [r["product_id"] for r in alone["results"]] == ["p09"] and alone["results"][0]["score"] == 1.0
        assert "keywords" in alone["timing_ms"] and alone["suggested_categories"][0]["category"] == "Fruit/Apple"
        photo = c.post("/v1/search?k=3", files={"image": ("q.jpg", jpeg(3))}).json()["results"]
        fused = c.post("/v1/search?k=3", files={"image": ("q.jpg", jpeg(3))}, data={"text": "rare"}).json()["results"]
        assert fused[0]["product_id"] == "p09" and fused[1]["product_id"] == photo[0]["product_id"]
        off = c.post("/v1/search?k=3&text=rare&text_weight=0", files={"image": ("q.jpg", jpeg(3))}).json()["results"]
        assert off == photo
        more = c.post("/v1/search", json={"product_id": "p03", "text": "rare", "k": 2}).json()["results"]
        assert more[0]["product_id"] == "p09" and "p03" not in {r["product_id"] for r in more}
        filtered = c.post("/v1/search", json={"text": "kiwi plum", "filter": {"price": {"gte": 10}}, "k": 50}).json()
        assert filtered["results"] and all(r["attributes"]["price"] >= 10 for r in filtered["results"])
        batch = c.post("/v1/search/batch", json={"queries": [{"text": "rare"}, {"text": "!!"}, {"text": "kiwi", "k": 1}]})
        answers = batch.json()["results"]
        assert answers[0]["result"]["results"][0]["product_id"] == "p09"
        assert answers[1]["error"]["code"] == "invalid_parameter" and "no words" in answers[1]["error"]["message"]
        assert len(answers[2]["result"]["results"]) == 1
        bad = c.post("/v1/search", data={"text": "*(\"'"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
        weight = c.post("/v1/search?text_weight=-1", data={"text": "rare"})
        assert weight.status_code == 422 and weight.json()["error"]["message"].startswith("text_weight:")
        long = c.post("/v1/search", data={"text": "x" * 1001})
        assert long.status_code == 422 and long.json()["error"]["message"].startswith("text:")


def test_openapi_documents_text_with_an_example(index: Path) -> None:
    with client_for(index) as c:
        schema = c.get("/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/v1/search"]["post"]["parameters"]}
    assert "rank" in params["text"]["description"] and params["text"]["schema"]["examples"]
    assert params["text_weight"]["schema"]["default"] == 0.5
    assert schema["components"]["schemas"]["TextSearch"]["properties"]["text"]["examples"]


def test_cli_text_alone_and_beside_a_photo(index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--text", "rare", "--index", str(index), "--json"]) == 0
    assert [r["product_id"] for r in json.loads(capsys.readouterr().out)["results"]] == ["p09"]
    photo = tmp_path / "q.png"
    make_image(3).save(photo)
    assert main(["search", str(photo), "--text", "rare", "--index", str(index), "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2] == "p09" and len(lines) == 2
    assert main(["search", str(photo), "--text", "rare", "--text-weight", "0", "--index", str(index), "--k", "1"]) == 0
    assert "p09" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["search", "--index", str(index)])
    assert usage.value.code == 2 and "search needs an image, --text WORDS, or both" in capsys.readouterr().err
    assert main(["search", "--text", "!?", "--index", str(index)]) == 1
    assert capsys.readouterr().err.strip() == "vsearch: error: text has no words to search for (letters or digits)"
