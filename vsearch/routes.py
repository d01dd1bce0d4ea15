"""The HTTP endpoints. Each parses (:mod:`vsearch.bodies`), calls one library function
(:class:`~vsearch.service.SearchService` or its engine) and formats the answer."""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .bodies import SEARCH, read_product, read_search
from .config import ServeConfig
from .engine import ProductView
from .errors import ConfigError, ProductNotFoundError, VsearchError
from .facets import facets_json
from .images import is_url
from .metrics import CONTENT_TYPE, Metrics
from .query import SearchOptions
from .schemas import AttributeOut, BatchIn, BatchItemOut, BatchOut, CategoryNode, ProductIn, ProductOut, SearchOut, SearchParams
from .service import SearchResult, SearchService
from .statuses import batch_error, error_response

__all__ = ["add_routes", "document_search"]


# ---------------------------------------------------------------------------- dependencies
def get_service(request: Request) -> SearchService:
    service: SearchService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise StarletteHTTPException(503, "the index is still loading")
    return service


def _given_key(request: Request, in_url: bool) -> str | None:
    """The key a request carries; ``?key=`` only where ``in_url`` (reads such as image
    URLs in <img> tags): keys in URLs end up in logs, so writes never take them."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key") or (request.query_params.get("key") if in_url else None)


def _key_ok(given: str | None, *keys: str | None) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str (a header may carry any byte).
    secret = (given or "").encode("utf-8", "surrogateescape")
    return given is not None and any(k is not None and hmac.compare_digest(secret, k.encode()) for k in keys)


def require_write(request: Request) -> None:
    config: ServeConfig = request.app.state.config
    if not config.api_key:
        raise StarletteHTTPException(403, "writes are disabled: configure an API key (VSEARCH_API_KEY)")
    if not _key_ok(_given_key(request, in_url=False), config.api_key):
        raise StarletteHTTPException(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")


def require_read(request: Request) -> None:
    config: ServeConfig = request.app.state.config
    if config.read_key and not _key_ok(_given_key(request, in_url=True), config.read_key, config.api_key):
        raise StarletteHTTPException(401, "a valid read key is required (Authorization: Bearer KEY or X-API-Key)")


Service = Annotated[SearchService, Depends(get_service)]
BINARY = {"schema": {"type": "string", "format": "binary"}}
ImageId = Annotated[int, Path(ge=0, le=2**63 - 1, description="an image's id (a catalog row id)")]
Read = Depends(require_read)
Write = Depends(require_write)


# ---------------------------------------------------------------------------- formatting
def search_out(result: SearchResult, options: SearchOptions) -> SearchOut:
    return SearchOut.model_validate(
        {
            "results": [
                {
                    **{
                        k: getattr(h, k)
                        for k in (
                            "product_id",
                            "title",
                            "category",
                            "image_id",
                            "attributes",
                            "variant_group",
                            "variants",
                            "variant_count",
                        )
                    },
                    "score": round(h.score, 6),
                    "image_url": f"/v1/images/{h.image_id}",
                    "thumbnail_url": f"/v1/images/{h.image_id}/thumbnail",
                }
                for h in result.hits
            ],
            "suggested_categories": [{"category": c, "share": s} for c, s in result.suggested_categories],
            "facets": facets_json(result.facets),
            "timing_ms": result.timing_ms,
            "k": options.k,
            "offset": options.offset,
        }
    )


def batch_item_out(answer: SearchResult | VsearchError, options: SearchOptions) -> BatchItemOut:
    if isinstance(answer, VsearchError):
        return BatchItemOut(error=batch_error(answer))
    return BatchItemOut(result=search_out(answer, options))


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


def document_search(openapi: dict[str, Any]) -> None:
    """Add /v1/search's parameters and body to the OpenAPI document, from the models
    :func:`vsearch.bodies.read_search` reads: FastAPI cannot see them, since one route
    takes a query string with a form or a JSON body."""
    ref = "#/components/schemas/{model}"
    body: dict[str, Any] = SEARCH.json_schema(ref_template=ref)
    params: dict[str, Any] = SearchParams.model_json_schema(ref_template=ref)
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in {**body.pop("$defs", {}), **params.pop("$defs", {})}.items():
        components.setdefault(name, schema)
    operation = openapi["paths"]["/v1/search"]["post"]
    operation["parameters"] = [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": schema.get("description", "")}
        for name, schema in params["properties"].items()
    ]
    media = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")
    operation["requestBody"] = {"required": True, "content": {m: {"schema": body} for m in media}}


# ---------------------------------------------------------------------------- routes
def add_routes(app: FastAPI) -> None:
    # The ops endpoints are async and do no blocking work: they answer on the event loop
    # even while every worker thread is busy (slow URLs, a queue of searches).
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        if not request.app.state.ready:
            return error_response(503, "not_ready", "the index or the model is still loading")
        if not get_service(request).ready():
            return error_response(503, "not_ready", "the last searches failed with server errors; checking again")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        registry: Metrics | None = getattr(request.app.state, "metrics", None)
        return Response(registry.render() if registry else b"", media_type=CONTENT_TYPE)

    @app.post(
        "/v1/search",
        response_model=SearchOut,
        tags=["search"],
        dependencies=[Read],
        summary="Find products similar to one photo, URL, product, text or vector",
    )
    async def search(request: Request, service: Service) -> SearchOut:
        body = await read_search(request)
        options = body.options()
        return search_out(await run_in_threadpool(service.search, body.query(), options), options)

    @app.post(
        "/v1/search/batch",
        response_model=BatchOut,
        tags=["search"],
        dependencies=[Read],
        summary="Up to 32 searches from one index snapshot, their images embedded together",
    )
    async def search_batch(body: BatchIn, service: Service) -> BatchOut:
        requests = [(item.query(), item.options()) for item in body.queries]
        answers = await run_in_threadpool(service.search_many, requests)
        return BatchOut(results=[batch_item_out(a, options) for a, (_, options) in zip(answers, requests)])

    @app.get("/v1/products/{product_id:path}", response_model=ProductOut, tags=["products"], dependencies=[Read])
    async def get_product(product_id: str, service: Service) -> ProductOut:
        return product_out(await run_in_threadpool(service.engine.product, product_id))

    @app.post("/v1/products", response_model=ProductOut, status_code=201, tags=["products"], dependencies=[Write])
    async def create_product(request: Request, service: Service) -> ProductOut:
        body, uploads = await read_product(request, None)
        if not uploads and not body.image_urls:
            raise ConfigError("a new product needs at least one image (field image) or image_url")
        return product_out(await run_in_threadpool(_put, service, body, uploads, True))

    @app.put("/v1/products/{product_id:path}", response_model=ProductOut, tags=["products"], dependencies=[Write])
    async def update_product(product_id: str, request: Request, service: Service) -> ProductOut:
        body, uploads = await read_product(request, product_id)
        return product_out(await run_in_threadpool(_put, service, body, uploads, False))  # PUT changes, POST creates

    @app.delete("/v1/products/{product_id:path}", status_code=204, tags=["products"], dependencies=[Write])
    async def delete_product(product_id: str, service: Service) -> Response:
        await run_in_threadpool(service.engine.delete_product, product_id)
        return Response(status_code=204)

    @app.get("/v1/categories", response_model=list[CategoryNode], tags=["catalog"], dependencies=[Read])
    async def categories(service: Service) -> list[CategoryNode]:
        tree = await run_in_threadpool(service.engine.categories)
        return [CategoryNode.model_validate(node) for node in tree]

    @app.get(
        "/v1/attributes",
        response_model=list[AttributeOut],
        tags=["catalog"],
        dependencies=[Read],
        summary="The attributes searches can filter on and count (facets)",
    )
    async def attributes(service: Service) -> list[AttributeOut]:
        return [AttributeOut.model_validate(a) for a in await run_in_threadpool(service.engine.attributes)]

    @app.get("/v1/info", tags=["catalog"], dependencies=[Read], summary="The index: counts, model, dimensions, text search")
    async def info(service: Service) -> dict[str, Any]:
        return await run_in_threadpool(service.engine.info)

    @app.get(
        "/v1/images/{image_id}",
        tags=["catalog"],
        dependencies=[Read],
        response_model=None,
        responses={200: {"content": {"image/*": BINARY}}, 307: {"description": "the image's URL (an http(s) catalog image)"}},
    )
    async def image(image_id: ImageId, service: Service) -> Response:
        row = await run_in_threadpool(service.engine.image, image_id)
        stored = await run_in_threadpool(service.engine.image_store.path, row.sha256)
        if stored is not None:
            return FileResponse(stored, headers={"Cache-Control": "public, max-age=86400"})
        if is_url(row.source):
            return RedirectResponse(row.source, status_code=307)
        if not await run_in_threadpool(os.path.isfile, row.source):
            raise ProductNotFoundError(f"the file of image {image_id} is gone; re-ingest its product")
        return FileResponse(row.source, headers={"Cache-Control": "public, max-age=3600"})

    @app.get(
        "/v1/images/{image_id}/thumbnail",
        tags=["catalog"],
        dependencies=[Read],
        response_model=None,
        responses={200: {"content": {"image/jpeg": BINARY}}},
    )
    async def thumbnail(image_id: ImageId, service: Service) -> Response:
        data = await run_in_threadpool(service.thumbnail, image_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


def _put(service: SearchService, body: ProductIn, uploads: list[bytes], create: bool) -> ProductView:
    images: list[bytes | str] = [*uploads, *body.image_urls]
    service.trimmer.touch()  # decoding and embedding: memory to give back once quiet
    return service.engine.put_product(
        body.id,
        create=create,
        title=body.title,
        category=body.category,
        attributes=body.attributes,
        images=images or None,
        fetch_policy=service.fetch_policy,
        max_pixels=service.config.max_pixels,
        embed=service.embed_catalog,  # on the model's thread, as every forward
    )
