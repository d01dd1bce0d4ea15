"""Product writes from the API or the library: fetch or read the images, decode,
embed with the served model, then one write through :class:`~vsearch.writer.IndexWriter`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .duplicates import phash
from .embed import decode_side
from .errors import ConflictError, ProductNotFoundError
from .fetch import TRUSTED, FetchPolicy, fetch_url
from .images import DEFAULT_MAX_PIXELS, decode, is_url, read_source, sha256_bytes
from .imagestore import ImageStore
from .writer import NewImage

if TYPE_CHECKING:
    from .engine import Engine
    from .snapshot import Snapshot

__all__ = ["Fetched", "ImageSource", "fetch_image", "put_product", "store_image"]

ImageSource = bytes | str  # uploaded bytes, an http(s) URL, or a local path
EmbedCatalog = Callable[["Snapshot", list[Image.Image]], np.ndarray]  # catalog vectors of images, by a snapshot's model


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
    embed: EmbedCatalog | None = None,
) -> None:
    """Create or replace a product. ``images`` (if given) replace its images.

    ``create`` True: the product must not exist yet (:class:`ConflictError`); False: it
    must exist (:class:`ProductNotFoundError`); None: either. Checked under the write
    mutex, so of concurrent creates of one id exactly one succeeds. ``embed``: how to
    run the model (the server's runs every forward on its model thread); default: here."""
    # Fetching and decoding need no lock: other writes (an ingest, a refresh) go on.
    # Every image is decoded before any is stored, so a bad one leaves nothing behind;
    # one image given twice is stored (and indexed) once.
    side = decode_side(engine.manifest.model.image_size)  # decoded no larger than the model can use
    fetched = list({f.key: f for f in (fetch_image(s, fetch_policy, max_pixels, side) for s in images or [])}.values())
    with engine.writer() as writer:  # embedded by the model version that will store the vectors
        if create is not None:
            _check_exists(engine, product_id, should=not create)
        raw = (embed or _embed_here)(writer.snapshot, [f.image for f in fetched]) if fetched else None
        writer.put_product(
            product_id,
            title=title,
            category=category.strip().strip("/"),
            attributes=attributes,
            images=[store_image(engine.image_store, product_id, f) for f in fetched] if images is not None else None,
            vectors=raw,
        )
        if engine.manifest.projection_fitted:
            writer.checkpoint(engine.checkpoint_every)  # durable already (the catalog); an index-type upgrade is left to ingest
        else:
            engine.fit_projection()


def _embed_here(snap: Snapshot, images: list[Image.Image]) -> np.ndarray:
    return snap.embedder.get().embed_images(images)


def _check_exists(engine: Engine, product_id: str, should: bool) -> None:
    try:
        engine.catalog.product(product_id)
    except ProductNotFoundError:
        if should:
            raise ProductNotFoundError(f"no product {product_id!r}; create it with POST /v1/products") from None
        return
    if not should:
        raise ConflictError(f"product {product_id!r} exists; use PUT /v1/products/{product_id} to change it")


@dataclass(frozen=True)
class Fetched:
    """One image of a product write, read and decoded, not stored yet."""

    source: ImageSource
    data: bytes
    sha256: str
    image: Image.Image  # perhaps reduced (see vsearch.images.decode)
    width: int  # the image's own size
    height: int

    @property
    def key(self) -> str:
        """What makes two images of one write the same: an upload's content, else its source."""
        return self.sha256 if isinstance(self.source, bytes) else str(self.source)


def fetch_image(source: ImageSource, policy: FetchPolicy, max_pixels: int, max_side: int | None = None) -> Fetched:
    """Read (or fetch) and decode one image, reduced to ``max_side`` (see
    :func:`vsearch.images.decode`); ImageError / FetchError if it cannot be used, Busy
    when the server has no decode memory or URL fetch slot to spare right now."""
    if isinstance(source, bytes):
        data, label = source, "<upload>"
    elif is_url(source):
        data, label = fetch_url(source, policy), source
    else:
        data, label = read_source(source), source
    decoded = decode(data, label, max_pixels=max_pixels, max_side=max_side)
    return Fetched(source, data, sha256_bytes(data), decoded.image, decoded.width, decoded.height)


def store_image(store: ImageStore, product_id: str, fetched: Fetched) -> NewImage:
    """Keep an upload's bytes (or a URL image's copy, for thumbnails) in the index
    directory; the catalog row's source is the stored path, the URL or the local path."""
    source = fetched.source
    if isinstance(source, bytes):
        label = str(store.put(fetched.data, fetched.sha256))
    else:
        label = source
        if is_url(source):
            store.put(fetched.data, fetched.sha256)
    return NewImage(product_id, label, fetched.sha256, fetched.width, fetched.height, phash(fetched.image))
