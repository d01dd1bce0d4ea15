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

The caller (:class:`vsearch.catalog.Catalog`) holds its lock around every call;
writes happen inside its transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import changelog
from .errors import IndexFormatError

__all__ = ["SCHEMA_VERSION", "VECTOR_SCHEMA", "VectorStore", "upgrade"]

# 1: (no meta.schema_version) base vectors inline in images.vector, other models' in
#    model_vectors with their image's sha256. 2: every model's in model_vectors.
# 3: the change log (image_changes and its triggers, vsearch.changelog).
# 4: the log has category moves too.
SCHEMA_VERSION = 4

VECTOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_vectors (
    model TEXT NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, image_id)
);
CREATE INDEX IF NOT EXISTS model_vectors_image ON model_vectors(image_id);
"""

DTYPE = np.float32  # kept exact: float16 would halve the bytes but move eval numbers
IMAGE_COLUMNS = "i.id, i.product_id, i.source, i.sha256, i.width, i.height"
MIGRATE_CHUNK = 512  # rows per copy-then-delete step: the most the file grows by


def encode(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=DTYPE).tobytes()


def decode(blobs: list[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, 0), dtype=DTYPE)
    return np.stack([np.frombuffer(b, dtype=DTYPE) for b in blobs])


class VectorStore:
    """The vector SQL of one catalog connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def put(self, model: str, image_id: int, vector: np.ndarray) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO model_vectors(model, image_id, vector) VALUES (?, ?, ?)", [model, image_id, encode(vector)]
        )

    def put_if_current(self, model: str, image_id: int, sha256: str, vector: np.ndarray) -> bool:
        """Store the vector only if the image still exists with content ``sha256``."""
        cursor = self.conn.execute(
            "INSERT OR REPLACE INTO model_vectors(model, image_id, vector) "
            "SELECT ?, id, ? FROM images WHERE id = ? AND sha256 = ?",
            [model, encode(vector), image_id, sha256],
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
        row = self.conn.execute("SELECT length(vector) FROM model_vectors WHERE model = ? LIMIT 1", [model]).fetchone()
        return int(row[0]) // np.dtype(DTYPE).itemsize if row else 0

    def page(self, model: str, after: int, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, vectors) of the first ``limit`` images after id ``after``; None past the end."""
        rows = self.conn.execute(
            "SELECT image_id, vector FROM model_vectors WHERE model = ? AND image_id > ? ORDER BY image_id LIMIT ?",
            [model, after, limit],
        ).fetchall()
        if not rows:
            return None
        return np.array([r[0] for r in rows], dtype=np.int64), decode([r[1] for r in rows])

    def sample(self, n: int, seed: int, model: str) -> np.ndarray:
        """Up to ``n`` vectors drawn uniformly (all if fewer), in id order. The draw
        is over the sorted ids with ``default_rng(seed)``, as it always was: the
        projection is fitted on this sample, so the same data must give the same one."""
        ids = [r[0] for r in self.conn.execute("SELECT image_id FROM model_vectors WHERE model = ? ORDER BY image_id", [model])]
        if len(ids) > n:
            ids = sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())
        blobs: list[bytes] = []
        for lo in range(0, len(ids), 500):
            chunk = ids[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT vector FROM model_vectors WHERE model = ? AND image_id IN ({marks}) ORDER BY image_id", [model, *chunk]
            )
            blobs += [r[0] for r in rows]
        return decode(blobs)

    def by_ids(self, model: str, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``image_ids`` that have a ``model`` vector, in id order."""
        found: list[int] = []
        blobs: list[bytes] = []
        for lo in range(0, len(image_ids), 500):
            chunk = image_ids[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT image_id, vector FROM model_vectors WHERE model = ? AND image_id IN ({marks}) ORDER BY image_id",
                [model, *chunk],
            )
            for image_id, blob in rows:
                found.append(int(image_id))
                blobs.append(blob)
        return np.array(found, dtype=np.int64), decode(blobs)

    def of_product(self, product_id: str, model: str) -> np.ndarray:
        rows = self.conn.execute(
            "SELECT v.vector FROM model_vectors v JOIN images i ON i.id = v.image_id "
            "WHERE v.model = ? AND i.product_id = ? ORDER BY v.image_id",
            [model, product_id],
        )
        return decode([r[0] for r in rows])


def upgrade(conn: sqlite3.Connection, schema: Sequence[str], base_model: str) -> None:
    """Create a new catalog's tables (``schema``: CREATE ... IF NOT EXISTS statements
    of the current layout), or bring an older catalog to SCHEMA_VERSION.

    All in one transaction: a crash midway leaves the old schema whole, never part
    of the new one, and the next open starts over. ``generation`` is left alone, so
    an index saved for the old catalog stays valid. Opening an up-to-date catalog
    reads one row and writes nothing. Foreign keys are off afterwards: the migration
    swaps tables that reference each other, which they would cascade through.
    """
    if _schema_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction, so before it
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(conn)  # again, under the write lock: another process may have done it
        if version > SCHEMA_VERSION:
            raise IndexFormatError(f"catalog schema {version} is newer than this vsearch's ({SCHEMA_VERSION}); upgrade vsearch")
        migrated = False
        if version < SCHEMA_VERSION:
            inline = "vector" in _columns(conn, "images")
            if inline:
                _set_aside_v1(conn)
            for statement in schema:
                conn.execute(statement)
            if inline:
                _move_v1(conn, base_model)
                migrated = True
            changelog.start(conn)  # schemas 1 and 2 kept no log: it begins now, after the move
            conn.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [str(SCHEMA_VERSION)],
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if migrated:
        # The move went through the WAL; fold it into the database file and give the
        # WAL's disk space back now rather than at some later checkpoint.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _schema_version(conn: sqlite3.Connection) -> int:
    """meta.schema_version; 0 for a catalog without one (new, or schema 1)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


# Schema 1 -> 2 ----------------------------------------------------------------
# Schema 1 kept the base vector inline in images.vector (so each images page held a
# single row) and the other models' in model_vectors(model, image_id, sha256,
# vector). Both tables are rebuilt rather than altered in place (ALTER TABLE DROP
# COLUMN would rewrite each row where it is and leave the images table spread over
# one mostly empty page per image until a VACUUM).


def _set_aside_v1(conn: sqlite3.Connection) -> None:
    """Rename schema 1's tables out of the way (their indexes too: index names are
    global) so the current schema can be created under the real names."""
    conn.execute("DROP INDEX IF EXISTS images_product")
    conn.execute("ALTER TABLE images RENAME TO images_v1")
    if _columns(conn, "model_vectors"):  # a format-1 catalog never had one
        conn.execute("DROP INDEX IF EXISTS model_vectors_image")
        conn.execute("ALTER TABLE model_vectors RENAME TO model_vectors_v1")


def _move_v1(conn: sqlite3.Connection, base_model: str) -> None:
    """Copy schema 1's rows into the new tables, then drop the old ones."""
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images_v1'").fetchone()
    conn.execute(
        "INSERT INTO images(id, product_id, source, sha256, width, height, created_at, updated_at) "
        "SELECT id, product_id, source, sha256, width, height, created_at, updated_at FROM images_v1 ORDER BY id"
    )
    if _columns(conn, "model_vectors_v1"):
        # put_image deleted these rows whenever the content changed, so each should
        # match its image; one that does not is stale and is left behind.
        conn.execute(
            "INSERT INTO model_vectors(model, image_id, vector) SELECT m.model, m.image_id, m.vector "
            "FROM model_vectors_v1 m JOIN images_v1 i ON i.id = m.image_id AND i.sha256 = m.sha256 "
            "ORDER BY m.model, m.image_id"
        )
        conn.execute("DROP TABLE model_vectors_v1")
    # A chunk at a time, each chunk's old rows deleted right after their copy: the
    # pages that frees hold the next chunk's copies, so the file grows by little
    # more than the new images table instead of by every vector.
    top = conn.execute("SELECT max(id) FROM images_v1").fetchone()[0] or 0
    for lo in range(0, top + 1, MIGRATE_CHUNK):
        hi = lo + MIGRATE_CHUNK - 1
        conn.execute(
            "INSERT INTO model_vectors(model, image_id, vector) "
            "SELECT ?, id, vector FROM images_v1 WHERE id BETWEEN ? AND ? AND vector IS NOT NULL ORDER BY id",
            [base_model, lo, hi],
        )
        conn.execute("DELETE FROM images_v1 WHERE id BETWEEN ? AND ?", [lo, hi])
    conn.execute("DROP TABLE images_v1")
    # FAISS ids are never reused: carry AUTOINCREMENT's high-water mark over (it can
    # be above max(id) when the newest images were removed).
    if sequence is not None:
        mark = max(int(sequence[0]), conn.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0])
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'images'")
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('images', ?)", [mark])
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise IndexFormatError(f"catalog migration found rows without their parent: {broken[:5]}")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
