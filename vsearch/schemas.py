"""The API's shapes: what clients send (``*In``, the search variants) and what they get (``*Out``).

A search request is :class:`SearchParams` (everything but the query) plus exactly one
query field, except that ``text`` may come beside another one (its words are then
ranked by the keyword index and fused with that query's ranking); the query field
that is present (``text`` only when alone) picks the variant of :data:`SearchIn`, a
pydantic discriminated union whose tags are those field names, and each variant turns
itself into the matching :data:`vsearch.query.Query` kind. The same models read the
query string, multipart and urlencoded forms, JSON bodies and batches.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal, get_args, get_origin

import numpy as np
from pydantic import BaseModel, BeforeValidator, Discriminator, Field, PlainValidator, Tag, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from .attributes import AttributeFilter
from .errors import AttributeFilterError, ConfigError
from .fusion import DEFAULT_TEXT_WEIGHT
from .images import is_url
from .query import (
    MAX_TEXT_WEIGHT,
    Crop,
    ImageQuery,
    ProductQuery,
    SearchOptions,
    TextQuery,
    UrlQuery,
    VectorQuery,
    parse_crop,
)

__all__ = [
    "QUERY_FIELDS",
    "REPEATED",
    "SearchParams",
    "UploadSearch",
    "Base64Search",
    "UrlSearch",
    "ProductSearch",
    "TextSearch",
    "VectorSearch",
    "SearchIn",
    "BatchIn",
    "ProductIn",
    "HitOut",
    "CategoryShare",
    "SearchOut",
    "FacetOut",
    "FacetValue",
    "BatchItemOut",
    "BatchOut",
    "ImageOut",
    "ProductOut",
    "CategoryNode",
    "AttributeOut",
    "BatchError",
    "ErrorBody",
    "ErrorOut",
]


def _crop(value: Any) -> Crop | None:
    if value is not None and not isinstance(value, str):
        raise PydanticCustomError("crop", "crop must be a string x,y,w,h")
    try:
        return parse_crop(value)
    except ConfigError as exc:
        raise PydanticCustomError("crop", str(exc)) from None


def _base64(value: Any) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise PydanticCustomError("base64", "image_base64 is not valid base64") from None


def _json_text(value: Any) -> Any:
    """A list sent as a form field or in the query string comes as its JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise PydanticCustomError("json", "a JSON list of numbers is needed") from None


