from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vsearch.errors import ImageError
from vsearch.images import decode_image, read_source

from .conftest import make_image


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_roundtrip() -> None:
    image = decode_image(encode(make_image(1), "JPEG"))
    assert image.mode == "RGB" and image.size == (96, 80)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (encode(make_image(2), "JPEG")[:300], "corrupt or truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an image"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_image(data, "x.jpg")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    huge = encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageError, match="too large: 5000x5000"):
        decode_image(huge, "bomb.png", max_pixels=1_000_000)


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode_image(encode(rgba, "PNG"))
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_palette_with_transparency_becomes_white() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((1, 1), 1)
    data = encode(palette, "PNG", transparency=0)
    image = decode_image(data)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (200, 10, 10)


def test_cmyk_greyscale_and_16_bit() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    r, g, b = cmyk.getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    grey = decode_image(encode(Image.new("L", (4, 4), 128), "PNG"))
    assert grey.getpixel((0, 0)) == (128, 128, 128)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert decode_image(encode(sixteen, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_missing_file_and_unreachable_url() -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        read_source("/nonexistent/x.jpg")
    with pytest.raises(ImageError, match="download failed"):
        read_source("http://127.0.0.1:9/x.jpg", timeout=2)
