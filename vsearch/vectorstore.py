"""Raw vectors of every model version, in the catalog database's ``model_vectors``.

One row per (model, image): ``base`` (the index's original model) and each
fine-tuned version are stored, read and deleted the same way. A row is always for
its image's current content: :meth:`VectorStore.forget_image` runs whenever an
image's content changes and :meth:`VectorStore.put_if_current` refuses a vector of
older content, so the table needs no content hash of its own.

Layout (measured with ``scripts/bench_storage.py``): a rowid table, primary key
(model, image_id), plus an index on image_id, in SQLite's default 4 KiB pages.

* Out of ``images``: there each ~7 KB blob left room for one row per page, so any
  scan of the images table read every vector's leaf page.
* Not WITHOUT ROWID: such a table keeps only ~1 KB of a row in its leaf, so each
  vector spills into two overflow pages (7% larger, no faster to scan, slower to
  delete and sample).
* The image_id index serves the ON DELETE CASCADE and content-change deletes,
  which would otherwise scan the whole table for each image.
* Not 64 KiB pages: they pack vectors 10% tighter and keep the small tables in far
  fewer pages, but a one-image commit writes 11 times the bytes, and a search's row
  lookups took twice as long on a 1M-image catalog (each SQLite cache miss copies a
  whole page).

Encoding: each row's ``dtype`` says how its blob is encoded: 0 float32 (the column's
default, so every row written before schema 5 is read as it was written), 1 float16.
New rows are float16 unless the catalog is opened with ``raw_vectors="float32"``
(:class:`vsearch.config.IndexConfig`): 3.5 KB instead of 7 KB for the default
model's 1752 numbers, one 4 KiB page per row instead of a page and an overflow page.
Measured with ``scripts/bench_vector_dtype.py`` on the grocery data set: no recall
moved. A vector float16 would not hold to within :data:`FLOAT16_TOLERANCE` (out of
range, or so small that it falls in float16's subnormals) is kept as float32. Every
read returns float32, whatever the rows' encodings.

Sampling (:meth:`VectorStore.sample`, the projection fit's and IVF training's
sample) costs what the sample costs, not what the table does: random image ids are
drawn (seeded) from the model's id range, looked up in the primary key, and only
the chosen rows' vectors are read, in id order.

The caller (:class:`vsearch.catalog.Catalog`) holds its lock around every call;
writes happen inside its transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "ENCODINGS",
    "FLOAT16",
    "FLOAT32",
    "VECTOR_SCHEMA",
    "VectorStore",
    "decode",
    "encode",
    "encode_as",
    "encoding",
    "round_trip",
]

VECTOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    dtype INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, image_id)
);
CREATE INDEX IF NOT EXISTS model_vectors_image ON model_vectors(image_id);
"""

FLOAT32, FLOAT16 = 0, 1  # model_vectors.dtype
ENCODINGS = {"float32": FLOAT32, "float16": FLOAT16}  # IndexConfig.raw_vectors -> dtype
_NUMPY: dict[int, np.dtype[Any]] = {FLOAT32: np.dtype("<f4"), FLOAT16: np.dtype("<f2")}
FLOAT16_TOLERANCE = 1e-3  # relative L2 error past which a vector is kept as float32
IMAGE_COLUMNS = "i.id, i.product_id, i.source, i.sha256, i.width, i.height"
CHUNK = 500  # ids per IN (...) query
Transform = Callable[[np.ndarray], np.ndarray]
SCAN_SPAN = 4  # sampling reads a model's ids rather than drawing them when that is at most this many per sampled


def encoding(raw_vectors: str) -> int:
    """The dtype code of a :class:`vsearch.config.IndexConfig` ``raw_vectors`` setting."""
    if raw_vectors not in ENCODINGS:
        raise ConfigError(f"raw_vectors must be one of {sorted(ENCODINGS)}, not {raw_vectors!r}")
    return ENCODINGS[raw_vectors]


def encode(vector: np.ndarray) -> bytes:
    """``vector`` as a float32 blob: the encoding of dtype 0, the column's default."""
    return np.ascontiguousarray(vector, dtype=_NUMPY[FLOAT32]).tobytes()


def encode_as(vector: np.ndarray, dtype: int) -> tuple[bytes, int]:
    """(blob, dtype) of ``vector`` in encoding ``dtype``; float32 where float16 would
    not hold it (see :func:`round_trip`)."""
    exact = np.ascontiguousarray(vector, dtype=_NUMPY[FLOAT32])
    if dtype == FLOAT16:
        half = _half(exact[None])
        if _holds(half, exact[None])[0]:
            return half[0].tobytes(), FLOAT16
    return exact.tobytes(), FLOAT32