def _filter(value: Any) -> AttributeFilter | None:
    """A JSON object, or (query string, form field) its JSON text."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PydanticCustomError("filter", "filter must be a JSON object: {error}", {"error": exc.msg}) from None
    try:
        return AttributeFilter.from_json(value)
    except AttributeFilterError as exc:
        raise PydanticCustomError("filter", "{error}", {"error": str(exc)}) from None


MAX_TEXT = 1000  # characters of a search text (the keyword side reads at most 32 words of it)
TEXT_DESCRIPTION = (
    "words the results should match (titles and text attributes, bm25). Alone: a keyword search (with an open_clip "
    "model also its text tower, fused). Beside image, image_base64, image_url, product_id or vector: that query's "
    "ranking fused with the keyword ranking by reciprocal rank fusion, 1/(60 + rank) + text_weight/(60 + rank_text)"
)
FILTER_EXAMPLE = {"brand": {"in": ["A", "B"]}, "price": {"lt": 50}, "in_stock": True}
FilterField = Annotated[
    AttributeFilter | None,
    PlainValidator(_filter),
    WithJsonSchema(
        {
            "anyOf": [{"type": "object", "additionalProperties": True}, {"type": "string"}, {"type": "null"}],
            "description": (
                "attribute conditions, all of which must hold: NAME: VALUE (equal), NAME: {in: [..]} (any of), "
                "NAME: {lt|lte|gt|gte: N} (numbers), NAME: {exists: true|false}. Attributes keep their JSON "
                'types ("5" is not 5); a list attribute matches if any element does. In a query string or '
                "form field: the object's JSON text."
            ),
            "examples": [FILTER_EXAMPLE, {"price": {"gte": 10, "lt": 50}}, {"colors": "red", "sku": {"exists": True}}],
        }
    ),
]

CropField = Annotated[
    Crop | None,
    PlainValidator(_crop),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "x,y,w,h as fractions of the image (image queries)",
            "examples": ["0.1,0.1,0.5,0.6"],
        }
    ),
]


# ---------------------------------------------------------------------------- search requests
class SearchParams(BaseModel):
    """Everything about a search but the query: query-string parameters, form fields or
    JSON fields alike (a body's values win over the query string's)."""

    k: int = Field(10, ge=1, le=100, description="how many results")
    offset: int = Field(0, ge=0, le=1000, description="results to skip, for paging")
    category: list[str] = Field(default_factory=list, description="only these categories (repeatable; Fruit matches Fruit/Apple)")
    exclude_category: list[str] = Field(default_factory=list, description="not these categories (repeatable)")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop results scoring less")
    group_by_product: bool = Field(True, description="one result per product, its best image")
    filter: FilterField = None
    facets: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="count the values of these fields (attributes, or category) among all the products the filters "
        "allow and among the results (repeatable)",
        examples=[["brand", "category"]],
    )
    crop: CropField = None
    text: str | None = Field(None, max_length=MAX_TEXT, description=TEXT_DESCRIPTION, examples=["apple", "red organic"])
    text_weight: float = Field(
        DEFAULT_TEXT_WEIGHT,
        ge=0,
        le=MAX_TEXT_WEIGHT,
        description="the keyword ranking's weight in the fusion (the other ranking's is 1; 0: no fusion)",
    )
    collapse: Literal["", "variant_group"] = Field(
        "", description="variant_group: one result per variant group (its best product), with the group's members"
    )

    def options(self) -> SearchOptions:
        return SearchOptions(
            k=self.k,
            offset=self.offset,
            categories=tuple(self.category),
            exclude_categories=tuple(self.exclude_category),
            min_score=self.min_score,
            group_by_product=self.group_by_product,
            where=self.filter,
            facets=tuple(self.facets),
            text=self.text or "",
            text_weight=self.text_weight,
            collapse=self.collapse,
        )


class UploadSearch(SearchParams):
    """An uploaded image file (multipart field ``image``)."""

    image: bytes = Field(strict=True, description="the image file (multipart only; JSON sends image_base64)")

    def query(self) -> ImageQuery:
        return ImageQuery(self.image, self.crop)


class Base64Search(SearchParams):
    """An image file's bytes, base64-encoded (JSON bodies and batches)."""

    image_base64: Annotated[bytes, PlainValidator(_base64), WithJsonSchema({"type": "string", "contentEncoding": "base64"})]

    def query(self) -> ImageQuery:
        return ImageQuery(self.image_base64, self.crop)


class UrlSearch(SearchParams):
    """An http(s) image URL, fetched under the server's URL policy."""

    image_url: str

    def query(self) -> UrlQuery:
        return UrlQuery(self.image_url, self.crop)


class ProductSearch(SearchParams):
    """More like this: a catalog product's images, the product left out of its own results."""

    product_id: str

    def query(self) -> ProductQuery:
        return ProductQuery(self.product_id)


class TextSearch(SearchParams):
    """Words alone: the products whose titles and text attributes match them, by bm25; with a
    model that has a text tower (open_clip), fused with the products that look like them."""

    text: str = Field(max_length=MAX_TEXT, description=TEXT_DESCRIPTION, examples=["apple", "red organic"])

    def query(self) -> TextQuery:
        return TextQuery(self.text)


class VectorSearch(SearchParams):
    """A raw embedding from the index's served model (see GET /v1/info), L2-normalised by the server."""

    vector: Annotated[list[float], BeforeValidator(_json_text)] = Field(
        description="a JSON list of numbers (in a form field or the query string: that list's JSON text)"
    )

    @field_validator("vector")
    @classmethod
    def _usable(cls, vector: list[float]) -> list[float]:
        try:
            VectorQuery(np.asarray(vector))  # its checks, once: empty, not finite, all zero
        except ConfigError as exc:
            raise PydanticCustomError("vector", str(exc)) from None
        return vector

    def query(self) -> VectorQuery:
        return VectorQuery(np.asarray(self.vector))


def _given(value: Any) -> list[str]:
    """The query fields present in a request: set and not the empty string (an empty
    upload is present, and refused as an empty file)."""
    get = value.get if isinstance(value, dict) else lambda name: getattr(value, name, None)
    return [name for name in QUERY_FIELDS if (field := get(name)) is not None and field != ""]


def _query_field(value: Any) -> str | None:
    given = _given(value)
    kinds = [name for name in given if name != "text"] or given  # text beside another: that one's words
    return kinds[0] if len(kinds) == 1 else None


