"""Attribute filters (issue 12, part 1): parsing, the SQL mirror of attributes,
filtered search against brute force over the matching images, and writes that
filters see at once."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vsearch import Engine, allowed
from vsearch.allowed import image_ids
from vsearch.attributes import AttributeFilter, Condition, parse_where
from vsearch.bulkimport import import_shards
from vsearch.catalog import Catalog
from vsearch.cli import main
from vsearch.embed import raw_dim
from vsearch.errors import ConfigError, FilterError, ManifestError
from vsearch.query import SearchOptions
from vsearch.sources import read_manifest

from .api_helpers import build_small_index, jpeg
from .test_api import client_for

MODEL = "tiny-test"
BRANDS = ["A", "B", "C", "D", "E"]
CATEGORIES = ["Fruit/Apple", "Fruit/Pear", "Dairy", "Bakery"]


def random_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Seeded attributes of every JSON type, some missing, some lists."""
    attrs: dict[str, Any] = {"brand": BRANDS[int(rng.integers(len(BRANDS)))]}
    if rng.random() < 0.9:
        attrs["price"] = round(float(rng.uniform(1, 100)), 2) if rng.random() < 0.7 else int(rng.integers(1, 100))
    if rng.random() < 0.8:
        attrs["in_stock"] = bool(rng.random() < 0.6)
    if rng.random() < 0.5:
        attrs["colors"] = [str(c) for c in rng.choice(["red", "blue", "green"], size=int(rng.integers(1, 4)))]  # repeats too
    if rng.random() < 0.2:
        attrs["sku"] = str(int(rng.integers(10)))  # text that looks like a number
    return attrs


def random_filter(rng: np.random.Generator) -> AttributeFilter:
    pool = [
        Condition("brand", "eq", BRANDS[int(rng.integers(5))]),
        Condition("brand", "in", tuple(rng.choice(BRANDS, size=2, replace=False).tolist())),
        Condition("price", "lt", float(rng.uniform(5, 100))),
        Condition("price", "gte", int(rng.integers(1, 90))),
        Condition("in_stock", "eq", bool(rng.random() < 0.5)),
        Condition("colors", "eq", str(rng.choice(["red", "blue", "green"]))),
        Condition("sku", "exists", bool(rng.random() < 0.5)),
        Condition("sku", "eq", int(rng.integers(10))),  # a number never equals the text "3"
    ]
    picked = rng.choice(len(pool), size=int(rng.integers(1, 4)), replace=False)
    return AttributeFilter(tuple(pool[i] for i in sorted(picked)))


# ---------------------------------------------------------------------------- parsing
def test_json_and_where_clauses_parse_to_the_same_conditions() -> None:
    from_json = AttributeFilter.from_json({"brand": {"in": ["A", "B"]}, "price": {"lt": 50, "gte": 10}, "in_stock": True})
    from_where = parse_where(["brand in (A, B)", "price<50", "price >= 10", "in_stock=true"])
    assert from_where is not None and from_json.key == from_where.key
    assert from_json.to_json() == {"brand": {"in": ["A", "B"]}, "price": {"lt": 50, "gte": 10}, "in_stock": {"eq": True}}
    quoted = parse_where(["sku='0042'", "size = 9.5", "name in ('a, b', c)", "color exists", "color missing"])
    assert quoted is not None
    assert [(c.key, c.op, c.value) for c in quoted.conditions] == [
        ("sku", "eq", "0042"),
        ("size", "eq", 9.5),
        ("name", "in", ("a, b", "c")),
        ("color", "exists", True),
        ("color", "exists", False),
    ]
    assert parse_where([]) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"price": {"lt": "cheap"}}, "compares numbers"),
        ({"price": {"between": [1, 2]}}, "unknown condition"),
        ({"brand": {"in": []}}, "list of 1 to"),
        ({"brand": {"exists": "yes"}}, "true or false"),
        ({"brand": {}}, "empty condition"),
        ({"brand": None}, "strings, numbers or booleans"),
        ({"brand": ["A"]}, "strings, numbers or booleans"),
        ({}, "at least one condition"),
    ],
)
def test_malformed_filters_are_refused_with_a_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        AttributeFilter.from_json(spec)


def test_an_unreadable_where_clause_names_the_forms() -> None:
    with pytest.raises(FilterError, match="cannot read --where 'price about 5'.*NAME<N"):
        parse_where(["price about 5"])


