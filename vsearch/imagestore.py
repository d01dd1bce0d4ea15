"""Image bytes kept in the index directory, addressed by their sha256: uploads
through the API, and local copies of URL images (for thumbnails)."""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from .errors import ProductNotFoundError
from .fetch import TRUSTED, FetchPolicy, fetch_url
from .fsutil import atomic_write_bytes
from .images import is_url, read_source

__all__ = ["GRACE_S", "ImageStore"]

GRACE_S = 60.0  # a stored copy this fresh may belong to a write not yet committed


class ImageStore:
    def __init__(self, folder: Path, thumbs: Path | None = None) -> None:
        self.folder = folder
        self.thumbs = thumbs if thumbs is not None else folder.parent / "thumbs"

    def put(self, data: bytes, sha256: str) -> Path:
        """Store ``data`` (once) and return its path; the suffix is the image format."""
        existing = self.path(sha256)
        if existing is not None:
            os.utime(existing)  # in use again: see forget
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
        """The stored copy of ``sha256``, found by trying each suffix :meth:`put` can
        give it (a stat each, common formats first): a glob would list the whole
        folder, one entry per stored image (157 ms at 100k files)."""
        for suffix in _suffixes():
            candidate = self.folder / f"{sha256}.{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def forget(self, unused_sha256s: Iterable[str], removed_image_ids: Iterable[int]) -> None:
        """Delete the stored copies no image uses any more and the thumbnails of
        removed images (their ids are never reused). A file another process is
        storing for a new image this very moment is spared: it was touched within
        :data:`GRACE_S` (``put`` touches a copy it reuses)."""
        now = time.time()
        for sha256 in unused_sha256s:
            path = self.path(sha256)
            if path is not None and now - _mtime(path) > GRACE_S:
                path.unlink(missing_ok=True)
        if self.thumbs.is_dir():
            for image_id in removed_image_ids:
                for thumb in self.thumbs.glob(f"{int(image_id)}-*.jpg"):
                    thumb.unlink(missing_ok=True)


@functools.cache
def _suffixes() -> tuple[str, ...]:
    """Every suffix :meth:`ImageStore.put` writes: PIL's format names, lowercased."""
    Image.init()
    common = ("jpeg", "png", "webp", "mpo", "gif", "bmp", "tiff", "bin")
    return common + tuple(sorted({f.lower() for f in Image.ID} - set(common)))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
