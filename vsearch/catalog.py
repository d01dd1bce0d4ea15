"""The catalog: products and their images in SQLite (WAL), through sqlite-utils.

The catalog is the source of truth. Each image row's integer primary key is its
FAISS id (never reused thanks to AUTOINCREMENT), and every model version's raw
vectors are kept here too (:mod:`vsearch.vectorstore`; float16 by default, read
back as float32), so the FAISS index can always be rebuilt from here without any
model work. Every write transaction bumps ``generation``; the index manifest records
the generation it reflects, which is how a crash between the two is detected and
repaired.

The schema has a version (``meta.schema_version``); :meth:`Catalog.open` brings an
older catalog up to date in one transaction (:func:`vsearch.migrate.upgrade`).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import sqlite_utils

from . import attributes, changelog, keywords, variants
from .errors import ConfigError, IndexFormatError, ProductNotFoundError
from .migrate import upgrade
from .vectorstore import VECTOR_SCHEMA, VectorStore, encoding, round_trip

__all__ = ["BASE_MODEL", "Catalog", "Product", "ImageRow"]

F = TypeVar("F", bound=Callable[..., Any])

TABLES = """
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    category TEXT NOT NULL DEFAULT '',
    attributes TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id TEXT NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    phash INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (product_id, source)
);
CREATE INDEX IF NOT EXISTS images_product ON images(product_id);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA = [s for s in (TABLES + VECTOR_SCHEMA).split(";") if s.strip()] + changelog.STATEMENTS + attributes.STATEMENTS
SCHEMA += keywords.STATEMENTS + variants.STATEMENTS

BASE_MODEL = "base"  # the index's original model; stored like any other version


