"""A bounded, uniform sample of the shoppers' query embeddings, for refitting the
projection on the photos shoppers actually send (:func:`vsearch.refit.refit_from_queries`).

What it stores: the raw vectors of image queries (uploads and image URLs) from the
model version that embedded them: never the images, their URLs or anything about
who sent them. At most ``capacity`` vectors (float16 on disk: 3.5 KB each for the
default model, 7 MB at the default 2,000), drawn uniformly from every query seen
(reservoir sampling, Vitter's algorithm R, seeded); a photo sent again while it is
in the sample (the same vector) is not counted again. Saved atomically as
``DIR/query_vectors.npz``; a reservoir for another model version or dimension is
started afresh.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from pathlib import Path

import numpy as np

from .errors import IndexFormatError
from .fsutil import atomic_write_bytes

__all__ = ["QueryReservoir"]


class QueryReservoir:
    """Up to ``capacity`` raw query vectors of ``model``, a uniform sample of the ``seen``."""

    def __init__(self, capacity: int, model: str, seed: int = 0) -> None:
        self.capacity = capacity
        self.model = model
        self.seen = 0
        self._rows: list[np.ndarray] = []
        self._digests: dict[bytes, int] = {}  # the sample's photos: digest -> row
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.dirty = False  # added to since the last save

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, raw: np.ndarray, model: str) -> None:
        """Offer raw query vectors (rows) embedded by ``model``; another model's start
        the sample afresh (the old vectors would not fit the served version)."""
        raw = np.asarray(raw, dtype=np.float32)
        raw = raw.reshape(-1, raw.shape[-1]) if raw.size else raw.reshape(0, 0)
        if self.capacity <= 0 or len(raw) == 0:
            return
        with self._lock:
            if model != self.model or (self._rows and self._rows[0].shape != raw.shape[1:]):
                self.model, self.seen, self._rows, self._digests = model, 0, [], {}
            for row in raw:
                digest = _digest(row)
                if digest in self._digests:
                    continue  # a photo in the sample sent again (a retry, a bot): one vote, or a few could steer the fit
                self.seen += 1
                if len(self._rows) < self.capacity:
                    self._rows.append(row.copy())
                    self._digests[digest] = len(self._rows) - 1
                else:
                    slot = int(self._rng.integers(0, self.seen))
                    if slot < self.capacity:
                        del self._digests[_digest(self._rows[slot])]
                        self._rows[slot] = row.copy()
                        self._digests[digest] = slot
            self.dirty = True

    def vectors(self) -> np.ndarray:
        """The sample, float32 (rows), in no particular order."""
        with self._lock:
            return np.stack(self._rows) if self._rows else np.zeros((0, 0), dtype=np.float32)

    def save(self, path: Path) -> None:
        with self._lock:
            rows = np.stack(self._rows).astype(np.float16) if self._rows else np.zeros((0, 0), dtype=np.float16)
            seen, model = self.seen, self.model
            self.dirty = False
        buffer = io.BytesIO()
        np.savez(buffer, vectors=rows, seen=np.array(seen), model=np.array(model))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, capacity: int, model: str, seed: int = 0) -> QueryReservoir:
        """The reservoir saved at ``path`` (an empty one if there is none, or it holds
        another model's vectors); kept to ``capacity``."""
        reservoir = cls(capacity, model, seed)
        if not path.exists():
            return reservoir
        try:
            with np.load(path) as data:
                saved_model, seen, rows = str(data["model"]), int(data["seen"]), data["vectors"].astype(np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise IndexFormatError(f"{path}: damaged query sample ({type(exc).__name__}); delete it to start afresh") from None
        if saved_model == model and capacity > 0:
            reservoir._rows = list(rows[:capacity])
            reservoir._digests = {_digest(r): i for i, r in enumerate(reservoir._rows)}
            reservoir.seen = max(seen, len(reservoir._rows))
        return reservoir


def _digest(row: np.ndarray) -> bytes:
    """Identifies a photo's vector: the model gives the same photo the same float32
    vector. (A sample read back from its float16 file no longer matches photos sent
    before the restart: after one, a photo may count once more.)"""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=8).digest()
