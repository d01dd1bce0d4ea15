"""The catalog's schema version: creating a new catalog's tables, and bringing an
older catalog up to date in place (:func:`upgrade`, run by
:meth:`vsearch.catalog.Catalog.open`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from . import attributes, changelog, keywords, variants
from .errors import IndexFormatError
from .vectorstore import FLOAT32

__all__ = ["SCHEMA_VERSION", "upgrade"]

# 1: (no meta.schema_version) base vectors inline in images.vector, other models' in
#    model_vectors with their image's sha256. 2: every model's in model_vectors.
# 3: the change log (image_changes and its triggers, vsearch.changelog).
# 4: the log has category moves too. 5: model_vectors.dtype (rows may be float16).
# 6: product_attributes (attribute filters, vsearch.attributes), filled from products.
# 7: product_keys and the product_text FTS5 index (keyword search, vsearch.keywords).
# 8: images.phash, image_links, variant_groups (near-duplicates, vsearch.variants).
SCHEMA_VERSION = 8
MIGRATE_CHUNK = 512  # rows per copy-then-delete step: the most the file grows by


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
            if "phash" not in _columns(conn, "images"):  # schemas 1-7
                conn.execute("ALTER TABLE images ADD COLUMN phash INTEGER")
            if "dtype" not in _columns(conn, "model_vectors"):  # schemas 2-4: every blob is float32
                conn.execute(f"ALTER TABLE model_vectors ADD COLUMN dtype INTEGER NOT NULL DEFAULT {FLOAT32}")
            if inline:
                _move_v1(conn, base_model)
                migrated = True
            if version < 4:  # schemas 1 and 2 kept no log, 3 no category moves: it begins now, after the move
                changelog.start(conn)
            if version < 6:  # the table is new: mirror the attributes products already have
                conn.execute("DELETE FROM product_attributes")
                conn.execute(attributes.BACKFILL)
            if version < 7:  # the keyword index is new: a stable key per product, then the index
                for statement in keywords.BACKFILL:
                    conn.execute(statement)
            if version < 8:  # every image waits for its near-duplicate links (computed with an index)
                for statement in variants.BACKFILL:
                    conn.execute(statement)
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
