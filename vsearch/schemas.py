"""The API's JSON shapes: what clients send (``*In``) and what they get (``*Out``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "SearchIn",
    "BatchIn",
    "ProductIn",
    "HitOut",
    "CategoryShare",
    "SearchOut",
    "BatchItemOut",
    "BatchOut",
    "ImageOut",
    "ProductOut",
    "CategoryNode",
    "ErrorOut",
]


class SearchIn(BaseModel):
    """One query for JSON clients: exactly one of image_url, product_id, text, image_base64."""

    image_url: str | None = None
    product_id: str | None = None
    text: str | None = None
    image_base64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    k: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0, le=1000)
    category: list[str] = Field(default_factory=list)
    exclude_category: list[str] = Field(default_factory=list)
    min_score: float | None = Field(None, ge=-1, le=1)
    group_by_product: bool = True
    crop: str | None = Field(None, description="x,y,w,h as fractions of the image")


class BatchIn(BaseModel):
    queries: list[SearchIn] = Field(min_length=1, max_length=32)


class ProductIn(BaseModel):
    id: str = Field(min_length=1, max_length=256)
    title: str = ""
    category: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_urls: list[str] = Field(default_factory=list, max_length=20)


class HitOut(BaseModel):
    product_id: str
    title: str
    category: str
    score: float
    image_id: int
    image_url: str
    thumbnail_url: str
    attributes: dict[str, Any]


class CategoryShare(BaseModel):
    category: str
    share: float


class SearchOut(BaseModel):
    results: list[HitOut]
    suggested_categories: list[CategoryShare]
    timing_ms: dict[str, float]
    k: int
    offset: int


class BatchItemOut(BaseModel):
    result: SearchOut | None = None
    error: dict[str, str] | None = None


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


class CategoryNode(BaseModel):
    name: str
    path: str
    products: int
    children: list[CategoryNode]


class ErrorOut(BaseModel):
    error: dict[str, str]
