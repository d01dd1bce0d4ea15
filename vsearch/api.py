"""The HTTP API (FastAPI): parse, call the engine or the search service, format.

Errors are always ``{"error": {"code": ..., "message": ...}}`` with a fitting status.
Nothing is loaded at import time: :func:`create_app` builds an app whose lifespan
opens the index and the model.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi import Query as Q
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .batcher import Overloaded
from .config import ServeConfig
from .engine import Engine, ProductView
from .errors import (
    ConfigError,
    ConflictError,
    FilterError,
    ImageError,
    ImageTooLargeError,
    IndexNotFoundError,
    ModelError,
    ProductNotFoundError,
    UnsupportedImageError,
    VsearchError,
)
from .fetch import FetchError, TooLargeError, UrlBlockedError
from .images import is_url
from .metrics import CONTENT_TYPE, Metrics
from .query import SearchOptions
from .schemas import BatchIn, BatchItemOut, BatchOut, CategoryNode, ProductIn, ProductOut, SearchIn, SearchOut
from .service import Query, SearchResult, SearchService, parse_crop
from .settings import serve_config

__all__ = ["create_app"]

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

# most specific first: the first matching class decides status and code
ERRORS: list[tuple[type[Exception], int, str]] = [
    (Overloaded, 429, "overloaded"),
    (ImageTooLargeError, 413, "too_large"),
    (TooLargeError, 413, "too_large"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (ImageError, 400, "invalid_image"),
    (UrlBlockedError, 400, "url_blocked"),
    (FetchError, 400, "fetch_failed"),
    (ProductNotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (FilterError, 422, "unknown_category"),
    (ConfigError, 422, "invalid_parameter"),
    (ModelError, 400, "unsupported_query"),
    (IndexNotFoundError, 503, "no_index"),
    (VsearchError, 400, "bad_request"),
]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(config: ServeConfig | None = None) -> FastAPI:
    config = config or serve_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await run_in_threadpool(Engine.open, config.index_dir)
        metrics = Metrics(lambda: float(engine.index.ntotal) if engine.index is not None else 0.0)
        service = SearchService(engine, config, on_batch=metrics.embed_batch.observe)
        app.state.metrics, app.state.service = metrics, service
        await run_in_threadpool(service.warm_up)
        service.watch_index()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            service.close()
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="vsearch",
        version=__version__,
        summary="Visual similarity search for product catalogs",
        lifespan=lifespan,
        responses={422: {"description": "Invalid parameter"}},
    )
    app.state.config, app.state.ready = config, False
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.middleware("http")(_observe)
    _routes(app, config)
    web = Path(config.web_dir) if config.web_dir else WEB_DIR
    if web.is_dir():
        app.mount("/", StaticFiles(directory=web, html=True), name="web")
    return app


# ---------------------------------------------------------------------------- plumbing
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


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    route = getattr(request.scope.get("route"), "path", None)
    if metrics is not None and route is not None:
        metrics.observe(route, request.method, response.status_code, time.perf_counter() - start)
    return response


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VsearchError)
    async def vsearch_error(request: Request, exc: VsearchError) -> JSONResponse:
        for kind, status, code in ERRORS:
            if isinstance(exc, kind):
                headers = {"Retry-After": "1"} if status == 429 else None
                return error_response(status, code, str(exc), headers)
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
        return error_response(422, "invalid_parameter", f"{field}: {first.get('msg')}" if field else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers)


# ---------------------------------------------------------------------------- dependencies
def get_service(request: Request) -> SearchService:
    service: SearchService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise StarletteHTTPException(503, "the index is still loading")
    return service


def _given_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.query_params.get("key")


def _key_ok(given: str | None, *keys: str | None) -> bool:
    return given is not None and any(k is not None and hmac.compare_digest(given, k) for k in keys)


def require_write(request: Request) -> None:
    config: ServeConfig = request.app.state.config
    if not config.api_key:
        raise StarletteHTTPException(403, "writes are disabled: configure an API key (VSEARCH_API_KEY)")
    if not _key_ok(_given_key(request), config.api_key):
        raise StarletteHTTPException(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")


def require_read(request: Request) -> None:
    config: ServeConfig = request.app.state.config
    if config.read_key and not _key_ok(_given_key(request), config.read_key, config.api_key):
        raise StarletteHTTPException(401, "a valid read key is required (Authorization: Bearer KEY or X-API-Key)")


Service = Annotated[SearchService, Depends(get_service)]
Read = Depends(require_read)
Write = Depends(require_write)


# ---------------------------------------------------------------------------- formatting
def search_out(result: SearchResult, options: SearchOptions) -> SearchOut:
    return SearchOut.model_validate(
        {
            "results": [
                {
                    **{k: getattr(h, k) for k in ("product_id", "title", "category", "image_id", "attributes")},
                    "score": round(h.score, 6),
                    "image_url": f"/v1/images/{h.image_id}",
                    "thumbnail_url": f"/v1/images/{h.image_id}/thumbnail",
                }
                for h in result.hits
            ],
            "suggested_categories": [{"category": c, "share": s} for c, s in result.suggested_categories],
            "timing_ms": result.timing_ms,
            "k": options.k,
            "offset": options.offset,
        }
    )


def product_out(view: ProductView) -> ProductOut:
    p = view.product
    images = [
        {
            "id": i.id,
            "source": i.source,
            "width": i.width,
            "height": i.height,
            "sha256": i.sha256,
            "image_url": f"/v1/images/{i.id}",
            "thumbnail_url": f"/v1/images/{i.id}/thumbnail",
        }
        for i in view.images
    ]
    return ProductOut.model_validate({**p.__dict__, "images": images})


def _options(body: SearchIn) -> SearchOptions:
    return SearchOptions(
        k=body.k,
        offset=body.offset,
        categories=tuple(body.category),
        exclude_categories=tuple(body.exclude_category),
        min_score=body.min_score,
        group_by_product=body.group_by_product,
    )


def _query(body: SearchIn, upload: bytes | None = None) -> Query:
    image = upload
    if body.image_base64:
        try:
            image = base64.b64decode(body.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("image_base64 is not valid base64") from None
    return Query(image=image, image_url=body.image_url, product_id=body.product_id, text=body.text, crop=parse_crop(body.crop))


async def _search_in(request: Request) -> tuple[SearchIn, bytes | None]:
    """The query from a multipart/urlencoded form or a JSON body, options from the URL too."""
    params: dict[str, Any] = {}
    for key in ("category", "exclude_category"):
        if key in request.query_params:
            params[key] = request.query_params.getlist(key)
    params.update({k: v for k, v in request.query_params.items() if k not in ("category", "exclude_category", "key")})
    upload = None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            params.update(await request.json())
        except json.JSONDecodeError:
            raise ConfigError("the JSON body is not valid JSON") from None
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=1, max_fields=50)
        for key in ("category", "exclude_category"):
            if form.getlist(key):
                params[key] = [str(v) for v in form.getlist(key)]
        for key, value in form.items():
            if isinstance(value, UploadFile):
                if key == "image":
                    upload = await value.read()
            elif key not in ("category", "exclude_category"):
                params[key] = value
    try:
        return SearchIn.model_validate(params), upload
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _product_in(request: Request, product_id: str | None) -> tuple[ProductIn, list[bytes]]:
    content_type = request.headers.get("content-type", "")
    uploads: list[bytes] = []
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=20, max_fields=50)
        data: dict[str, Any] = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        data["image_urls"] = [str(v) for v in form.getlist("image_url")]
        data.pop("image_url", None)
        if "attributes" in data:
            try:
                data["attributes"] = json.loads(str(data["attributes"]))
            except json.JSONDecodeError:
                raise ConfigError("attributes must be a JSON object") from None
        for value in form.getlist("image"):
            if isinstance(value, UploadFile):
                uploads.append(await value.read())
    else:
        try:
            data = await request.json()
        except json.JSONDecodeError:
            raise ConfigError("send multipart/form-data or a JSON body") from None
    if product_id is not None:
        data = {**data, "id": product_id}
    try:
        return ProductIn.model_validate(data), uploads
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _search_body() -> dict[str, Any]:
    fields = {
        "image": {"type": "string", "format": "binary"},
        "image_url": {"type": "string"},
        "product_id": {"type": "string"},
        "text": {"type": "string"},
        "crop": {"type": "string", "example": "0.1,0.1,0.5,0.6"},
    }
    return {
        "requestBody": {
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
                "application/json": {"schema": SearchIn.model_json_schema()},
            }
        }
    }


# ---------------------------------------------------------------------------- routes
def _routes(app: FastAPI, config: ServeConfig) -> None:
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> JSONResponse:
        if not request.app.state.ready:
            return error_response(503, "not_ready", "the index or the model is still loading")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"])
    def metrics(request: Request) -> Response:
        registry: Metrics | None = getattr(request.app.state, "metrics", None)
        return Response(registry.render() if registry else b"", media_type=CONTENT_TYPE)

    @app.post(
        "/v1/search",
        response_model=SearchOut,
        tags=["search"],
        dependencies=[Read],
        openapi_extra=_search_body(),
        summary="Find products similar to one photo, URL, product or text",
    )
    async def search(
        request: Request,
        service: Service,
        k: int = Q(10, ge=1, le=100),
        offset: int = Q(0, ge=0, le=1000),
        category: list[str] = Q([]),
        exclude_category: list[str] = Q([]),
        min_score: float | None = Q(None, ge=-1, le=1),
        group_by_product: bool = Q(True),
        crop: str | None = Q(None, description="x,y,w,h as fractions of the image"),
    ) -> SearchOut:
        body, upload = await _search_in(request)
        query, options = _query(body, upload), _options(body)
        result = await run_in_threadpool(service.search, query, options)
        return search_out(result, options)

    @app.post("/v1/search/batch", response_model=BatchOut, tags=["search"], dependencies=[Read])
    async def search_batch(body: BatchIn, service: Service) -> BatchOut:
        def one(item: SearchIn) -> BatchItemOut:
            try:
                options = _options(item)
                return BatchItemOut(result=search_out(service.search(_query(item), options), options))
            except VsearchError as exc:
                status, code = next((s, c) for kind, s, c in ERRORS if isinstance(exc, kind))
                return BatchItemOut(error={"code": code, "message": str(exc), "status": str(status)})

        results = [await run_in_threadpool(one, item) for item in body.queries]
        return BatchOut(results=results)

    @app.get("/v1/products/{product_id:path}", response_model=ProductOut, tags=["products"], dependencies=[Read])
    async def get_product(product_id: str, service: Service) -> ProductOut:
        return product_out(await run_in_threadpool(service.engine.product, product_id))

    @app.post("/v1/products", response_model=ProductOut, status_code=201, tags=["products"], dependencies=[Write])
    async def create_product(request: Request, service: Service) -> ProductOut:
        body, uploads = await _product_in(request, None)
        if not uploads and not body.image_urls:
            raise ConfigError("a new product needs at least one image (field image) or image_url")
        if await run_in_threadpool(_exists, service.engine, body.id):
            raise ConflictError(f"product {body.id!r} exists; use PUT /v1/products/{body.id} to change it")
        return product_out(await run_in_threadpool(_put, service, body, uploads))

    @app.put("/v1/products/{product_id:path}", response_model=ProductOut, tags=["products"], dependencies=[Write])
    async def update_product(product_id: str, request: Request, service: Service) -> ProductOut:
        body, uploads = await _product_in(request, product_id)
        if not await run_in_threadpool(_exists, service.engine, product_id):
            raise ProductNotFoundError(f"no product {product_id!r}; create it with POST /v1/products")
        return product_out(await run_in_threadpool(_put, service, body, uploads))

    @app.delete("/v1/products/{product_id:path}", status_code=204, tags=["products"], dependencies=[Write])
    async def delete_product(product_id: str, service: Service) -> Response:
        await run_in_threadpool(service.engine.delete_product, product_id)
        return Response(status_code=204)

    @app.get("/v1/categories", response_model=list[CategoryNode], tags=["catalog"], dependencies=[Read])
    async def categories(service: Service) -> list[CategoryNode]:
        tree = await run_in_threadpool(service.engine.categories)
        return [CategoryNode.model_validate(node) for node in tree]

    @app.get("/v1/info", tags=["catalog"], dependencies=[Read])
    async def info(service: Service) -> dict[str, Any]:
        return await run_in_threadpool(service.engine.info)

    @app.get("/v1/images/{image_id}", tags=["catalog"], dependencies=[Read], response_model=None)
    async def image(image_id: int, service: Service) -> Response:
        row = await run_in_threadpool(service.engine.image, image_id)
        stored = await run_in_threadpool(service.engine.image_store.path, row.sha256)
        if stored is not None:
            return FileResponse(stored, headers={"Cache-Control": "public, max-age=86400"})
        if is_url(row.source):
            return RedirectResponse(row.source, status_code=307)
        return FileResponse(row.source, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/v1/images/{image_id}/thumbnail", tags=["catalog"], dependencies=[Read])
    async def thumbnail(image_id: int, service: Service) -> Response:
        data = await run_in_threadpool(service.thumbnail, image_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


def _exists(engine: Engine, product_id: str) -> bool:
    try:
        engine.product(product_id)
    except ProductNotFoundError:
        return False
    return True


def _put(service: SearchService, body: ProductIn, uploads: list[bytes]) -> ProductView:
    images: list[bytes | str] = [*uploads, *body.image_urls]
    return service.engine.put_product(
        body.id,
        title=body.title,
        category=body.category,
        attributes=body.attributes,
        images=images or None,
        fetch_policy=service.fetch_policy,
        max_pixels=service.config.max_pixels,
    )
