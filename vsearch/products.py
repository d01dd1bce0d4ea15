"""Product writes from the API or the library: fetch or read the images, decode,
embed with the served model, then one write through :class:`~vsearch.writer.IndexWriter`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import ConflictError, ProductNotFoundError
from .fetch import TRUSTED, FetchPolicy, fetch_url
from .images import DEFAULT_MAX_PIXELS, decode_image, is_url, read_source, sha256_bytes
from .imagestore import ImageStore
from .writer import NewImage

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ImageSource", "prepare_image", "put_product"]

ImageSource = bytes | str  # uploaded bytes, an http(s) URL, or a local path


def put_product(
    engine: Engine,
    product_id: str,
    *,
    title: str = "",
    category: str = "",
    attributes: dict[str, Any] | None = None,
    images: Sequence[ImageSource] | None = None,
    fetch_policy: FetchPolicy = TRUSTED,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    create: bool | None = None,
) -> None:
    """Create or replace a product. ``images`` (if given) replace its images.

    ``create`` True: the product must not exist yet (:class:`ConflictError`); False: it
    must exist (:class:`ProductNotFoundError`); None: either. Checked under the write
    mutex, so of concurrent creates of one id exactly one succeeds."""
    # Fetching and decoding need no lock: other writes (an ingest, a refresh) go on.
    prepared = [prepare_image(engine.image_store, product_id, source, fetch_policy, max_pixels) for source in images or []]
    with engine.writer() as writer:  # embedded by the model version that will store the vectors
        if create is not None:
            _check_exists(engine, product_id, should=not create)
        raw = writer.snapshot.embedder.get().embed_images([image for _, image in prepared]) if prepared else None
        writer.put_product(
            product_id,
            title=title,
            category=category.strip().strip("/"),
            attributes=attributes,
            images=[new for new, _ in prepared] if images is not None else None,
            vectors=raw,
        )
        if engine.manifest.projection_fitted:
            writer.save()  # an index-type upgrade is left to ingest: no IVF training inside a request
        else:
            engine.fit_projection()


def _check_exists(engine: Engine, product_id: str, should: bool) -> None:
    try:
        engine.catalog.product(product_id)
    except ProductNotFoundError:
        if should:
            raise ProductNotFoundError(f"no product {product_id!r}; create it with POST /v1/products") from None
        return
    if not should:
        raise ConflictError(f"product {product_id!r} exists; use PUT /v1/products/{product_id} to change it")


def prepare_image(
    store: ImageStore, product_id: str, source: ImageSource, policy: FetchPolicy, max_pixels: int
) -> tuple[NewImage, Image.Image]:
    """The stored form of an upload, a URL or a path, and the decoded image."""
    if isinstance(source, bytes):
        data, label = source, "<upload>"
    elif is_url(source):
        data, label = fetch_url(source, policy), source
    else:
        data, label = read_source(source), source
    image = decode_image(data, label, max_pixels=max_pixels)
    sha = sha256_bytes(data)
    if isinstance(source, bytes):
        label = str(store.put(data, sha))  # uploads live in the index directory
    elif is_url(source):
        store.put(data, sha)  # a local copy for thumbnails; the URL stays the source
    return NewImage(product_id, label, sha, image.width, image.height), image
