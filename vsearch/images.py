"""Reading images safely: any mode to RGB, EXIF orientation, alpha on white,
and refusals (with a reason) for empty, corrupt, truncated or oversized files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError, UnsupportedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "read_source", "sha256_bytes", "is_url"]

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: larger is treated as a decompression bomb
URL_TIMEOUT_S = 15.0
URL_MAX_BYTES = 32 * 1024 * 1024


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(source: str, *, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """The raw bytes of a local path or an http(s) URL, or :class:`ImageError`."""
    if is_url(source):
        return _fetch(source, timeout=timeout, max_bytes=max_bytes)
    try:
        with open(source, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ImageError(source, f"cannot read file: {exc.strerror or exc}") from exc


def _fetch(url: str, *, timeout: float, max_bytes: int) -> bytes:
    from .fetch import FetchError, FetchPolicy, fetch_url

    try:
        return fetch_url(url, FetchPolicy(allow_private=True, timeout_s=timeout, max_bytes=max_bytes))
    except FetchError as exc:
        raise ImageError(url, f"download failed: {exc}") from exc


def decode_image(data: bytes, source: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image.

    The pixel count is checked from the header before any pixel is decoded, so a
    tiny file that claims 100k x 100k pixels costs nothing.
    """
    if not data:
        raise ImageError(source, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(source, f"image too large: {width}x{height} pixels (limit {max_pixels})")
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(source, "not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(source, f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation/corruption as these
        raise ImageError(source, f"corrupt or truncated image: {exc}") from exc
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose an otherwise good image
        image = ImageOps.exif_transpose(image) or image
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        high = float(array.max()) if array.size else 0.0
        scale = 255.0 / (65535.0 if high > 255 else 255.0 if high > 1 else 1.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