# ---------------------------------------------------------------------------- the SQL mirror
def test_sql_filters_agree_with_the_python_reference_through_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    catalog = Catalog.open(tmp_path / "catalog.db")
    attributes: dict[str, dict[str, Any]] = {}
    with catalog.transaction():
        for i in range(300):
            attributes[f"p{i}"] = random_attributes(rng)
            catalog.upsert_product(f"p{i}", attributes=attributes[f"p{i}"])
            catalog.put_image(f"p{i}", "a.jpg", f"{i:064x}", 1, 1, rng.standard_normal(8).astype(np.float32))
    with catalog.transaction():  # updates and removals go through the triggers too
        for i in range(0, 300, 7):
            attributes[f"p{i}"] = random_attributes(rng)
            catalog.upsert_product(f"p{i}", attributes=attributes[f"p{i}"])
        catalog.remove_products([f"p{i}" for i in range(3, 300, 11)])
    for i in range(3, 300, 11):
        del attributes[f"p{i}"]
    owners = catalog.image_products(list(range(1, 301)))
    sizes = []
    for _ in range(60):
        where = random_filter(rng)
        got = image_ids(catalog, where)
        want = sorted(i for i, pid in owners.items() if where.matches(attributes[pid]))
        assert got.tolist() == want, where
        sizes.append(len(want))
    assert min(sizes) == 0 < max(sizes) < 300 and len(set(sizes)) > 20  # the filters vary
    mirrored = catalog.db.execute("SELECT count(*) FROM product_attributes").fetchone()[0]
    scalars = sum(len(v) if isinstance(v, list) else 1 for attrs in attributes.values() for v in attrs.values())
    assert mirrored == scalars  # removed products left no rows behind
    catalog.close()


# ---------------------------------------------------------------------------- search
def import_catalog(root: Path, n: int, seed: int, factory: str | None = None) -> dict[str, dict[str, Any]]:
    """An index of ``n`` products (one image each, random vectors, random attributes
    and categories) imported from a Parquet shard: no model work."""
    rng = np.random.default_rng(seed)
    with Engine.open(root / "index", model=MODEL, create=True, index=_factory(factory)) as fresh:
        dim = raw_dim(fresh.manifest.model)
    attributes = {f"p{i}": random_attributes(rng) for i in range(n)}
    centres = rng.standard_normal((30, dim))  # clustered, as catalogs are: IVF tunes a small nprobe
    vectors = (centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)
    table = pa.table(
        {
            "id": list(attributes),
            "image": [f"https://example.com/{i}.jpg" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "vector": pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel())
            ),
        }
    )
    pq.write_table(table, root / "shard.parquet")
    with Engine.open(root / "index") as engine:
        import_shards(engine, [root / "shard.parquet"], quiet=True)
        # A Parquet column has one type: the mixed-type attributes go through the write path
        for pid, attrs in attributes.items():
            attrs["category"] = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            engine.put_product(pid, category=attrs["category"], attributes=attrs)
    return attributes


def _factory(factory: str | None) -> Any:
    from vsearch.config import IndexConfig

    return IndexConfig(factory=factory) if factory else None


def brute_force(engine: Engine, xq: np.ndarray, allowed: list[int], k: int) -> list[int]:
    assert engine.index is not None
    if not allowed:
        return []
    xb = engine.index.reconstruct(np.array(allowed, dtype=np.int64))
    scores = engine.snapshot.projection.apply(xq) @ xb.T
    return [allowed[i] for i in np.argsort(-scores[0], kind="stable")[:k]]


def allowed_ids(engine: Engine, attributes: dict[str, dict[str, Any]], where: AttributeFilter | None, category: str) -> list[int]:
    owners = engine.catalog.image_products(list(range(1, len(attributes) + 1)))
    return sorted(
        i
        for i, pid in owners.items()
        if (where is None or where.matches(attributes[pid]))
        and (not category or attributes[pid]["category"].startswith(category))
    )


def test_filtered_search_on_an_exact_index_equals_brute_force_over_the_matching_images(tmp_path: Path) -> None:
    attributes = import_catalog(tmp_path, 600, seed=1)
    rng = np.random.default_rng(2)
    with Engine.open(tmp_path / "index") as engine:
        assert engine.index is not None and engine.index.nlist == 0  # Flat: exact
        dim = int(engine.info()["raw_dim"])
        sizes = []
        for trial in range(40):
            where = random_filter(rng)
            category = ["", "Fruit", "Dairy"][trial % 3]
            xq = rng.standard_normal((1, dim)).astype(np.float32)
            k = int(rng.integers(1, 30))
            options = SearchOptions(k=k, group_by_product=False, where=where, categories=(category,) if category else ())
            hits = engine.search_vectors(xq, options)[0]
            allowed = allowed_ids(engine, attributes, where, category)
            assert [h.image_id for h in hits] == brute_force(engine, xq, allowed, k), (where, category)
            assert len(hits) == min(k, len(allowed))  # k results whenever k images match
            assert all(where.matches(h.attributes) for h in hits)
            sizes.append(len(allowed))
        assert 0 in sizes and max(sizes) > 100  # empty, selective and broad filters were all tried