def _exactly_one(value: Any) -> Any:
    given = _given(value)
    if not given or len([name for name in given if name != "text"]) > 1:
        wanted = f"{', '.join(QUERY_FIELDS[:-1])} or {QUERY_FIELDS[-1]}"
        got = f" (got {', '.join(given)})" if given else ""
        raise PydanticCustomError("query_kind", f"give exactly one of {wanted} (text may also go beside one of the others){got}")
    return value


# One variant per query kind, tagged with its field's name (the tags are QUERY_FIELDS,
# which the "exactly one" check and the error paths use). Adding a kind: a variant
# class above, with its query(), and its line here.
SearchIn = Annotated[
    Annotated[UploadSearch, Tag("image")]
    | Annotated[Base64Search, Tag("image_base64")]
    | Annotated[UrlSearch, Tag("image_url")]
    | Annotated[ProductSearch, Tag("product_id")]
    | Annotated[TextSearch, Tag("text")]
    | Annotated[VectorSearch, Tag("vector")],
    Discriminator(_query_field),
    BeforeValidator(_exactly_one),
]
QUERY_FIELDS: tuple[str, ...] = tuple(get_args(member)[1].tag for member in get_args(get_args(SearchIn)[0]))
# form fields and query parameters that repeat (category=A&category=B)
REPEATED: tuple[str, ...] = tuple(n for n, f in SearchParams.model_fields.items() if get_origin(f.annotation) is list)


class BatchIn(BaseModel):
    queries: list[SearchIn] = Field(min_length=1, max_length=32)


class ProductIn(BaseModel):
    id: str = Field(min_length=1, max_length=256)
    title: str = ""
    category: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_urls: list[str] = Field(default_factory=list, max_length=20, description="http(s) URLs only")

    @field_validator("attributes")
    @classmethod
    def _finite(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(attributes, allow_nan=False)
        except ValueError:
            raise ValueError("attributes must be JSON: finite numbers only (not NaN or Infinity)") from None
        return attributes

    @field_validator("image_urls")
    @classmethod
    def _only_web_urls(cls, urls: list[str]) -> list[str]:
        # The API must never read the server's own files: local paths are for the CLI.
        bad = [u for u in urls if not is_url(u)]
        if bad:
            raise ValueError(f"image_urls must be http(s) URLs, not {bad[0][:100]!r}")
        return urls


class HitOut(BaseModel):
    product_id: str
    title: str
    category: str
    score: float
    image_id: int
    image_url: str
    thumbnail_url: str
    attributes: dict[str, Any]
    variant_group: str = Field(
        "", description="the product's variant group (products whose images are near-duplicates); '' if it has none"
    )
    variants: list[str] = Field(default_factory=list, description="the group's products (the first 50 by id)")
    variant_count: int = Field(1, description="how many products the group has (1: the product has no group)")


class CategoryShare(BaseModel):
    category: str
    share: float


class FacetValue(BaseModel):
    value: str | int | float | bool
    count: int


class FacetOut(BaseModel):
    all: list[FacetValue] = Field(description="among every product the search's filters allow, most frequent first")
    top: list[FacetValue] = Field(description="among the results returned")


class SearchOut(BaseModel):
    results: list[HitOut]
    suggested_categories: list[CategoryShare]
    facets: dict[str, FacetOut] = Field(default_factory=dict, description="one entry per requested facet")
    timing_ms: dict[str, float]
    k: int
    offset: int


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable: not_found, invalid_parameter, too_large, ...")
    message: str


class ErrorOut(BaseModel):
    """Every error response's body."""

    error: ErrorBody


class BatchError(ErrorBody):
    status: str = Field(description="the HTTP status this query alone would have got")


class BatchItemOut(BaseModel):
    """Exactly one of result and error."""

    result: SearchOut | None = None
    error: BatchError | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


class ImageOut(BaseModel):
    id: int
    source: str
    width: int
    height: int
    sha256: str
    image_url: str
    thumbnail_url: str


class ProductOut(BaseModel):
    id: str
    title: str
    category: str
    attributes: dict[str, Any]
    images: list[ImageOut]
    created_at: float
    updated_at: float


class AttributeOut(BaseModel):
    name: str
    values: int = Field(description="how many distinct values it has")


class CategoryNode(BaseModel):
    name: str
    path: str
    products: int
    children: list[CategoryNode]
