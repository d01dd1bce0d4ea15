from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vsearch.api import create_app
from vsearch.batcher import Overloaded
from vsearch.config import ServeConfig
from vsearch.engine import Engine

from .api_helpers import build_small_index, http_server, jpeg, png

KEY = {"Authorization": "Bearer write-key"}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_index(tmp_path_factory.mktemp("api"))


def client_for(index_dir: Path, **overrides: object) -> TestClient:
    config = ServeConfig(index_dir=str(index_dir), api_key="write-key", max_upload_bytes=300_000, max_pixels=4_000_000)
    for key, value in overrides.items():
        object.__setattr__(config, key, value)
    return TestClient(create_app(config))


@pytest.fixture(scope="module")
def client(index_dir: Path) -> Iterator[TestClient]:
    with client_for(index_dir) as c:
        yield c


def search(client: TestClient, data: bytes | None = None, params: str = "", **form: str) -> dict:
    files = {"image": ("q.jpg", data, "image/jpeg")} if data is not None else None
    response = client.post(f"/v1/search?{params}", files=files, data=form or None)
    assert response.status_code == 200, response.text
    return response.json()


def error(response, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


def test_health_ready_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]
    assert "/v1/info" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert "vsearch" in client.get("/").text


def test_openapi_shows_the_query_kinds_and_options(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema == client.app.openapi()  # type: ignore[attr-defined]
    search_op = schema["paths"]["/v1/search"]["post"]
    kinds = {"UploadSearch", "Base64Search", "UrlSearch", "ProductSearch", "TextSearch", "VectorSearch"}
    for media in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json"):
        variants = search_op["requestBody"]["content"][media]["schema"]["oneOf"]
        assert {v["$ref"].rsplit("/", 1)[-1] for v in variants} == kinds
    assert schema["components"]["schemas"]["VectorSearch"]["properties"]["vector"]["type"] == "array"
    params = {p["name"]: p for p in search_op["parameters"]}
    assert set(params) == {
        "k",
        "offset",
        "category",
        "exclude_category",
        "min_score",
        "group_by_product",
        "filter",
        "facets",
        "crop",
        "text",
        "text_weight",
        "collapse",
    }
    assert params["filter"]["schema"]["examples"][0] == {"brand": {"in": ["A", "B"]}, "price": {"lt": 50}, "in_stock": True}
    assert (params["k"]["schema"]["minimum"], params["k"]["schema"]["maximum"]) == (1, 100)
    assert all(p["in"] == "query" and not p["required"] for p in params.values())
    assert "oneOf" in str(schema["components"]["schemas"]["BatchIn"])
    assert search_op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    missing = {r for r in refs(schema) if r.rsplit("/", 1)[-1] not in schema["components"]["schemas"]}
    assert not missing, missing


def test_upload_search_shape(client: TestClient) -> None:
    body = search(client, jpeg(2), "k=5")
    assert len(body["results"]) == 5
    top = body["results"][0]
    assert top["product_id"] == "Dairy/Milk/p02"
    assert set(top) == {
        "product_id",
        "title",
        "category",
        "score",
        "image_id",
        "image_url",
        "thumbnail_url",
        "attributes",
        "variant_group",
        "variants",
        "variant_count",
    }
    assert top["thumbnail_url"] == f"/v1/images/{top['image_id']}/thumbnail"
    assert set(body["timing_ms"]) >= {"decode", "embed", "search", "lookup"}
    shares = [s["share"] for s in body["suggested_categories"]]
    assert shares and sum(shares) <= 1.0001 and shares == sorted(shares, reverse=True)


def test_filters_pagination_and_grouping(client: TestClient) -> None:
    fruit = search(client, jpeg(2), "k=10&category=Fruit")["results"]
    assert len(fruit) == 10 and all(r["category"].startswith("Fruit/") for r in fruit)
    no_dairy = search(client, jpeg(2), "k=25&exclude_category=Dairy")["results"]
    assert len(no_dairy) == 15
    both = search(client, jpeg(2), "k=10&category=Bakery&category=Fruit/Apple")["results"]
    assert {r["category"] for r in both} == {"Bakery", "Fruit/Apple"}
    full = search(client, jpeg(2), "k=8")["results"]
    page = search(client, jpeg(2), "k=4&offset=4")["results"]
    assert [r["product_id"] for r in page] == [r["product_id"] for r in full[4:8]]
    high = search(client, jpeg(2), "k=10&min_score=0.9")["results"]
    assert [r["product_id"] for r in high] == ["Dairy/Milk/p02"]
    ungrouped = search(client, jpeg(2), "k=3&group_by_product=false")["results"]
    assert len(ungrouped) == 3


def test_more_like_this_excludes_the_product(client: TestClient) -> None:
    body = search(client, product_id="Bakery/p04", params="k=5")
    assert len(body["results"]) == 5 and "Bakery/p04" not in [r["product_id"] for r in body["results"]]
    json_body = client.post("/v1/search", json={"product_id": "Bakery/p04", "k": 2}).json()
    assert len(json_body["results"]) == 2
    error(client.post("/v1/search", data={"product_id": "nope"}), 404, "not_found")


def test_crop_searches_a_region(client: TestClient) -> None:
    whole = Image.new("RGB", (200, 100), "white")
    whole.paste(Image.open(__import__("io").BytesIO(jpeg(7))).resize((100, 100)), (100, 0))
    cropped = search(client, png(whole), "k=1&crop=0.5,0,0.5,1")["results"][0]
    assert cropped["product_id"] == "Dairy/Milk/p07"
    uncropped = search(client, png(whole), "k=25")["results"]
    assert cropped["score"] > next(r["score"] for r in uncropped if r["product_id"] == "Dairy/Milk/p07")
    error(client.post("/v1/search?crop=0.5,0,0.7,1", files={"image": ("q.png", png(whole))}), 422, "invalid_parameter")
    error(client.post("/v1/search?crop=a,b", files={"image": ("q.png", png(whole))}), 422, "invalid_parameter")


def test_bad_parameters_name_the_field(client: TestClient) -> None:
    message = error(client.post("/v1/search?k=0", files={"image": ("q.jpg", jpeg(1))}), 422, "invalid_parameter")
    assert message.startswith("k:")
    assert error(client.post("/v1/search?k=101", data={"product_id": "Bakery/p04"}), 422, "invalid_parameter").startswith("k:")
    error(
        client.post("/v1/search", data={"product_id": "Bakery/p04", "image_url": "http://a.test/x.jpg"}), 422, "invalid_parameter"
    )
    error(client.post("/v1/search", data={}), 422, "invalid_parameter")
    error(client.post("/v1/search?category=Nope", data={"product_id": "Bakery/p04"}), 422, "unknown_category")


def test_text_without_a_text_tower_is_a_keyword_search(client: TestClient) -> None:
    # the folder catalog's products have titles (their file names) and no text attributes
    assert search(client, text="p04 p07 nothing")["results"][0]["product_id"] in {"Bakery/p04", "Dairy/Milk/p07"}
    assert error(client.post("/v1/search", data={"text": "?!"}), 422, "invalid_parameter").endswith("(letters or digits)")


def test_bad_uploads(client: TestClient) -> None:
    error(client.post("/v1/search", files={"image": ("x.jpg", b"hello, not an image")}), 415, "unsupported_image")
    error(client.post("/v1/search", files={"image": ("x.jpg", jpeg(1)[:400])}), 400, "invalid_image")
    assert error(client.post("/v1/search", files={"image": ("x.jpg", b"")}), 400, "invalid_image").endswith("empty file")
    bomb = png(Image.new("1", (4000, 4000)))  # 16 Mpx in a few kB: refused before decoding
    assert len(bomb) < 300_000
    error(client.post("/v1/search", files={"image": ("bomb.png", bomb)}), 413, "too_large")
    huge = b"\xff\xd8" + b"0" * 700_000
    error(client.post("/v1/search", files={"image": ("big.jpg", huge)}), 413, "too_large")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jpg",
        "http://localhost/x.jpg",
        "http://10.0.0.7/x.jpg",
        "http://192.168.1.1/x.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "file:///etc/passwd",
        "ftp://example.com/x.jpg",
    ],
)
def test_image_url_refuses_internal_addresses(client: TestClient, url: str) -> None:
    error(client.post("/v1/search", data={"image_url": url}), 400, "url_blocked")


