"""Hostile requests (issue 9's findings): each answers a JSON 4xx, never a 500, and
never reads the server's own files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vsearch.api import create_app
from vsearch.config import ServeConfig

from .api_helpers import build_small_index, jpeg

KEY = {"Authorization": "Bearer write-key"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    index = build_small_index(tmp_path_factory.mktemp("hostile"))
    config = ServeConfig(index_dir=str(index), api_key="write-key", max_upload_bytes=300_000, max_pixels=4_000_000)
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        yield c


def _error(response: object, status: int) -> str:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    return response.json()["error"]["code"]  # type: ignore[attr-defined]


def test_the_write_api_never_reads_a_local_file(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "server-only.jpg"
    secret.write_bytes(jpeg(7))
    for body in ({"id": "leak", "image_urls": [str(secret)]}, {"id": "leak", "image_urls": [f"file://{secret}"]}):
        assert _error(client.post("/v1/products", json=body, headers=KEY), 422) == "invalid_parameter"
    form = client.post("/v1/products", data={"id": "leak", "image_url": str(secret)}, headers=KEY)
    assert _error(form, 422) == "invalid_parameter"
    assert client.get("/v1/products/leak").status_code == 404


def test_keys_with_non_ascii_characters_are_refused_not_crashed_on(client: TestClient) -> None:
    headers = {"Authorization": "Bearer clé".encode("latin-1")}
    response = client.post("/v1/products", json={"id": "x", "image_urls": []}, headers=headers)  # type: ignore[arg-type]
    assert _error(response, 401) == "unauthorized"


def test_a_write_key_in_the_url_is_not_accepted(client: TestClient) -> None:
    response = client.delete("/v1/products/Bakery/p04?key=write-key")
    assert _error(response, 401) == "unauthorized"
    assert client.get("/v1/products/Bakery/p04").status_code == 200


@pytest.mark.parametrize("image_id", ["40635970100036815028224", "-1", "9223372036854775808"])
def test_image_ids_past_64_bits_are_not_found(client: TestClient, image_id: str) -> None:
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumbnail"):
        assert client.get(path).status_code in (404, 422)


@pytest.mark.parametrize("crop", ["nan,0,0.5,0.5", "0,0,inf,0.5", "0,0,0.5,-inf"])
def test_crops_must_be_finite(client: TestClient, crop: str) -> None:
    response = client.post(f"/v1/search?crop={crop}", files={"image": ("a.jpg", jpeg(1), "image/jpeg")})
    assert _error(response, 422) == "invalid_parameter"


@pytest.mark.parametrize(
    "body",
    [
        b'{"product_id": "x\\ud800"}',  # a lone surrogate: not text SQLite can store
        b'{"product_id": "\xff\xfe"}',  # not UTF-8
        b"[" * 5000 + b"]" * 5000,  # nested past Python's recursion limit
        b"null",
    ],
)
def test_malformed_json_searches_are_422(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
    assert _error(response, 422) == "invalid_parameter"


def test_a_title_that_is_not_unicode_is_refused_before_anything_is_stored(client: TestClient) -> None:
    before = client.get("/v1/products/Bakery/p04").json()
    body = b'{"title": "x\\udc00", "category": "Bakery"}'
    response = client.put("/v1/products/Bakery/p04", content=body, headers={**KEY, "Content-Type": "application/json"})
    assert _error(response, 422) == "invalid_parameter"
    assert client.get("/v1/products/Bakery/p04").json() == before


def test_an_image_whose_file_was_deleted_is_not_found(client: TestClient) -> None:
    product = client.get("/v1/products/Fruit/Apple/p00").json()
    image = product["images"][0]
    Path(image["source"]).unlink()
    for path in (image["image_url"], image["thumbnail_url"]):
        assert _error(client.get(path), 404) == "not_found"


def test_concurrent_creates_of_one_id_give_one_201_and_the_rest_409(client: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(n: int) -> int:
        files = {"image": ("a.jpg", jpeg(500 + n), "image/jpeg")}
        return client.post("/v1/products", data={"id": "raced", "title": f"t{n}"}, files=files, headers=KEY).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(create, range(8)))
    assert statuses == [201] + [409] * 7
    assert len(client.get("/v1/products/raced").json()["images"]) == 1
    assert client.put("/v1/products/never-made", json={"title": "x"}, headers=KEY).status_code == 404


def test_the_page_and_the_api_send_security_headers(client: TestClient) -> None:
    for path in ("/", "/app.js", "/v1/categories", "/healthz"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI loads from a CDN


def test_one_image_sent_twice_is_stored_and_indexed_once(client: TestClient) -> None:
    photo = jpeg(901)
    files = [("image", ("a.jpg", photo, "image/jpeg")), ("image", ("b.jpg", photo, "image/jpeg"))]
    assert client.post("/v1/products", data={"id": "twice"}, files=files, headers=KEY).status_code == 201
    assert len(client.get("/v1/products/twice").json()["images"]) == 1
    info = client.get("/v1/info").json()
    assert info["vectors"] == info["images"]
    hits = client.post("/v1/search?k=50&group_by_product=false", files={"image": ("q.jpg", photo, "image/jpeg")}).json()
    assert [h["product_id"] for h in hits["results"]].count("twice") == 1


def test_a_write_with_one_bad_image_stores_none_of_them(client: TestClient) -> None:
    stored = client.app.state.service.engine.image_store.folder  # type: ignore[attr-defined]
    before = sorted(stored.iterdir()) if stored.is_dir() else []
    files = [("image", ("good.jpg", jpeg(902), "image/jpeg")), ("image", ("bad.jpg", b"not an image at all", "image/jpeg"))]
    response = client.post("/v1/products", data={"id": "half"}, files=files, headers=KEY)
    assert response.status_code == 415
    assert (sorted(stored.iterdir()) if stored.is_dir() else []) == before
    assert client.get("/v1/products/half").status_code == 404


@pytest.mark.parametrize(
    "address", ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2002:a00:1::1", "::ffff:10.0.0.1"]
)
def test_ipv6_forms_of_internal_ipv4_addresses_are_blocked(address: str) -> None:
    from vsearch.fetch import FetchPolicy, UrlBlockedError, check_address

    with pytest.raises(UrlBlockedError):
        check_address(address, FetchPolicy())
    check_address("64:ff9b::808:808", FetchPolicy())  # 8.8.8.8 through NAT64 is public


def test_manifests_that_are_not_utf8_or_have_null_ids_are_one_line(tmp_path: Path) -> None:
    from vsearch.errors import ManifestError
    from vsearch.sources import read_manifest

    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,image,title\nsku1,a.jpg,Crème brûlée\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin.csv: not UTF-8 text .*save it as UTF-8"):
        read_manifest(latin)
    jsonl = tmp_path / "null.jsonl"
    jsonl.write_text('{"id": null, "image": "a.jpg"}\n')
    with pytest.raises(ManifestError, match=r"null.jsonl:1: id must be a string, not null"):
        read_manifest(jsonl)


@pytest.mark.parametrize("resize", ["pad", "crop"])
def test_extreme_aspect_ratios_cost_no_more_than_an_ordinary_photo(resize: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20000x1 image once padded to a 400 M-pixel canvas (a 60000x1 PNG of 140 bytes
    OOM-killed the server); every intermediate image must stay within the canvas bound."""
    from PIL import Image

    from vsearch import embed
    from vsearch.presets import resolve_model

    largest = 0
    real_new, real_resize = Image.new, Image.Image.resize

    def new(mode: str, size: tuple[int, int], *args: object) -> Image.Image:
        nonlocal largest
        largest = max(largest, size[0] * size[1])
        return real_new(mode, size, *args)  # type: ignore[arg-type]

    def resized(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        nonlocal largest
        largest = max(largest, size[0] * size[1])
        return real_resize(self, size, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(embed.Image, "new", new)
    monkeypatch.setattr(embed.Image.Image, "resize", resized)
    preprocess = embed.Preprocess(resolve_model("tiny-test", resize=resize))
    for size in ((20000, 1), (1, 20000), (20000, 3)):
        tensor = preprocess(real_new("RGB", size, "red"))
        assert tuple(tensor.shape) == (3, preprocess.size, preprocess.size)
    assert largest <= embed.MAX_CANVAS_SIDE**2


def test_a_url_that_drips_its_body_is_cut_off_at_the_total_deadline() -> None:
    """A byte every 0.2 s never trips a per-read timeout; the fetch as a whole must end."""
    import http.server
    import threading
    import time

    from vsearch.fetch import FetchError, FetchPolicy, fetch_url

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchError, match="longer than 1 s|timed out"):
            fetch_url(f"http://127.0.0.1:{server.server_address[1]}/slow.jpg", FetchPolicy(allow_private=True, timeout_s=1.0))
    finally:
        server.shutdown()
        server.server_close()