def test_filtered_search_on_an_ivf_index_fills_k_and_finds_the_nearest(tmp_path: Path) -> None:
    attributes = import_catalog(tmp_path, 3000, seed=3, factory="IVF16,Flat")
    rng = np.random.default_rng(4)
    recalls = []
    with Engine.open(tmp_path / "index") as engine:
        assert engine.index is not None and engine.index.nlist == 16
        dim = int(engine.info()["raw_dim"])
        for _ in range(30):
            where = random_filter(rng)
            xq = rng.standard_normal((1, dim)).astype(np.float32)
            hits = engine.search_vectors(xq, SearchOptions(k=10, group_by_product=False, where=where))[0]
            allowed = allowed_ids(engine, attributes, where, "")
            want = brute_force(engine, xq, allowed, 10)
            assert len(hits) == len(want) and all(where.matches(h.attributes) for h in hits)
            if want:
                recalls.append(len({h.image_id for h in hits} & set(want)) / len(want))
        paths = engine.index.paths.copy()
    assert np.mean(recalls) >= 0.9, recalls
    assert paths["exact"] > 0 and paths["selector"] + paths["selector_more"] > 0, paths  # both kinds of filter


def test_a_write_is_seen_by_the_next_filtered_search_at_the_cost_of_the_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attributes = import_catalog(tmp_path, 200, seed=5)
    cheap = AttributeFilter.from_json({"price": {"lt": 10}})
    with Engine.open(tmp_path / "index") as engine:
        reads: list[int | None] = []  # how many images each allowed-set query re-checked (None: all)
        query = allowed.image_ids

        def counted(catalog: Catalog, where: AttributeFilter, among: list[int] | None = None) -> np.ndarray:
            reads.append(None if among is None else len(among))
            return query(catalog, where, among)

        monkeypatch.setattr(allowed, "image_ids", counted)
        dim = int(engine.info()["raw_dim"])
        xq = np.random.default_rng(6).standard_normal((1, dim)).astype(np.float32)
        options = SearchOptions(k=100, where=cheap)

        def found() -> set[str]:
            return {h.product_id for h in engine.search_vectors(xq, options)[0]}

        before = found()
        assert before == {pid for pid, a in attributes.items() if cheap.matches(a)}
        assert found() is not None and engine.snapshot.filters._where  # the allowed set is kept
        dear = sorted(before)[0]
        engine.put_product(dear, category=attributes[dear]["category"], attributes={**attributes[dear], "price": 99})
        assert found() == before - {dear}  # the price change, on the very next search
        bargain = next(pid for pid, a in attributes.items() if pid not in before)
        engine.put_product(bargain, category="Dairy", attributes={"price": 1})
        assert found() == before - {dear} | {bargain}
        engine.delete_product(bargain)
        assert found() == before - {dear}
        assert reads == [None, 1, 1, 1]  # one full read, then each write re-checked its own image

        dairy = replace(options, categories=("Dairy",))
        in_dairy = {h.product_id for h in engine.search_vectors(xq, dairy)[0]}
        assert in_dairy == {p for p in before - {dear} if attributes[p]["category"] == "Dairy"}
        mover = next(p for p in sorted(before - {dear}) if attributes[p]["category"] != "Dairy")
        engine.put_product(mover, category="Dairy", attributes=attributes[mover])  # a category move, same price
        assert {h.product_id for h in engine.search_vectors(xq, dairy)[0]} == in_dairy | {mover}