@dataclass(frozen=True)
class Product:
    id: str
    title: str
    category: str
    attributes: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ImageRow:
    id: int
    product_id: str
    source: str
    sha256: str
    width: int
    height: int
    phash: int | None = None  # perceptual hash (vsearch.duplicates); read by image_by_id only


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Catalog, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Catalog:
    """Products and images. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, db: sqlite_utils.Database, path: Path, raw_vectors: str = "float16") -> None:
        self.db = db
        self.path = path
        # One connection shared by threads: each method (and each whole transaction)
        # holds this lock, so statements of concurrent callers never interleave.
        self._mutex = threading.RLock()
        self._vectors = VectorStore(db.conn, encoding(raw_vectors))
        self._reader: sqlite3.Connection | None = None  # for read(), opened on first use
        self._reader_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, *, must_exist: bool = False, raw_vectors: str = "float16") -> Catalog:
        """Open (or create, unless ``must_exist``) the catalog at ``path``, migrating an
        older layout in place. A missing or damaged file is an IndexFormatError.
        ``raw_vectors`` (:class:`vsearch.config.IndexConfig`): how vectors written
        from now on are encoded; rows already there keep theirs, and every read
        returns float32."""
        path = Path(path)
        encoding(raw_vectors)  # a bad setting fails before the file is touched
        if must_exist and not path.exists():
            raise IndexFormatError(f"{path} is missing: the catalog is the index's source of truth; restore it")
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db = sqlite_utils.Database(conn)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            upgrade(conn, SCHEMA, BASE_MODEL)  # creates a new catalog's tables, migrates an old one's
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise IndexFormatError(f"{path}: damaged catalog: {exc}") from None
        except BaseException:
            conn.close()
            raise
        db.execute("PRAGMA foreign_keys=ON")  # after upgrade, which needs them off
        return cls(db, path, raw_vectors)

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
        self.db.conn.close()

    @contextmanager
    def transaction(self, bump: bool = True) -> Iterator[None]:
        """One atomic write: all of it lands, or none of it; bumps the generation
        unless ``bump`` is False (writes the served index does not depend on)."""
        conn = self.db.conn
        with self._mutex:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                if bump:
                    conn.execute(
                        "INSERT INTO meta(key, value) VALUES('generation', '1') "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A read transaction: every read inside sees one committed state (WAL), and
        no lock is taken that would keep writers (or a read-only file) out."""
        conn = self.db.conn
        with self._mutex:
            conn.execute("BEGIN")
            try:
                yield
            finally:
                conn.execute("COMMIT")

    @property
    def changes_floor(self) -> int:
        """The oldest generation the change log reaches back to."""
        with self._mutex:
            return changelog.floor(self.db.conn)

    @property
    @_locked
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    # products -----------------------------------------------------------------
    @_locked
    def upsert_product(
        self,
        product_id: str,
        *,
        title: str | None = None,
        category: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> bool:
        """Insert or update a product; a field given as None keeps its current value
        ("" or {} for a new product). Returns True when something changed."""
        now = time.time()
        current = self.db.execute("SELECT title, category, attributes FROM products WHERE id = ?", [product_id]).fetchone()
        old_title, old_category, old_attrs = current or ("", "", "{}")
        title = old_title if title is None else title
        category = old_category if category is None else category
        try:
            attrs = old_attrs if attributes is None else _attributes_json(attributes)
        except ValueError:  # NaN / Infinity: not JSON, and nothing a filter could compare
            raise ConfigError(f"product {product_id!r}: attributes must be JSON (finite numbers only)") from None
        if current == (title, category, attrs):
            return False
        if current is None:
            self.db.execute(
                "INSERT INTO products(id, title, category, attributes, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [product_id, title, category, attrs, now, now],
            )
        else:
            self.db.execute(
                "UPDATE products SET title = ?, category = ?, attributes = ?, updated_at = ? WHERE id = ?",
                [title, category, attrs, now, product_id],
            )
        return True

    @_locked
    def product(self, product_id: str) -> Product:
        row = self.db.execute("SELECT * FROM products WHERE id = ?", [product_id]).fetchone()
        if row is None:
            raise ProductNotFoundError(f"no product {product_id!r}")
        return _product(row)

    @_locked
    def products(self, product_ids: list[str]) -> dict[str, Product]:
        found: dict[str, Product] = {}
        for chunk in _chunks(product_ids, 500):
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT * FROM products WHERE id IN ({marks})", chunk):
                found[row[0]] = _product(row)
        return found

    @_locked
    def product_ids(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM products")}

    @_locked
    def remove_products(self, product_ids: list[str]) -> list[int]:
        """Delete products and their images; returns the removed image ids."""
        removed: list[int] = []
        for chunk in _chunks(product_ids, 500):
            marks = ",".join("?" * len(chunk))
            removed += [r[0] for r in self.db.execute(f"SELECT id FROM images WHERE product_id IN ({marks})", chunk)]
            self.db.execute(f"DELETE FROM images WHERE product_id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM products WHERE id IN ({marks})", chunk)
        return removed

    # images -------------------------------------------------------------------
    @_locked
    def image(self, product_id: str, source: str) -> ImageRow | None:
        row = self.db.execute(
            "SELECT id, product_id, source, sha256, width, height FROM images WHERE product_id = ? AND source = ?",
            [product_id, source],
        ).fetchone()
        return ImageRow(*row) if row else None

    @_locked
    def image_by_id(self, image_id: int) -> ImageRow | None:
        row = self.db.execute(
            "SELECT id, product_id, source, sha256, width, height, phash FROM images WHERE id = ?", [image_id]
        ).fetchone()
        if row is None:
            return None
        id_, product_id, source, sha256, width, height, phash = row
        return ImageRow(id_, product_id, source, sha256, width, height, variants.from_signed(phash))

    @_locked
    def images_of(self, product_id: str) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT id, product_id, source, sha256, width, height FROM images WHERE product_id = ? ORDER BY id", [product_id]
        )
        return [ImageRow(*row) for row in rows]

    @_locked
    def put_image(
        self,
        product_id: str,
        source: str,
        sha256: str,
        width: int,
        height: int,
        vector: np.ndarray,
        model: str = BASE_MODEL,
    ) -> int:
        """Insert or replace an image's content with its vector from ``model``; an
        existing (product, source) keeps its id. New content invalidates the vectors
        other models had for the old content; the same content keeps them."""
        now = time.time()
        existing = self.image(product_id, source)
        if existing is None:
            cursor = self.db.execute(
                "INSERT INTO images(product_id, source, sha256, width, height, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [product_id, source, sha256, width, height, now, now],
            )
            image_id = int(cursor.lastrowid or 0)
        else:
            image_id = existing.id
            if existing.sha256 != sha256:
                self._vectors.forget_image(image_id)
            self.db.execute(
                "UPDATE images SET sha256 = ?, width = ?, height = ?, updated_at = ? WHERE id = ?",
                [sha256, width, height, now, image_id],
            )
        self._vectors.put(model, image_id, vector)
        return image_id

    @_locked
    def put_vectors(self, model: str, rows: list[tuple[int, str, np.ndarray]]) -> int:
        """Store ``model``'s vectors for ``(image_id, sha256, vector)`` rows; a row whose
        image has changed content (or is gone) since it was read is skipped. Returns
        how many were stored."""
        return sum(self._vectors.put_if_current(model, image_id, sha256, vector) for image_id, sha256, vector in rows)

    @_locked
    def images_without_vectors(self, model: str) -> list[ImageRow]:
        """Images that have no current vector from ``model`` (new or changed content)."""
        return [ImageRow(*row) for row in self._vectors.missing(model)]

    def as_stored(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` (rows) as storing them and reading them back gives them (float16
        rounding by default): what the index should hold for them, so that it equals
        one rebuilt or caught up from the catalog."""
        return round_trip(vectors, self._vectors.dtype)

    @_locked
    def vector_dim(self, model: str = BASE_MODEL) -> int:
        """The dimension of ``model``'s stored vectors (0 if it has none)."""
        return self._vectors.dim(model)

    @_locked
    def vectors_by_id(self, image_ids: list[int], model: str = BASE_MODEL) -> tuple[np.ndarray, np.ndarray]:
        """(ids, raw vectors) of those of ``image_ids`` that have a ``model`` vector."""
        return self._vectors.by_ids(model, image_ids)

    @_locked
    def unused_sha256s(self, sha256s: set[str]) -> set[str]:
        """Those of ``sha256s`` no image has (their stored copies can go)."""
        used: set[str] = set()
        values = sorted(sha256s)
        for chunk in _chunks(values, 500):
            marks = ",".join("?" * len(chunk))
            used.update(r[0] for r in self.db.execute(f"SELECT DISTINCT sha256 FROM images WHERE sha256 IN ({marks})", chunk))
        return sha256s - used

    @_locked
    def changed_images(self, generation: int, model: str = BASE_MODEL) -> list[int] | None:
        """Images whose ``model`` vectors changed after ``generation`` (from the change
        log); None if the log was pruned past it. Read inside a transaction for a
        result consistent with :attr:`generation`."""
        return changelog.changed_since(self.db.conn, generation, model)

    @_locked
    def prune_changes(self, saved_generation: int) -> None:
        with self.transaction(bump=False):
            changelog.prune(self.db.conn, saved_generation)

    @_locked
    def drop_model_vectors(self, model: str) -> None:
        # The one way base differs: the index is defined by it, so it always stays.
        if model == BASE_MODEL:
            raise ValueError("the base model's vectors cannot be dropped")
        self._vectors.drop(model)

    @_locked
    def remove_images(self, image_ids: list[int]) -> None:
        # Their vectors go too: model_vectors rows cascade (foreign_keys is on).
        for chunk in _chunks(image_ids, 500):
            self.db.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def iter_vectors(self, batch: int = 4096, model: str = BASE_MODEL) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors from ``model``) in id order, a chunk at a time."""
        last = -1
        while True:
            with self._mutex:  # per chunk, so writers are not held off for a whole rebuild
                page = self._vectors.page(model, last, batch)
            if page is None:
                return
            yield page
            last = int(page[0][-1])

    @_locked
    def sample_vectors(
        self, n: int, seed: int = 0, model: str = BASE_MODEL, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """Up to ``n`` raw vectors from ``model``, drawn uniformly at random (all if
        fewer), in id order; the same data and ``seed`` give the same sample. Costs what
        reading ``n`` vectors costs, whatever the catalog's size (see
        :meth:`vsearch.vectorstore.VectorStore.sample_ids`). ``transform`` (e.g.
        ``projection.apply``) is applied a chunk at a time: the raw sample is never
        held whole."""
        return self._vectors.sample(n, seed, model, transform)

    def image_products(self, image_ids: list[int]) -> dict[int, str]:
        return self._image_column(image_ids, "product_id")

    def image_sources(self, image_ids: list[int]) -> dict[int, str]:
        return self._image_column(image_ids, "source")

    @_locked
    def _image_column(self, image_ids: list[int], column: str) -> dict[int, str]:
        found: dict[int, str] = {}
        for chunk in _chunks(image_ids, 500):
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(f"SELECT id, {column} FROM images WHERE id IN ({marks})", chunk).fetchall())
        return found

    @_locked
    def image_categories(self, image_ids: list[int]) -> dict[int, str | None]:
        """Each image's product's category now (None: the image is gone)."""
        found: dict[int, str | None] = dict.fromkeys(image_ids)
        for chunk in _chunks(image_ids, 500):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT i.id, p.category FROM images i JOIN products p ON p.id = i.product_id WHERE i.id IN ({marks})", chunk
            )
            found.update(rows.fetchall())
        return found

    @_locked
    def category_image_ids(self) -> dict[str, np.ndarray]:
        """Leaf category -> sorted image ids; the basis of filtered search."""
        groups: dict[str, list[int]] = {}
        rows = self.db.execute("SELECT p.category, i.id FROM images i JOIN products p ON p.id = i.product_id ORDER BY i.id")
        for category, image_id in rows:
            groups.setdefault(category, []).append(image_id)
        return {c: np.array(ids, dtype=np.int64) for c, ids in groups.items()}

    @_locked
    def select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of one short, indexed query on the main connection, like the search's
        other look-ups (a product's variant group): never queued behind a long
        aggregate on :meth:`read`'s connection."""
        return self.db.execute(sql, list(params)).fetchall()

    def read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of one read-only query, on a connection of its own: a long aggregate
        (facet counts, an attribute filter's image ids) never holds up the searches
        and writes that share the main one. It sees the last committed state."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            return self._reader.execute(sql, list(params)).fetchall()

    @_locked
    def counts(self) -> dict[str, int]:
        one = self.db.execute
        return {
            "products": one("SELECT count(*) FROM products").fetchone()[0],
            "images": one("SELECT count(*) FROM images").fetchone()[0],
            "categories": one("SELECT count(DISTINCT category) FROM products").fetchone()[0],
        }

    @_locked
    def product_counts_by_category(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT category, count(*) FROM products GROUP BY category").fetchall())

    @_locked
    def vectors_of(self, product_id: str, model: str = BASE_MODEL) -> np.ndarray:
        return self._vectors.of_product(product_id, model)

    @_locked
    def category_counts(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT p.category, count(i.id) FROM products p LEFT JOIN images i ON i.product_id = p.id GROUP BY p.category"
        )
        return dict(rows.fetchall())


def _attributes_json(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, sort_keys=True, ensure_ascii=False, allow_nan=False)


def _product(row: tuple[Any, ...]) -> Product:
    return Product(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
