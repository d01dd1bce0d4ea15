"""Shared pieces of the API and browser tests: a small index and a loopback web server."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from vsearch import Engine

from .conftest import make_image, write_catalog


def build_small_index(root: Path) -> Path:
    """25 products in 5 categories, tiny random-weight model."""
    catalog = write_catalog(root / "catalog")
    index = root / "index"
    with Engine.open(index, model="tiny-test", create=True) as engine:
        engine.ingest(catalog, quiet=True, workers=0)
    return index


def jpeg(seed: int, size: tuple[int, int] = (96, 80), quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def http_server(routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Iterator[str]:
    """A loopback HTTP server answering ``path -> (status, headers, body)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            status, headers, body = routes.get(self.path, (404, {}, b"missing"))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
