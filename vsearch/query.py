"""What a search asks and what it gets back.

A query is one of five kinds, a tagged union (:data:`Query`): an uploaded image, an
image URL, a catalog product ("more like this"), a text, or a raw vector from the
index's own model. :class:`SearchOptions` is everything else about a search; a
:class:`Hit` is one result. Adding a query kind means a dataclass here, a handler in
:mod:`vsearch.service` and a variant in :mod:`vsearch.schemas`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attributes import AttributeFilter
from .errors import ConfigError
from .fusion import DEFAULT_TEXT_WEIGHT

__all__ = [
    "Crop",
    "Hit",
    "ImageQuery",
    "COLLAPSE",
    "MAX_K",
    "ProductQuery",
    "Query",
    "SearchOptions",
    "TextQuery",
    "UrlQuery",
    "VectorQuery",
    "parse_crop",
]

MAX_K = 1000
COLLAPSE = ("", "variant_group")
MAX_TEXT_WEIGHT = 100.0
Crop = tuple[float, float, float, float]  # x, y, w, h as fractions of the image


@dataclass(frozen=True)
class ImageQuery:
    """An uploaded image file's bytes, optionally cropped."""

    image: bytes
    crop: Crop | None = None


@dataclass(frozen=True)
class UrlQuery:
    """An http(s) image URL (fetched under the server's URL policy), optionally cropped."""

    url: str
    crop: Crop | None = None


@dataclass(frozen=True)
class ProductQuery:
    """A catalog product ("more like this"): the mean vector of a catalog product's images; the product
    itself is left out of the results."""

    product_id: str


@dataclass(frozen=True)
class TextQuery:
    """A text: the products whose titles and text attributes match its words
    (:mod:`vsearch.keywords`); with a model that has a text tower (open_clip), fused
    with the products that look like it (:mod:`vsearch.fusion`)."""

    text: str


@dataclass(frozen=True, eq=False)
class VectorQuery:
    """A raw (unprojected) embedding from the index's served model, e.g. one an
    integrator computed offline; it is L2-normalised before use."""

    vector: np.ndarray

    def __post_init__(self) -> None:
        vector = np.asarray(self.vector, dtype=np.float32).reshape(-1)
        if vector.size == 0 or not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
            raise ConfigError("vector must be a non-empty list of finite numbers, not all zero")
        object.__setattr__(self, "vector", vector / np.linalg.norm(vector))


Query = ImageQuery | UrlQuery | ProductQuery | TextQuery | VectorQuery


@dataclass(frozen=True)
class SearchOptions:
    """Everything about a search except the query itself."""

    k: int = 10
    offset: int = 0
    categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    exclude_products: Sequence[str] = ()
    min_score: float | None = None
    group_by_product: bool = True
    where: AttributeFilter | None = None  # attribute conditions (vsearch.attributes)
    facets: Sequence[str] = ()  # fields to count values of (vsearch.facets)
    # words the results should match (vsearch.keywords); beside an image, URL, product or
    # vector query their ranking is fused with the query's (vsearch.fusion)
    text: str = ""
    text_weight: float = DEFAULT_TEXT_WEIGHT  # the keyword ranking's weight in that fusion (the other's is 1); 0: none
    collapse: str = ""  # "variant_group": one result per variant group (vsearch.variants), its best

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k must be between 1 and {MAX_K}")
        if self.offset < 0:
            raise ConfigError("offset must not be negative")
        if not 0 <= self.text_weight <= MAX_TEXT_WEIGHT:  # also refuses NaN
            raise ConfigError(f"text_weight must be between 0 and {MAX_TEXT_WEIGHT:g}")
        if self.collapse not in COLLAPSE:
            raise ConfigError(f"collapse must be one of {', '.join(repr(c) for c in COLLAPSE if c)}, not {self.collapse!r}")

    @property
    def fuses(self) -> bool:
        """Whether a vector query's ranking is fused with a keyword ranking."""
        return bool(self.text) and self.text_weight > 0


@dataclass(frozen=True)
class Hit:
    product_id: str
    image_id: int
    score: float
    title: str
    category: str
    attributes: dict[str, Any] = field(default_factory=dict)
    image: str = ""
    variant_group: str = ""  # the product's variant group, "" if it has none (vsearch.variants)
    variants: list[str] = field(default_factory=list)  # the group's first products (vsearch.variants.LISTED), this one among them
    variant_count: int = 1  # how many products the group has (1: no group)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "score": round(self.score, 6)}


def parse_crop(text: str | None) -> Crop | None:
    """``"x,y,w,h"`` in fractions of the image -> a checked tuple."""
    if text is None or text == "":
        return None
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("crop must be x,y,w,h: four numbers between 0 and 1") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or min(x, y) < 0 or w <= 0 or h <= 0 or x + w > 1.0001 or y + h > 1.0001:
        raise ConfigError("crop must lie inside the image: 0 <= x, y and x + w, y + h <= 1, with w, h > 0")
    return x, y, w, h