def round_trip(vectors: np.ndarray, dtype: int) -> np.ndarray:
    """What storing the rows of ``vectors`` in encoding ``dtype`` and reading them
    back gives: float16 rounding, except for rows it would move by more than
    FLOAT16_TOLERANCE of their norm (out of float16's range, or in its subnormals),
    which are kept exact."""
    exact = np.asarray(vectors, dtype=np.float32)
    if dtype != FLOAT16 or exact.size == 0:
        return exact
    flat = exact.reshape(-1, exact.shape[-1])
    half = _half(flat)
    kept = np.where(_holds(half, flat)[:, None], half.astype(np.float32), flat)
    return kept.reshape(exact.shape)


def _half(exact: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return exact.astype(_NUMPY[FLOAT16])


def _holds(half: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per row: does ``half`` hold ``exact`` to within FLOAT16_TOLERANCE of its norm?"""
    with np.errstate(over="ignore", invalid="ignore"):
        error = np.linalg.norm(half.astype(np.float32) - exact, axis=1)
        return np.asarray(error <= FLOAT16_TOLERANCE * np.linalg.norm(exact, axis=1))


def decode(blobs: Sequence[bytes], dtypes: Sequence[int]) -> np.ndarray:
    """float32 rows of ``blobs``, each encoded as its ``dtypes`` entry says."""
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    if len(set(dtypes)) == 1 and len({len(b) for b in blobs}) == 1:
        rows = np.frombuffer(b"".join(blobs), dtype=_NUMPY[dtypes[0]]).reshape(len(blobs), -1)
    else:
        rows = np.stack([np.frombuffer(b, dtype=_NUMPY[d]).astype(np.float32) for b, d in zip(blobs, dtypes)])
    return rows.astype(np.float32)  # a copy: writable, whatever it was read from


class VectorStore:
    """The vector SQL of one catalog connection; new rows are written in encoding ``dtype``."""

    def __init__(self, conn: sqlite3.Connection, dtype: int = FLOAT16) -> None:
        self.conn = conn
        self.dtype = dtype

    def put(self, model: str, image_id: int, vector: np.ndarray) -> None:
        blob, dtype = encode_as(vector, self.dtype)
        self.conn.execute(
            "INSERT OR REPLACE INTO model_vectors(model, image_id, vector, dtype) VALUES (?, ?, ?, ?)",
            [model, image_id, blob, dtype],
        )

    def put_if_current(self, model: str, image_id: int, sha256: str, vector: np.ndarray) -> bool:
        """Store the vector only if the image still exists with content ``sha256``."""
        blob, dtype = encode_as(vector, self.dtype)
        cursor = self.conn.execute(
            "INSERT OR REPLACE INTO model_vectors(model, image_id, vector, dtype) "
            "SELECT ?, id, ?, ? FROM images WHERE id = ? AND sha256 = ?",
            [model, blob, dtype, image_id, sha256],
        )
        return cursor.rowcount > 0

    def forget_image(self, image_id: int) -> None:
        """Every model's vector of an image whose content is being replaced."""
        self.conn.execute("DELETE FROM model_vectors WHERE image_id = ?", [image_id])

    def drop(self, model: str) -> None:
        self.conn.execute("DELETE FROM model_vectors WHERE model = ?", [model])

    def missing(self, model: str) -> list[tuple[Any, ...]]:
        """Image rows (id, product_id, source, sha256, width, height) with no vector from ``model``."""
        return self.conn.execute(
            f"SELECT {IMAGE_COLUMNS} FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM model_vectors v WHERE v.model = ? AND v.image_id = i.id) ORDER BY i.id",
            [model],
        ).fetchall()

    def dim(self, model: str) -> int:
        row = self.conn.execute("SELECT length(vector), dtype FROM model_vectors WHERE model = ? LIMIT 1", [model]).fetchone()
        return int(row[0]) // _NUMPY[row[1]].itemsize if row else 0

    def page(self, model: str, after: int, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, vectors) of the first ``limit`` images after id ``after``; None past the end."""
        rows = self.conn.execute(
            "SELECT image_id, vector, dtype FROM model_vectors WHERE model = ? AND image_id > ? ORDER BY image_id LIMIT ?",
            [model, after, limit],
        ).fetchall()
        if not rows:
            return None
        return np.array([r[0] for r in rows], dtype=np.int64), decode([r[1] for r in rows], [r[2] for r in rows])

    def sample(self, n: int, seed: int, model: str, transform: Transform | None = None) -> np.ndarray:
        """Up to ``n`` vectors drawn uniformly without replacement (all if fewer), in id
        order: those of :meth:`sample_ids`, read a chunk at a time into one array (each
        chunk passed through ``transform`` first, if given: a projection, so that only
        the projected sample is ever held whole), all in one read transaction (the
        caller's, if one is open)."""
        own = not self.conn.in_transaction
        if own:
            self.conn.execute("BEGIN")
        try:
            return self._sample(n, seed, model, transform)
        finally:
            if own:
                self.conn.execute("COMMIT")

    def _sample(self, n: int, seed: int, model: str, transform: Transform | None) -> np.ndarray:
        ids = self.sample_ids(n, seed, model)
        out: np.ndarray | None = None
        filled = 0
        for chunk in _chunks(ids):
            rows = self.conn.execute(
                f"SELECT vector, dtype FROM model_vectors WHERE model = ? AND image_id IN ({_marks(chunk)}) ORDER BY image_id",
                [model, *chunk],
            ).fetchall()
            block = decode([r[0] for r in rows], [r[1] for r in rows])
            if transform is not None:
                block = transform(block)
            if out is None:
                out = np.empty((len(ids), block.shape[1]), dtype=np.float32)
            out[filled : filled + len(block)] = block
            filled += len(block)
        return np.zeros((0, 0), dtype=np.float32) if out is None else out[:filled]

    def sample_ids(self, n: int, seed: int, model: str) -> list[int]:
        """Up to ``n`` of the image ids that have a ``model`` vector, uniformly without
        replacement with ``default_rng(seed)`` (the same data gives the same sample),
        ascending, at a cost that follows ``n``, not the table: ids are drawn from the
        model's id range and kept where they have a vector (:meth:`_draw`). Where the
        range is at most SCAN_SPAN times ``n``, or its ids prove too sparse for drawing
        to pay, the model's ids are read instead (from the primary key, no vector)."""
        if n <= 0:
            return []
        first = self.conn.execute(
            "SELECT image_id FROM model_vectors WHERE model = ? ORDER BY image_id LIMIT 1", [model]
        ).fetchone()
        if first is None:
            return []
        last = self.conn.execute(
            "SELECT image_id FROM model_vectors WHERE model = ? ORDER BY image_id DESC LIMIT 1", [model]
        ).fetchone()
        rng = np.random.default_rng(seed)
        span = int(last[0]) - int(first[0]) + 1
        drawn = self._draw(rng, model, int(first[0]), span, n) if span > SCAN_SPAN * n else None
        if drawn is not None:
            return sorted(drawn)
        ids = [r[0] for r in self.conn.execute("SELECT image_id FROM model_vectors WHERE model = ? ORDER BY image_id", [model])]
        return ids if len(ids) <= n else sorted(rng.choice(ids, n, replace=False).tolist())

    def _draw(self, rng: np.random.Generator, model: str, first: int, span: int, n: int) -> list[int] | None:
        """Rejection sampling: ids drawn uniformly from ``[first, first + span)``, each
        at most once, kept where ``model`` has a vector, until ``n`` are kept (a uniform
        sample of the ids that have one); None once more than SCAN_SPAN * ``n`` were
        tried (the ids are sparse in their range)."""
        kept: list[int] = []
        tried: set[int] = set()
        while len(kept) < n:
            if len(tried) > SCAN_SPAN * n:
                return None
            need = n - len(kept)
            rate = (len(kept) + 1) / (len(tried) + 1)  # the share of tried ids that had a vector
            draws = (rng.integers(0, span, size=int(need / rate * 1.1) + 64) + first).tolist()
            fresh = [i for i in dict.fromkeys(draws) if i not in tried]
            tried.update(fresh)
            present: set[int] = set()
            for chunk in _chunks(fresh):
                rows = self.conn.execute(
                    f"SELECT image_id FROM model_vectors WHERE model = ? AND image_id IN ({_marks(chunk)})", [model, *chunk]
                )
                present.update(r[0] for r in rows)
            kept += [i for i in fresh if i in present][:need]
        return kept

    def by_ids(self, model: str, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``image_ids`` that have a ``model`` vector, in id order."""
        found: list[int] = []
        blobs: list[bytes] = []
        dtypes: list[int] = []
        for chunk in _chunks(image_ids):
            rows = self.conn.execute(
                f"SELECT image_id, vector, dtype FROM model_vectors WHERE model = ? AND image_id IN ({_marks(chunk)}) "
                "ORDER BY image_id",
                [model, *chunk],
            )
            for image_id, blob, dtype in rows:
                found.append(int(image_id))
                blobs.append(blob)
                dtypes.append(dtype)
        return np.array(found, dtype=np.int64), decode(blobs, dtypes)

    def of_product(self, product_id: str, model: str) -> np.ndarray:
        rows = self.conn.execute(
            "SELECT v.vector, v.dtype FROM model_vectors v JOIN images i ON i.id = v.image_id "
            "WHERE v.model = ? AND i.product_id = ? ORDER BY v.image_id",
            [model, product_id],
        ).fetchall()
        return decode([r[0] for r in rows], [r[1] for r in rows])


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for lo in range(0, len(ids), CHUNK):
        yield ids[lo : lo + CHUNK]


def _marks(chunk: list[int]) -> str:
    return ",".join("?" * len(chunk))
