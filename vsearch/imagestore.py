"""Image bytes kept in the index directory, addressed by their sha256: uploads
through the API, and local copies of URL images (for thumbnails)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from .errors import ProductNotFoundError
from .fetch import TRUSTED, FetchPolicy, fetch_url
from .fsutil import atomic_write_bytes
from .images import is_url, read_source

__all__ = ["ImageStore"]


class ImageStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, data: bytes, sha256: str) -> Path:
        """Store ``data`` (once) and return its path; the suffix is the image format."""
        existing = self.path(sha256)
        if existing is not None:
            return existing
        try:
            fmt = (Image.open(io.BytesIO(data)).format or "bin").lower()
        except OSError:
            fmt = "bin"
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{sha256}.{fmt}"
        atomic_write_bytes(path, data)
        return path

    def read(self, sha256: str, source: str, policy: FetchPolicy = TRUSTED) -> bytes:
        """An image's bytes: the stored copy if there is one, else its local file or URL."""
        stored = self.path(sha256)
        if stored is not None:
            return stored.read_bytes()
        if is_url(source):
            return fetch_url(source, policy)
        if not Path(source).is_file():  # moved or deleted since it was ingested
            raise ProductNotFoundError(f"the image file {source} is gone; re-ingest its product")
        return read_source(source)

    def path(self, sha256: str) -> Path | None:
        matches = sorted(self.folder.glob(f"{sha256}.*")) if self.folder.is_dir() else []
        return matches[0] if matches else None
