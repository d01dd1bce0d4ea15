"""Which HTTP status and error code each failure gets, and the error body
``{"error": {"code": ..., "message": ...}}`` every failure answers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Overloaded
from .errors import (
    AttributeFilterError,
    ConfigError,
    ConflictError,
    FilterError,
    ImageError,
    ImageTooLargeError,
    IndexBusyError,
    IndexNotFoundError,
    ModelError,
    ProductNotFoundError,
    StorageError,
    UnsupportedImageError,
    VsearchError,
)
from .fetch import FetchError, TooLargeError, UrlBlockedError
from .limits import Busy
from .schemas import QUERY_FIELDS, BatchError, ErrorOut

__all__ = ["ERRORS", "DOCUMENTED", "batch_error", "classify", "error_response", "install_error_handlers", "validation_message"]

# most specific first: the first matching class decides status and code
ERRORS: list[tuple[type[Exception], int, str]] = [
    (Busy, 503, "busy"),  # a shared resource (decode memory, URL slots) is taken for now: the server's state
    (Overloaded, 429, "overloaded"),
    (ImageTooLargeError, 413, "too_large"),
    (TooLargeError, 413, "too_large"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (ImageError, 400, "invalid_image"),
    (UrlBlockedError, 400, "url_blocked"),
    (FetchError, 400, "fetch_failed"),
    (ProductNotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (AttributeFilterError, 422, "invalid_filter"),
    (FilterError, 422, "unknown_category"),
    (ConfigError, 422, "invalid_parameter"),
    (ModelError, 400, "unsupported_query"),
    (IndexNotFoundError, 503, "no_index"),
    (IndexBusyError, 503, "index_busy"),
    (StorageError, 503, "storage_unavailable"),
    (VsearchError, 400, "bad_request"),
]

# the error responses OpenAPI lists for every route
DOCUMENTED: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "Invalid parameter (the message names it)"},
    "4XX": {"model": ErrorOut, "description": "Bad image or URL, missing key, not found, too large, overloaded"},
}


def classify(exc: VsearchError) -> tuple[int, str]:
    """The HTTP status and error code of a library error."""
    return next((status, code) for kind, status, code in ERRORS if isinstance(exc, kind))


def batch_error(exc: VsearchError) -> BatchError:
    status, code = classify(exc)
    return BatchError(code=code, message=str(exc), status=str(status))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def validation_message(errors: Sequence[Any]) -> str:
    """The first validation error as ``field: message``. The path leaves out where the
    field came from (body, query, form) and the search union's tag, which pydantic
    puts before the chosen variant's fields: ``k``, not ``product_id.k``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    tag = next((i for i, p in enumerate(loc[:-1]) if p in QUERY_FIELDS), None)
    if tag is not None:
        del loc[tag]
    field, message = ".".join(loc), str(first.get("msg"))
    return f"{field}: {message}" if field and not message.startswith(field) else message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VsearchError)
    async def vsearch_error(request: Request, exc: VsearchError) -> JSONResponse:
        status, code = classify(exc)
        return error_response(status, code, str(exc), {"Retry-After": "1"} if status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_parameter", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers)
