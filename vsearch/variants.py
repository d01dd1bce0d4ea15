"""The catalog's near-duplicate links and the product variant groups they imply.

Catalog schema 8 keeps (rules and calibration in :mod:`vsearch.duplicates`):

* ``images.phash``: each image's 64-bit perceptual hash (signed in SQLite; NULL where
  no image was decoded, e.g. an import of precomputed vectors);
* ``image_links(a, b)``: near-duplicate image pairs, ``a < b``, found for each new
  image among its nearest images in the served index (:mod:`vsearch.linking`);
* ``variant_groups(product_id, group_id)``: products that share a group with at
  least one other product; a group's id is its smallest product id;
* ``variant_dirty(group_id)``: groups a deletion touched, filled by triggers (so
  every path that deletes an image or a product is covered) and regrouped by
  :func:`settle` before the write commits.

Every change costs the groups it touches: a new link merges two groups
(:func:`duplicates.merge`), a deletion recomputes the one group that lost a member
(:func:`duplicates.regroup`). Nothing here scans the catalog.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import duplicates

__all__ = [
    "BACKFILL",
    "PENDING_BATCH",
    "Select",
    "STATEMENTS",
    "LISTED",
    "Membership",
    "VariantGroup",
    "list_groups",
    "from_signed",
    "groups_of",
    "link",
    "on",
    "rows_in",
    "settle",
    "store_phashes",
    "to_signed",
]

# An image's links go, and its product's group is marked for settle() to regroup.
_UNLINK_OLD = """INSERT OR IGNORE INTO variant_dirty(group_id)
            SELECT group_id FROM variant_groups WHERE product_id = OLD.product_id;
        DELETE FROM image_links WHERE a = OLD.id;
        DELETE FROM image_links WHERE b = OLD.id;"""

STATEMENTS = [
    "CREATE TABLE IF NOT EXISTS image_links (a INTEGER NOT NULL, b INTEGER NOT NULL, PRIMARY KEY (a, b)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS image_links_b ON image_links(b)",
    "CREATE TABLE IF NOT EXISTS variant_groups (product_id TEXT PRIMARY KEY, group_id TEXT NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS variant_groups_group ON variant_groups(group_id)",
    "CREATE TABLE IF NOT EXISTS variant_dirty (group_id TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS variant_pending (image_id INTEGER PRIMARY KEY)",
    # Every stored image waits here until its links are computed, whatever path stored it.
    """CREATE TRIGGER IF NOT EXISTS images_pending AFTER INSERT ON images BEGIN
        INSERT OR IGNORE INTO variant_pending(image_id) VALUES (NEW.id);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS images_relink AFTER UPDATE OF sha256 ON images WHEN OLD.sha256 != NEW.sha256 BEGIN
        {_UNLINK_OLD}
        UPDATE images SET phash = NULL WHERE id = NEW.id;
        INSERT OR IGNORE INTO variant_pending(image_id) VALUES (NEW.id);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS images_unlink AFTER DELETE ON images BEGIN
        {_UNLINK_OLD}
        DELETE FROM variant_pending WHERE image_id = OLD.id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS products_ungroup AFTER DELETE ON products BEGIN
        INSERT OR IGNORE INTO variant_dirty(group_id)
            SELECT group_id FROM variant_groups WHERE product_id = OLD.id;
        DELETE FROM variant_groups WHERE product_id = OLD.id;
    END""",
]
BACKFILL = ["INSERT OR IGNORE INTO variant_pending(image_id) SELECT id FROM images"]  # schema 8: link what exists

PENDING_BATCH = 1024  # images linked per transaction when catching up
RELINK_MAX = 64  # a group this small has its images linked again when it loses a member (settle)
LISTED = 50  # members a hit lists of its group (its size is always given)
_SIGN = 1 << 63
Select = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]  # runs one query: (sql, params) -> rows


def to_signed(h: int | None) -> int | None:
    """A 64-bit hash as SQLite's signed INTEGER holds it."""
    return None if h is None else h - (1 << 64) if h >= _SIGN else h


def from_signed(v: int | None) -> int | None:
    return None if v is None else v + (1 << 64) if v < 0 else v


def store_phashes(conn: sqlite3.Connection, rows: Iterable[tuple[int, int | None]]) -> None:
    """Record images' perceptual hashes (image id, hash)."""
    conn.executemany("UPDATE images SET phash = ? WHERE id = ?", [(to_signed(h), i) for i, h in rows if h is not None])


def link(conn: sqlite3.Connection, pairs: set[tuple[int, int]]) -> None:
    """Store near-duplicate image pairs and merge the variant groups they join (inside
    the caller's transaction)."""
    if not pairs:
        return
    conn.executemany("INSERT OR IGNORE INTO image_links(a, b) VALUES (?, ?)", sorted(pairs))
    images = sorted({i for pair in pairs for i in pair})
    product_of = _products_of(conn, images)
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        if a in product_of and b in product_of:
            neighbours.setdefault(a, []).append(b)
    edges = duplicates.product_links(neighbours, product_of.__getitem__)
    changes = duplicates.merge(edges, lambda p: _group_of(conn, p), lambda g: _members(conn, g))
    conn.executemany("INSERT OR REPLACE INTO variant_groups(product_id, group_id) VALUES (?, ?)", changes.items())