def test_image_url_allowed_network_redirect_and_size_cap(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    real = socket.getaddrinfo

    def fake_dns(host: str, *args: object, **kw: object) -> list:  # type: ignore[type-arg]
        if host == "internal.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", 80))]
        return real(host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    routes = {
        "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg(3)),
        "/hop": (302, {"Location": "http://internal.test/secret"}, b""),
        "/big.jpg": (200, {}, b"0" * 400_000),
    }
    with http_server(routes) as base, client_for(index_dir, allowed_url_networks=("127.0.0.0/8",)) as c:
        ok = c.post("/v1/search?k=1", data={"image_url": f"{base}/ok.jpg"})
        assert ok.status_code == 200 and ok.json()["results"][0]["product_id"] == "Dairy/Yoghurt/p03"
        message = error(c.post("/v1/search", data={"image_url": f"{base}/hop"}), 400, "url_blocked")
        assert "10.9.8.7" in message
        error(c.post("/v1/search", data={"image_url": "http://internal.test/x.jpg"}), 400, "url_blocked")
        error(c.post("/v1/search", data={"image_url": f"{base}/big.jpg"}), 413, "too_large")
        error(c.post("/v1/search", data={"image_url": f"{base}/missing"}), 400, "fetch_failed")


def test_batch(client: TestClient) -> None:
    body = {"queries": [{"product_id": "Bakery/p04", "k": 2}, {"product_id": "nope"}, {"text": "?"}]}
    results = client.post("/v1/search/batch", json=body).json()["results"]
    assert len(results[0]["result"]["results"]) == 2
    assert results[1]["error"]["code"] == "not_found"
    assert results[2]["error"]["code"] == "invalid_parameter"
    error(client.post("/v1/search/batch", json={"queries": []}), 422, "invalid_parameter")


def raw_vector(client: TestClient, seed: int) -> list[float]:
    """A photo's raw embedding from the served model, as an integrator would send it."""
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    return [float(v) for v in engine.embed_queries([Image.open(io.BytesIO(jpeg(seed)))])[0]]


def test_vector_query(client: TestClient) -> None:
    vector = raw_vector(client, 2)
    top = client.post("/v1/search", json={"vector": vector, "k": 3}).json()["results"]
    assert top[0]["product_id"] == "Dairy/Milk/p02"
    uploaded = search(client, jpeg(2), "k=3")["results"]  # the same photo's upload: the same vector, the same answer
    assert [r["product_id"] for r in top] == [r["product_id"] for r in uploaded]
    assert [r["score"] for r in top] == pytest.approx([r["score"] for r in uploaded], abs=1e-5)
    scaled = client.post("/v1/search?k=3", json={"vector": [v * 7 for v in vector]}).json()["results"]
    assert [r["product_id"] for r in scaled] == [r["product_id"] for r in top]  # normalised by the server
    as_form = search(client, vector=json.dumps(vector), params="k=1")["results"]  # a form field: the list's JSON text
    assert as_form[0]["product_id"] == "Dairy/Milk/p02"
    assert "3 numbers" in error(client.post("/v1/search", json={"vector": [0.1, 0.2, 0.3]}), 422, "invalid_parameter")
    assert error(client.post("/v1/search", json={"vector": [0.1, "x"]}), 422, "invalid_parameter").startswith("vector.1:")
    error(client.post("/v1/search", json={"vector": "nope"}), 422, "invalid_parameter")
    error(client.post("/v1/search", data={"vector": "[0.1, 0.2"}), 422, "invalid_parameter")
    assert "not all zero" in error(client.post("/v1/search", json={"vector": [0, 0]}), 422, "invalid_parameter")
    error(client.post("/v1/search", json={"vector": []}), 422, "invalid_parameter")


def test_exactly_one_query_kind(client: TestClient) -> None:
    kinds = "give exactly one of image, image_base64, image_url, product_id, text or vector"
    kinds += " (text may also go beside one of the others)"
    two = client.post("/v1/search", data={"product_id": "Bakery/p04", "vector": "[1]", "text": "x"})
    assert error(two, 422, "invalid_parameter") == f"{kinds} (got product_id, text, vector)"
    files = {"image": ("q.jpg", jpeg(1))}
    upload_and_id = error(client.post("/v1/search", data={"product_id": "Bakery/p04"}, files=files), 422, "invalid_parameter")
    assert upload_and_id == f"{kinds} (got image, product_id)"
    json_two = client.post("/v1/search", json={"vector": [1.0], "image_url": "http://example.com/a.jpg"})
    assert error(json_two, 422, "invalid_parameter") == f"{kinds} (got image_url, vector)"
    assert error(client.post("/v1/search", json={"k": 3}), 422, "invalid_parameter") == kinds
    assert error(client.post("/v1/search", json={"text": "", "product_id": ""}), 422, "invalid_parameter") == kinds
    assert error(client.post("/v1/search", json={"image": "abc"}), 422, "invalid_parameter").startswith("image:")
    assert "base64" in error(client.post("/v1/search", json={"image_base64": "!!"}), 422, "invalid_parameter")
    error(client.post("/v1/search", json=["product_id"]), 422, "invalid_parameter")
    body = client.post("/v1/search?k=2", json={"image_base64": base64.b64encode(jpeg(4)).decode()}).json()
    assert body["results"][0]["product_id"] == "Bakery/p04" and body["k"] == 2


def test_batch_mixes_kinds_and_answers_each(client: TestClient) -> None:
    queries = [
        {"image_base64": base64.b64encode(jpeg(3)).decode(), "k": 1},
        {"product_id": "Bakery/p04", "k": 2},
        {"vector": raw_vector(client, 5), "k": 1},
        {"image_url": "http://127.0.0.1:9/x.jpg"},
        {"product_id": "nope"},
        {"image_base64": base64.b64encode(b"not an image").decode()},
    ]
    results = client.post("/v1/search/batch", json={"queries": queries}).json()["results"]
    assert results[0]["result"]["results"][0]["product_id"] == "Dairy/Yoghurt/p03" and results[0]["error"] is None
    assert len(results[1]["result"]["results"]) == 2 and results[1]["result"]["k"] == 2
    assert results[2]["result"]["results"][0]["product_id"].endswith("/p05")
    assert results[3]["error"] == {"code": "url_blocked", "message": results[3]["error"]["message"], "status": "400"}
    assert results[4]["error"]["code"] == "not_found" and results[4]["error"]["status"] == "404"
    assert results[5]["error"]["code"] == "unsupported_image" and results[5]["result"] is None
    # a malformed query is a malformed request: 422, naming the query
    bad_kinds = {"queries": [{"product_id": "Bakery/p04"}, {"product_id": "Bakery/p04", "image_url": "http://a.test/x.jpg"}]}
    message = error(client.post("/v1/search/batch", json=bad_kinds), 422, "invalid_parameter")
    assert message.startswith("queries.1: give exactly one of") and message.endswith("(got image_url, product_id)")
    bad_k = {"queries": [{"product_id": "Bakery/p04", "k": 0}]}
    assert error(client.post("/v1/search/batch", json=bad_k), 422, "invalid_parameter").startswith("queries.0.k:")


def test_batch_embeds_its_images_in_one_forward(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    forwards: list[int] = []
    real = Engine.embed_queries

    def counting(self: Engine, images: list[Image.Image], snapshot: object = None) -> object:
        forwards.append(len(images))
        return real(self, images, snapshot)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "embed_queries", counting)
    images = [{"image_base64": base64.b64encode(jpeg(seed)).decode(), "k": 1} for seed in (1, 6, 8)]
    queries = [
        *images,
        {"product_id": "Bakery/p04", "k": 1},
        {"image_base64": base64.b64encode(jpeg(9)).decode(), "crop": "0,0,1,1"},
    ]
    results = client.post("/v1/search/batch", json={"queries": queries}).json()["results"]
    assert forwards == [4]
    tops = [r["result"]["results"][0]["product_id"].rsplit("/", 1)[-1] for r in results]
    assert tops[:3] + tops[4:] == ["p01", "p06", "p08", "p09"]


def test_product_reads_categories_and_images(client: TestClient) -> None:
    product = client.get("/v1/products/Fruit/Apple/p00").json()
    assert product["category"] == "Fruit/Apple" and len(product["images"]) == 1
    error(client.get("/v1/products/none"), 404, "not_found")
    tree = client.get("/v1/categories").json()
    fruit = next(n for n in tree if n["name"] == "Fruit")
    assert fruit["products"] == 10 and {c["path"] for c in fruit["children"]} == {"Fruit/Apple", "Fruit/Banana"}
    image_id = product["images"][0]["id"]
    assert client.get(f"/v1/images/{image_id}").content[:2] == b"\xff\xd8"
    thumb = client.get(f"/v1/images/{image_id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg" and "max-age" in thumb.headers["cache-control"]
    error(client.get("/v1/images/999999"), 404, "not_found")


def test_write_key_rules(index_dir: Path, client: TestClient) -> None:
    files = {"image": ("n.jpg", jpeg(500))}
    error(client.post("/v1/products", data={"id": "new"}, files=files), 401, "unauthorized")
    error(client.post("/v1/products", data={"id": "new"}, files=files, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    error(client.delete("/v1/products/Bakery/p04"), 401, "unauthorized")
    with client_for(index_dir, api_key=None) as open_client:
        message = error(open_client.delete("/v1/products/Bakery/p04", headers=KEY), 403, "forbidden")
        assert "VSEARCH_API_KEY" in message


def test_read_key_rules(index_dir: Path) -> None:
    with client_for(index_dir, read_key="read-key") as c:
        error(c.post("/v1/search", data={"product_id": "Bakery/p04"}), 401, "unauthorized")
        ok = c.post("/v1/search", data={"product_id": "Bakery/p04"}, headers={"X-API-Key": "read-key"})
        assert ok.status_code == 200
        assert c.get("/v1/categories", headers=KEY).status_code == 200  # the write key reads too
        image_id = ok.json()["results"][0]["image_id"]
        assert c.get(f"/v1/images/{image_id}/thumbnail?key=read-key").status_code == 200
        assert c.get("/healthz").status_code == 200


def test_product_lifecycle(index_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    with client_for(copy) as c:
        created = c.post(
            "/v1/products",
            data={"id": "sku-9", "title": "Blue mug", "category": "Kitchen/Mugs", "attributes": '{"price": 4}'},
            files=[("image", ("a.jpg", jpeg(900))), ("image", ("b.jpg", jpeg(901)))],
            headers=KEY,
        )
        assert created.status_code == 201, created.text
        assert created.json()["attributes"] == {"price": 4} and len(created.json()["images"]) == 2
        assert search(c, jpeg(900), "k=1")["results"][0]["product_id"] == "sku-9"
        error(c.post("/v1/products", data={"id": "sku-9"}, files={"image": ("a.jpg", jpeg(1))}, headers=KEY), 409, "conflict")
        error(c.post("/v1/products", json={"id": "sku-10"}, headers=KEY), 422, "invalid_parameter")
        updated = c.put("/v1/products/sku-9", json={"title": "Red mug", "category": "Kitchen/Mugs"}, headers=KEY)
        assert updated.status_code == 200 and updated.json()["title"] == "Red mug" and len(updated.json()["images"]) == 2
        error(c.put("/v1/products/none", json={"title": "x"}, headers=KEY), 404, "not_found")
        error(c.post("/v1/products", json={"id": "u", "image_urls": ["http://10.0.0.1/a.jpg"]}, headers=KEY), 400, "url_blocked")
        assert c.delete("/v1/products/sku-9", headers=KEY).status_code == 204
        error(c.get("/v1/products/sku-9"), 404, "not_found")
        assert "sku-9" not in [r["product_id"] for r in search(c, jpeg(900), "k=30")["results"]]
        error(c.delete("/v1/products/sku-9", headers=KEY), 404, "not_found")


def test_overload_answers_429(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]

    def full(*args: object) -> object:
        raise Overloaded("too many requests waiting for the model; retry shortly")

    monkeypatch.setattr(service, "embed", full)
    response = client.post("/v1/search", files={"image": ("q.jpg", jpeg(1))})
    error(response, 429, "overloaded")
    assert response.headers["retry-after"] == "1"


def test_metrics(client: TestClient) -> None:
    search(client, jpeg(1))
    text = client.get("/metrics").text
    assert 'vsearch_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert "vsearch_request_seconds_bucket" in text
    assert "vsearch_index_vectors 25.0" in text
    assert "vsearch_embed_batch_size_count" in text


def test_searches_never_see_half_a_write(index_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    with client_for(copy) as c:
        engine = c.app.state.service.engine  # type: ignore[attr-defined]
        raw = engine.embed_queries([Image.open(__import__("io").BytesIO(jpeg(700)))])
        seen: list[int] = []
        stop = threading.Event()

        def searcher() -> None:
            from vsearch.query import SearchOptions

            while not stop.is_set():
                hits = engine.search_vectors(raw, SearchOptions(k=100, group_by_product=False))[0]
                seen.append(sum(h.product_id == "pair" for h in hits))

        threads = [threading.Thread(target=searcher) for _ in range(2)]
        for t in threads:
            t.start()
        for _ in range(6):
            engine.put_product("pair", title="pair", images=[jpeg(700), jpeg(701)])
            engine.delete_product("pair")
        stop.set()
        for t in threads:
            t.join()
        assert seen and set(seen) <= {0, 2}, f"a search saw {set(seen)} images of a two-image product"


def test_text_search_with_an_open_clip_model(tmp_path: Path, catalog_folder: Path) -> None:
    from vsearch import Engine

    index = tmp_path / "clip"
    with Engine.open(index, model="tiny-clip:random", create=True) as engine:
        engine.ingest(catalog_folder, quiet=True, workers=0)
        assert engine.info()["text_search"] is True
    with client_for(index) as c:
        body = c.post("/v1/search?k=3", json={"text": "a red apple"}).json()
        assert len(body["results"]) == 3 and body["timing_ms"]["embed"] > 0


def test_micro_batched_server_answers_concurrent_searches(index_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with client_for(index_dir, batch_max=8, batch_wait_ms=30.0) as c:
        assert c.app.state.service.batch_max == 8  # type: ignore[attr-defined]
        with ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(lambda seed: search(c, jpeg(seed), "k=1"), range(6)))
        assert [b["results"][0]["product_id"].rsplit("/", 1)[-1] for b in bodies] == [f"p{n:02d}" for n in range(6)]
        error(c.post("/v1/search", data={"text": "?"}), 422, "invalid_parameter")  # answered without the model
        assert "vsearch_embed_batch_size_bucket" in c.get("/metrics").text
