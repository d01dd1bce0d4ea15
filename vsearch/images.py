"""Reading images safely: any mode to RGB, EXIF orientation, alpha on white,
refusals (with a reason) for empty, corrupt, truncated or oversized files, and
decodes that cost no more memory than the caller needs (reduced while decoding,
within a process-wide memory budget: :mod:`vsearch.limits`)."""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError, UnsupportedImageError
from .limits import decode_budget, trim_memory

__all__ = ["DEFAULT_MAX_PIXELS", "Decoded", "decode", "decode_image", "read_source", "reduced_size", "sha256_bytes", "is_url"]

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: larger is treated as a decompression bomb
# A decode this large (estimated) returns its memory to the OS once reduced. The heap
# keeps what is freed (vsearch.malloc), each request thread in its own arena: 8 clients
# sending 36-megapixel PNGs, decoded one at a time, still left RSS at 2.2 GB.
TRIM_AFTER = 64 * 1024 * 1024
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


class Decoded(NamedTuple):
    """A decoded image: upright 8-bit RGB, perhaps reduced (see :func:`decode`), and
    the size the file's image has (upright), which the catalog records."""

    image: Image.Image
    width: int
    height: int


def decode_image(
    data: bytes,
    source: str = "<bytes>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    wait_s: float | None = None,
) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image (see :func:`decode`)."""
    return decode(data, source, max_pixels=max_pixels, max_side=max_side, wait_s=wait_s).image


def decode(
    data: bytes,
    source: str = "<bytes>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    wait_s: float | None = None,
) -> Decoded:
    """Decode ``data`` into an upright 8-bit RGB image, within the process's decode
    memory budget (:func:`vsearch.limits.decode_budget`).

    The pixel count is checked from the header before any pixel is decoded, so a
    tiny file that claims 100k x 100k pixels costs nothing. The decode then holds its
    estimated size of the budget (waiting ``wait_s``, None: the budget's own wait,
    then :class:`~vsearch.limits.Busy`) until the image is reduced.

    ``max_side``: the caller needs no more than this many pixels on the long side (a
    model's input with room to spare): larger images are reduced while decoding
    (JPEG's DCT scaling, 1/2 to 1/8, then a resize), but never below a quarter of
    ``max_side`` on the short side, so a panorama keeps the detail its short side has.
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
            target = reduced_size((width, height), max_side)
            if target is not None and image.format == "JPEG":
                image.draft(None, target)  # decodes at 1/2, 1/4 or 1/8 scale, still >= target
            estimate = decoded_bytes(image, width, height)
            with decode_budget().hold(estimate, source, wait_s):
                image.load()
                orientation = _orientation(image)  # a PNG's EXIF may follow its pixels
                image = _reduce(image, target)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(source, "not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(source, f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation/corruption as these
        raise ImageError(source, f"corrupt or truncated image: {exc}") from exc
    if target is not None and estimate >= TRIM_AFTER:
        trim_memory()  # the full-size pixels are freed: give them back (see TRIM_AFTER)
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
        width, height = (height, width) if orientation >= 5 else (width, height)
    return Decoded(to_rgb(image), width, height)


def reduced_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size an image of ``size`` is reduced to for ``max_side`` (see :func:`decode`),
    or None when it is small enough as it is."""
    if max_side is None:
        return None
    width, height = size
    scale = max(max_side / max(width, height), max_side / 4 / max(1, min(width, height)))
    if scale >= 1:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def decoded_bytes(image: Image.Image, width: int, height: int) -> int:
    """Memory a decode of ``image`` (opened, not loaded; perhaps drafted) may hold at
    its peak: the pixels at 4 bytes each (how PIL stores RGB), twice (room for one
    full-size copy: a mode conversion or the resize's first pass), plus a progressive
    JPEG's coefficients, which libjpeg keeps for the whole ``width`` x ``height``
    image whatever the scale it decodes at (measured: a 7700x5160 one decoded at 1/4
    scale peaked at 124 MB, baseline 17 MB)."""
    estimate = image.width * image.height * 4 * 2
    if image.format == "JPEG" and image.info.get("progressive"):
        estimate += _coefficient_bytes(image, width, height)
    return estimate


def _coefficient_bytes(image: Image.Image, width: int, height: int) -> int:
    """2 bytes per sample of each component, at its (chroma-subsampled) resolution."""
    layers = getattr(image, "layer", None) or [(band, 1, 1, 0) for band in image.getbands()]
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    return sum(2 * (width * layer[1] // h_max) * (height * layer[2] // v_max) for layer in layers)


def _reduce(image: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    if target is None or (image.width <= target[0] and image.height <= target[1]):
        return image
    if image.mode in ("1", "P", "PA"):  # PIL resizes these nearest-neighbour only
        image = to_rgb(image)
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


ORIENTATION = 0x0112  # the EXIF tag: how to turn the stored pixels to show them upright
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, read before reducing (a reduced copy has no EXIF); 1 when
    absent or unreadable: a broken EXIF block must not lose an otherwise good image."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "as stored"
        return 1


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
