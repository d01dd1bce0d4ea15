"""The catalog's change log: which images' vectors changed in which generation.

SQLite triggers append one row per vector stored, replaced or deleted (and per
image deleted, and per image of a product moved to another category or whose
attributes changed) to
``image_changes``, inside the very transaction that made the change, so the log
can never disagree with the catalog, whoever wrote it: this process, another
``vsearch`` process, or a migration. A row's generation is the
one the transaction commits as (the catalog bumps ``meta.generation`` by one per
write transaction).

This is what lets an index follow the catalog at the cost of the change, not of
the catalog (:meth:`vsearch.writer.IndexWriter.catch_up`): a served index that
reflects generation ``g`` is brought up to date by removing and re-adding just the
images logged after ``g``. It is how a server picks up a ``vsearch ingest`` running
beside it, how two writer processes see each other's work, and how an open after a
crash replays what the last saved index lacks instead of rebuilding it.

The log is pruned up to a saved index's generation, keeping :data:`KEEP`
generations of slack so that other processes a little behind can still follow it;
``meta.changes_floor`` records how far it was pruned. A process further behind
than that reloads the saved index (or rebuilds) instead.
"""

from __future__ import annotations

import sqlite3

__all__ = ["KEEP", "STATEMENTS", "changed_since", "floor", "prune", "start"]

KEEP = 10_000  # generations of log kept behind the newest saved index

_NEXT_GENERATION = "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'generation'), 0) + 1"

STATEMENTS = [
    "CREATE TABLE IF NOT EXISTS image_changes (generation INTEGER NOT NULL, image_id INTEGER NOT NULL, model TEXT)",
    "CREATE INDEX IF NOT EXISTS image_changes_generation ON image_changes(generation)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS log_vector_{event.lower()} AFTER {event} ON model_vectors BEGIN "
        f"INSERT INTO image_changes(generation, image_id, model) VALUES ({_NEXT_GENERATION}, {row}.image_id, {row}.model); END"
        for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
    # an image's own deletion (its vectors cascade, but say it once whatever the model)
    "CREATE TRIGGER IF NOT EXISTS log_image_delete AFTER DELETE ON images BEGIN "
    f"INSERT INTO image_changes(generation, image_id, model) VALUES ({_NEXT_GENERATION}, OLD.id, NULL); END",
    # a product moved to another category: its images' category filters change
    "CREATE TRIGGER IF NOT EXISTS log_product_category AFTER UPDATE OF category ON products "
    "WHEN OLD.category IS NOT NEW.category BEGIN "
    f"INSERT INTO image_changes(generation, image_id, model) SELECT {_NEXT_GENERATION}, id, NULL "
    "FROM images WHERE product_id = NEW.id; END",
    # its attributes changed: what attribute filters allow of its images may change
    "CREATE TRIGGER IF NOT EXISTS log_product_attributes AFTER UPDATE OF attributes ON products "
    "WHEN OLD.attributes IS NOT NEW.attributes BEGIN "
    f"INSERT INTO image_changes(generation, image_id, model) SELECT {_NEXT_GENERATION}, id, NULL "
    "FROM images WHERE product_id = NEW.id; END",
]


def start(conn: sqlite3.Connection) -> None:
    """Mark the log as beginning at the current generation (a new or migrated
    catalog: nothing before it was logged, and a migration's own copying is not a
    change). Inside the caller's transaction."""
    conn.execute("DELETE FROM image_changes")
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) "
        "VALUES ('changes_floor', COALESCE((SELECT value FROM meta WHERE key = 'generation'), '0'))"
    )


def floor(conn: sqlite3.Connection) -> int:
    """The newest generation whose changes are no longer all in the log."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'changes_floor'").fetchone()
    return int(row[0]) if row else 0


def changed_since(conn: sqlite3.Connection, generation: int, model: str) -> list[int] | None:
    """Ids of the images whose ``model`` vectors may differ from what they were at
    ``generation`` (sorted); None if the log no longer reaches back that far."""
    if generation < floor(conn):
        return None
    rows = conn.execute(
        "SELECT DISTINCT image_id FROM image_changes WHERE generation > ? AND (model IS NULL OR model = ?) ORDER BY image_id",
        [generation, model],
    )
    return [int(r[0]) for r in rows]


def prune(conn: sqlite3.Connection, saved_generation: int) -> None:
    """Forget changes older than :data:`KEEP` generations before ``saved_generation``
    (the generation an index was just saved at). Inside the caller's transaction."""
    upto = saved_generation - KEEP
    if upto <= floor(conn):
        return
    conn.execute("DELETE FROM image_changes WHERE generation <= ?", [upto])
    conn.execute("UPDATE meta SET value = ? WHERE key = 'changes_floor'", [str(upto)])
