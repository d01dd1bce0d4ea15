"""The HTTP API (FastAPI): :func:`create_app` and what wraps every request.

The endpoints are in :mod:`vsearch.routes`, request parsing in :mod:`vsearch.bodies`,
the shapes in :mod:`vsearch.schemas`, and which failure gets which status in
:mod:`vsearch.statuses`: errors are always ``{"error": {"code": ..., "message": ...}}``.
Nothing is loaded at import time: the app's lifespan opens the index and the model.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ServeConfig
from .engine import Engine
from .limits import one_malloc_arena, serving_limits
from .metrics import Metrics
from .routes import add_routes, document_search
from .service import SearchService
from .settings import serve_config
from .statuses import DOCUMENTED, error_response, install_error_handlers
from .version import __version__

__all__ = ["create_app"]

WEB_DIR = Path(__file__).resolve().parents[1] / "web"


def create_app(config: ServeConfig | None = None) -> FastAPI:
    config = config or serve_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        one_malloc_arena()  # before the worker threads first allocate
        with serving_limits(config.decode_budget_mb, config.decode_wait_s, config.url_fetch_max, url_wait_s=0.0):
            async with _serving(app, config):
                yield

    app = FastAPI(
        title="vsearch",
        version=__version__,
        summary="Visual similarity search for product catalogs",
        lifespan=lifespan,
        responses=DOCUMENTED,
    )
    app.state.config, app.state.ready = config, False
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.middleware("http")(_observe)
    add_routes(app)
    _document(app)
    web = Path(config.web_dir) if config.web_dir else WEB_DIR
    if web.is_dir():
        app.mount("/", StaticFiles(directory=web, html=True), name="web")
    return app


@asynccontextmanager
async def _serving(app: FastAPI, config: ServeConfig) -> AsyncIterator[None]:
    """Open the index, load the model and answer one search; close them at the end."""
    cache_bytes = int(config.block_cache_mb * 1024 * 1024)
    engine = await run_in_threadpool(partial(Engine.open, config.index_dir, block_cache_bytes=cache_bytes))
    metrics = Metrics(lambda: float(engine.index.ntotal) if engine.index is not None else 0.0)
    service = SearchService(engine, config, on_batch=metrics.embed_batch.observe)
    app.state.metrics, app.state.service = metrics, service
    try:
        await run_in_threadpool(service.warm_up)
        service.watch_index()
        app.state.ready = True
        yield
    finally:
        app.state.ready = False
        service.close()
        await run_in_threadpool(engine.close)


def _document(app: FastAPI) -> None:
    """FastAPI's OpenAPI document, completed by :func:`vsearch.routes.document_search`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_search(generate())  # generate() keeps its result in app.openapi_schema
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


class BodyLimit:
    """413 for request bodies over the limit, before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.limit = max_bytes + 256 * 1024  # room for multipart headers and form fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(413, "too_large", f"request body over {self.limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await error_response(413, "too_large", f"request body over {self.limit} bytes")(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# The shopper page loads only its own files; images may come from catalog URLs (the
# API redirects to them) and from the shopper's own file (blob:). /docs is left out:
# FastAPI's Swagger UI loads its script from a CDN.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if not request.url.path.startswith(("/docs", "/redoc")):
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        response.headers.setdefault("X-Frame-Options", "DENY")
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    route = getattr(request.scope.get("route"), "path", None)
    if metrics is not None and route is not None:
        metrics.observe(route, request.method, response.status_code, time.perf_counter() - start)
    return response
