"""Reading requests into :mod:`vsearch.schemas` models: a search from its query string
plus a multipart or urlencoded form or a JSON body; a product write from a form or
JSON. Validation failures become ``RequestValidationError`` (422, field named)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import ImmutableMultiDict, UploadFile

from .errors import ConfigError
from .schemas import REPEATED, ProductIn, SearchIn

__all__ = ["SEARCH", "read_product", "read_search"]

SEARCH: TypeAdapter[SearchIn] = TypeAdapter(SearchIn)
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def _fields(values: ImmutableMultiDict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Plain fields of a query string or form: repeated ones as lists, files left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in skip or isinstance(value, UploadFile):
            continue
        out[key] = [str(v) for v in values.getlist(key)] if key in REPEATED else value
    return out


async def read_search(request: Request) -> SearchIn:
    """One search: options from the query string, then the body's fields over them."""
    data = _fields(request.query_params, skip=("key",))
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        data.update(await _json_object(request, "the JSON body is not valid JSON"))
    elif content_type.startswith(FORMS):
        form = await request.form(max_files=1, max_fields=50)
        data.update(_fields(form))
        upload = form.get("image")
        if isinstance(upload, UploadFile):
            data["image"] = await upload.read()
    try:
        return SEARCH.validate_python(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _json_object(request: Request, invalid: str) -> dict[str, Any]:
    """The body as a JSON object of valid Unicode text, or ConfigError (422) saying why."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(invalid) from None
    except RecursionError:
        raise ConfigError("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ConfigError("the JSON body must be an object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be stored
    except UnicodeEncodeError:
        raise ConfigError("the JSON body holds text that is not valid Unicode (a lone surrogate escape)") from None
    return body


async def read_product(request: Request, product_id: str | None) -> tuple[ProductIn, list[bytes]]:
    """A product write and its uploaded image files (``product_id`` from the path, if any)."""
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
        data = await _json_object(request, "send multipart/form-data or a JSON body")
    if product_id is not None:
        data = {**data, "id": product_id}
    try:
        return ProductIn.model_validate(data), uploads
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