# ---------------------------------------------------------------------------- manifests, CLI, API
def test_csv_columns_declared_number_or_bool_are_typed(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,image,brand,price:number,in_stock:bool,sku\na,a.jpg,Acme,12,yes,0042\nb,b.jpg,Zeta,9.5,false,7\nc,c.jpg,Zeta,,,\n"
    )
    items = {it.product_id: it.attributes for it in read_manifest(manifest)}
    assert items == {
        "a": {"brand": "Acme", "price": 12, "in_stock": True, "sku": "0042"},
        "b": {"brand": "Zeta", "price": 9.5, "in_stock": False, "sku": "7"},
        "c": {"brand": "Zeta", "sku": ""},
    }
    manifest.write_text("id,image,price:number\na,a.jpg,cheap\n")
    with pytest.raises(ManifestError, match=r"m.csv:2: price:number must be a number, not 'cheap'"):
        read_manifest(manifest)
    manifest.write_text("id,image,in_stock:bool\na,a.jpg,maybe\n")
    with pytest.raises(ManifestError, match=r"m.csv:2: in_stock:bool must be true/false"):
        read_manifest(manifest)


@pytest.fixture(scope="module")
def priced_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 25-product test catalog, product n priced n and in stock when n is even."""
    root = tmp_path_factory.mktemp("priced")
    index = build_small_index(root)
    with Engine.open(index) as engine:
        for pid in sorted(engine.catalog.product_ids()):
            n = int(pid[-2:])
            product = engine.product(pid).product
            engine.put_product(pid, category=product.category, attributes={"price": n, "in_stock": n % 2 == 0})
    return index


def test_cli_search_where(priced_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = priced_index.parent / "catalog" / "Bakery" / "p04.jpg"
    args = ["search", str(query), "--index", str(priced_index), "--k", "25", "--json"]
    assert main([*args, "--where", "price<10", "--where", "in_stock=true"]) == 0
    found = {h["product_id"] for h in json.loads(capsys.readouterr().out)["results"]}
    assert {int(p[-2:]) for p in found} == {0, 2, 4, 6, 8}
    assert main([*args, "--where", "price about 3"]) == 1
    assert "cannot read --where 'price about 3'" in capsys.readouterr().err


def test_api_filter_in_json_query_string_and_form(priced_index: Path) -> None:
    image = jpeg(4)
    with client_for(priced_index) as client:
        body = {"product_id": "Bakery/p04", "k": 25, "filter": {"price": {"gte": 20}}}
        found = {h["product_id"] for h in client.post("/v1/search", json=body).json()["results"]}
        assert {int(p[-2:]) for p in found} == {20, 21, 22, 23, 24}
        query = json.dumps({"in_stock": False, "price": {"lt": 6}})
        hits = client.post("/v1/search", params={"filter": query, "k": 25}, files={"image": ("q.jpg", image)}).json()
        assert {int(h["product_id"][-2:]) for h in hits["results"]} == {1, 3, 5}
        form = client.post(
            "/v1/search", data={"filter": '{"price": {"in": [3, 7]}}', "k": "25"}, files={"image": ("q.jpg", image)}
        )
        assert {int(h["product_id"][-2:]) for h in form.json()["results"]} == {3, 7}
        bad = client.post("/v1/search", json={"product_id": "Bakery/p04", "filter": {"price": {"lt": "x"}}})
        assert bad.status_code == 422 and "lt compares numbers" in bad.json()["error"]["message"]
        assert client.post("/v1/search", json={"product_id": "Bakery/p04", "filter": "{oops"}).status_code == 422


# ---------------------------------------------------------------------------- facets
def reference_counts(attributes: dict[str, dict[str, Any]], products: set[str], name: str) -> dict[tuple[str, Any], int]:
    counts: dict[tuple[str, Any], int] = {}
    for pid in products:
        raw = attributes[pid].get(name)
        for key in {(type(v).__name__, v) for v in (raw if isinstance(raw, list) else [raw]) if v is not None}:
            counts[key] = counts.get(key, 0) + 1  # a product once per value, however often its list repeats it
    return counts


def test_facet_counts_over_the_filtered_set_and_the_results_match_a_python_count(tmp_path: Path) -> None:
    attributes = import_catalog(tmp_path, 400, seed=7)
    rng = np.random.default_rng(8)
    with Engine.open(tmp_path / "index") as engine:
        dim = int(engine.info()["raw_dim"])
        for trial in range(12):
            where = random_filter(rng) if trial % 4 else None
            category = ("Fruit",) if trial % 3 == 0 else ()
            options = SearchOptions(k=15, where=where, categories=category, facets=("brand", "in_stock", "colors", "category"))
            hits = engine.search_vectors(rng.standard_normal((1, dim)).astype(np.float32), options)[0]
            facets = engine.facets(options, hits)
            for name in options.facets:
                # a facet's counts leave out its own conditions (disjunctive facets)
                rest = tuple(c for c in where.conditions if c.key != name) if where is not None else ()
                own = AttributeFilter(rest) if rest else None
                in_category = bool(category) and name != "category"
                allowed = {
                    pid
                    for pid, a in attributes.items()
                    if (own is None or own.matches(a)) and (not in_category or a["category"].startswith("Fruit"))
                }
                got = {(type(c.value).__name__, c.value): c.count for c in facets[name]["all"]}
                assert got == reference_counts(attributes, allowed, name), (name, where)
                top = {(type(c.value).__name__, c.value): c.count for c in facets[name]["top"]}
                assert top == reference_counts(attributes, {h.product_id for h in hits}, name)
            counts = [c.count for c in facets["brand"]["all"]]
            assert counts == sorted(counts, reverse=True)  # most frequent first


def test_facets_through_the_api_and_the_cli(priced_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with client_for(priced_index) as client:
        body = {"product_id": "Bakery/p04", "k": 3, "filter": {"price": {"lt": 10}}, "facets": ["in_stock", "category"]}
        facets = client.post("/v1/search", json=body).json()["facets"]
        # products 0-9 but the query's own (p04, left out of its results)
        assert facets["in_stock"]["all"] == [{"value": False, "count": 5}, {"value": True, "count": 4}]
        assert sum(c["count"] for c in facets["in_stock"]["top"]) == 3
        assert sum(c["count"] for c in facets["category"]["all"]) == 9
        plain = client.post("/v1/search", json={"product_id": "Bakery/p04", "k": 3}).json()
        assert plain["facets"] == {}
    query = priced_index.parent / "catalog" / "Bakery" / "p04.jpg"
    args = ["search", str(query), "--index", str(priced_index), "--where", "price>=20", "--facet", "in_stock"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "in_stock: true (3), false (2)"


def test_a_picked_value_leaves_the_other_values_of_its_attribute_countable(priced_index: Path) -> None:
    with Engine.open(priced_index) as engine:
        picked = SearchOptions(where=AttributeFilter.from_json({"in_stock": True, "price": {"lt": 10}}), facets=("in_stock",))
        counts = {c.value: c.count for c in engine.facets(picked)["in_stock"]["all"]}
        assert counts == {True: 5, False: 5}  # in_stock's own condition left out; price's kept


def test_values_sqlite_cannot_compare_are_refused_at_the_edges(tmp_path: Path) -> None:
    assert AttributeFilter.from_json({"a": {"in": [1, True, "1"]}}).conditions[0].value == (1, True, "1")  # three kinds
    with pytest.raises(FilterError, match="compares numbers"):
        AttributeFilter.from_json({"price": {"lt": 10**20}})
    with pytest.raises(FilterError, match="strings, numbers or booleans"):
        AttributeFilter.from_json({"price": float("nan")})
    where = parse_where(["status = missing", "origin=made in (USA)"])
    assert where is not None and [(c.key, c.op, c.value) for c in where.conditions] == [
        ("status", "eq", "missing"),
        ("origin", "eq", "made in (USA)"),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "image": "a.jpg", "price": NaN}\n')
    with pytest.raises(ManifestError, match="m.jsonl:1: attributes must be finite"):
        read_manifest(manifest)
    catalog = Catalog.open(tmp_path / "catalog.db")
    with pytest.raises(ConfigError, match="finite numbers"), catalog.transaction():
        catalog.upsert_product("a", attributes={"price": float("inf")})
    # a NaN an older release stored mirrors nothing instead of failing the write
    with catalog.transaction():
        catalog.db.execute("INSERT INTO products(id, attributes, created_at, updated_at) VALUES ('old', '{\"x\": NaN}', 0, 0)")
    assert catalog.read("SELECT count(*) FROM product_attributes", []) == [(0,)]
    catalog.close()


def test_an_attribute_change_by_another_process_is_caught_up(tmp_path: Path) -> None:
    attributes = import_catalog(tmp_path, 120, seed=9)
    cheap = AttributeFilter.from_json({"price": {"lt": 20}})
    with Engine.open(tmp_path / "index") as server:
        dim = int(server.info()["raw_dim"])
        xq = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
        options = SearchOptions(k=120, where=cheap)
        before = {h.product_id for h in server.search_vectors(xq, options)[0]}
        gone = sorted(before)[0]
        other = Catalog.open(tmp_path / "index" / "catalog.db")  # another process's write
        with other.transaction():
            other.upsert_product(gone, attributes={**attributes[gone], "price": 99})
        other.close()
        server.refresh()  # what the server does every reload_interval_s
        assert {h.product_id for h in server.search_vectors(xq, options)[0]} == before - {gone}