def settle(conn: sqlite3.Connection) -> list[int]:
    """Regroup what deletions left (``variant_dirty``): each touched group splits into
    its remaining connected parts; a part of one product leaves the table.

    The images of a touched group of up to RELINK_MAX products go back to pending and
    are returned, for the caller to link again: each image was linked to at most ``k``
    others when it was stored, so the link that held two members together may have
    gone with the removed image while they are still near-duplicates of each other
    (many products sharing one picture). A larger group keeps the links it has."""
    dirty = [r[0] for r in conn.execute("SELECT group_id FROM variant_dirty")]
    requeue: list[int] = []
    for group in dirty:
        members = _members(conn, group)
        if len(members) <= RELINK_MAX:
            for product in members:
                requeue += [r[0] for r in conn.execute("SELECT id FROM images WHERE product_id = ?", [product])]
        fresh = duplicates.regroup(members, lambda p: _product_neighbours(conn, p))
        sizes: dict[str, int] = {}
        for g in fresh.values():
            sizes[g] = sizes.get(g, 0) + 1
        conn.executemany("DELETE FROM variant_groups WHERE product_id = ?", [(p,) for p, g in fresh.items() if sizes[g] == 1])
        conn.executemany(
            "UPDATE variant_groups SET group_id = ? WHERE product_id = ?", [(g, p) for p, g in fresh.items() if sizes[g] > 1]
        )
    if dirty:
        conn.execute("DELETE FROM variant_dirty")
    conn.executemany("INSERT OR IGNORE INTO variant_pending(image_id) VALUES (?)", [(i,) for i in requeue])
    return requeue


@dataclass(frozen=True)
class Membership:
    """A product's variant group: its id, its first LISTED members (sorted) and its size."""

    group_id: str
    members: list[str]
    size: int


def groups_of(select: Select, product_ids: Sequence[str]) -> dict[str, Membership]:
    """The variant groups of those of ``product_ids`` in one; ``select`` runs a query
    (:meth:`vsearch.catalog.Catalog.select` on a search's path). Costs the products
    asked about and LISTED members per group, however large the group (a shared
    placeholder picture)."""
    sql = "SELECT product_id, group_id FROM variant_groups WHERE product_id IN ({marks})"
    group_of: dict[str, str] = {p: g for p, g in rows_in(select, sql, sorted(set(product_ids)))}
    groups: dict[str, Membership] = {}
    for group in sorted(set(group_of.values())):
        members = [r[0] for r in select(_MEMBERS, [group, LISTED])]
        size = (
            len(members)
            if len(members) < LISTED
            else select("SELECT count(*) FROM variant_groups WHERE group_id = ?", [group])[0][0]
        )
        groups[group] = Membership(group, members, size)
    return {p: groups[g] for p, g in group_of.items()}


_MEMBERS = "SELECT product_id FROM variant_groups WHERE group_id = ? ORDER BY product_id LIMIT ?"


def rows_in(select: Select, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The rows of ``sql``, whose ``{marks}`` is an IN list, over ``values``, 500 at a
    time (SQLite's limit on bound parameters)."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(values), 500):
        chunk = list(values[start : start + 500])
        rows += select(sql.format(marks=",".join("?" * len(chunk))), chunk)
    return rows


def on(conn: sqlite3.Connection) -> Select:
    """``conn`` as a :data:`Select` (the writer's connection, inside its transaction)."""
    return lambda sql, params: conn.execute(sql, list(params)).fetchall()


def _products_of(conn: sqlite3.Connection, images: list[int]) -> dict[int, str]:
    return {i: p for i, p in rows_in(on(conn), "SELECT id, product_id FROM images WHERE id IN ({marks})", images)}


def _group_of(conn: sqlite3.Connection, product: str) -> str | None:
    row = conn.execute("SELECT group_id FROM variant_groups WHERE product_id = ?", [product]).fetchone()
    return None if row is None else str(row[0])


def _members(conn: sqlite3.Connection, group: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT product_id FROM variant_groups WHERE group_id = ?", [group])]


def _product_neighbours(conn: sqlite3.Connection, product: str) -> set[str]:
    rows = conn.execute(
        "SELECT o.product_id FROM images i JOIN image_links l ON l.a = i.id JOIN images o ON o.id = l.b "
        "WHERE i.product_id = ?1 UNION "
        "SELECT o.product_id FROM images i JOIN image_links l ON l.b = i.id JOIN images o ON o.id = l.a "
        "WHERE i.product_id = ?1",
        [product],
    )
    return {r[0] for r in rows} - {product}


@dataclass(frozen=True)
class VariantGroup:
    """Products whose images are near-duplicates (directly or through each other)."""

    group_id: str  # its smallest product id
    products: list[str]
    links: list[tuple[int, int]]  # the near-duplicate image pairs between them

    def to_dict(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "products": self.products, "links": [list(pair) for pair in self.links]}


def list_groups(read: Select) -> tuple[list[VariantGroup], list[tuple[str, int, int]]]:
    """Every variant group (largest first), and the near-duplicate image pairs within
    single products (``(product, image, image)``: a product listing one picture twice);
    ``read`` is :meth:`vsearch.catalog.Catalog.read`. Costs the groups and links, not
    the catalog."""
    members: dict[str, list[str]] = {}
    for product, group in read("SELECT product_id, group_id FROM variant_groups ORDER BY group_id, product_id", []):
        members.setdefault(group, []).append(product)
    links: dict[str, list[tuple[int, int]]] = {}
    within: list[tuple[str, int, int]] = []
    rows = read(
        "SELECT l.a, l.b, i.product_id, o.product_id, g.group_id FROM image_links l JOIN images i ON i.id = l.a "
        "JOIN images o ON o.id = l.b LEFT JOIN variant_groups g ON g.product_id = i.product_id ORDER BY l.a, l.b",
        [],
    )
    for a, b, p, q, group in rows:
        if p == q:
            within.append((p, a, b))
        elif group is not None:
            links.setdefault(group, []).append((a, b))
    groups = [VariantGroup(g, m, links.get(g, [])) for g, m in members.items()]
    return sorted(groups, key=lambda g: (-len(g.products), g.group_id)), within
