"""Keyword search: products' titles and text attributes in an SQLite FTS5 index.

Shoppers type words. Every product's title and the text values of its attributes
(strings, and the string elements of list attributes: a ``description``, a
``brand``, ``colors``) are indexed by FTS5 with the ``porter unicode61
remove_diacritics 2`` tokenizer (case, accents and English endings do not matter:
"Apples" finds "apple"). A search ranks the products that contain every one of its
words first, then those that contain some of them, each group by bm25 (the title
counting :data:`TITLE_WEIGHT` times the attributes): "oat milk" puts oat milk
before the other milks, and still finds milk where no product has both words.

The index is kept in sync by SQLite triggers on ``products`` (:data:`STATEMENTS`),
inside the transaction that changes the product, so every write path (ingest,
import, API writes, another process) keeps it consistent, as
``product_attributes`` is kept. FTS5 needs an integer rowid, and a product's
implicit rowid may change on VACUUM (its primary key is its TEXT id), so
``product_keys`` gives each product a stable ``key INTEGER PRIMARY KEY`` (an alias
of its rowid, which VACUUM keeps), looked up by the unique product id: an insert,
update or delete costs O(log n), never a scan. The FTS table is *contentless*
(``content=''``): it keeps only the index, not a second copy of the text, so a
change removes the old entry by giving FTS5 the old row's text (its ``'delete'``
command), derived from the old product row by the same SQL that derived it on
insert. (An external-content table reading a view would allow ``'rebuild'``, but
FTS5 cannot read a view that calls ``json_each``.)

Shopper text is hostile: :func:`match_expression` keeps only its words (runs of
letters and digits), each quoted as an FTS5 string, so no input can make an FTS5
syntax error; text with no word at all matches nothing (:func:`words` is empty).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import TYPE_CHECKING, Any

from .query import Hit, SearchOptions

if TYPE_CHECKING:
    from .catalog import Catalog

__all__ = ["BACKFILL", "MAX_WORDS", "STATEMENTS", "TITLE_WEIGHT", "match_expression", "search", "words"]

TITLE_WEIGHT = 2.0  # bm25 column weight of the title against the text attributes' 1.0
MAX_WORDS = 32  # words of one query (more are dropped): a query's cost stays bounded
TOKENIZER = "porter unicode61 remove_diacritics 2"

_OBJECT = "CASE WHEN json_valid({p}.attributes) AND json_type({p}.attributes) = 'object' THEN {p}.attributes ELSE '{{}}' END"
# The text attributes of a product row ({p}: NEW, OLD or the backfill's alias), one per
# line: string values in key order (stored JSON has sorted keys), then the string
# elements of list values. Deterministic for a given row, which the 'delete' of a
# contentless FTS5 table needs: it must be given exactly the text inserted.
_BODY = (
    "(SELECT group_concat(v, char(10)) FROM (SELECT a.atom AS v FROM json_each(" + _OBJECT + ") AS a WHERE a.type = 'text' "
    "UNION ALL SELECT e.atom FROM json_each(" + _OBJECT + ") AS a, "
    "json_each(CASE a.type WHEN 'array' THEN a.value ELSE '[]' END) AS e WHERE e.type = 'text'))"
)
_KEY = "(SELECT key FROM product_keys WHERE product_id = {p}.id)"
_ADD = "INSERT INTO product_text(rowid, title, body) VALUES (" + _KEY + ", {p}.title, " + _BODY + ")"
_REMOVE = "INSERT INTO product_text(product_text, rowid, title, body) VALUES ('delete', " + _KEY + ", {p}.title, " + _BODY + ")"
STATEMENTS = [
    "CREATE TABLE IF NOT EXISTS product_keys (key INTEGER PRIMARY KEY, product_id TEXT NOT NULL UNIQUE)",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS product_text USING fts5(title, body, content='', tokenize='{TOKENIZER}')",
    "CREATE TRIGGER IF NOT EXISTS keywords_insert AFTER INSERT ON products BEGIN "
    f"INSERT INTO product_keys(product_id) VALUES (NEW.id); {_ADD.format(p='NEW')}; END",
    "CREATE TRIGGER IF NOT EXISTS keywords_update AFTER UPDATE OF id, title, attributes ON products "
    "WHEN OLD.title IS NOT NEW.title OR OLD.attributes IS NOT NEW.attributes OR OLD.id IS NOT NEW.id BEGIN "
    f"{_REMOVE.format(p='OLD')}; UPDATE product_keys SET product_id = NEW.id WHERE product_id = OLD.id; "
    f"{_ADD.format(p='NEW')}; END",
    "CREATE TRIGGER IF NOT EXISTS keywords_delete AFTER DELETE ON products BEGIN "
    f"{_REMOVE.format(p='OLD')}; DELETE FROM product_keys WHERE product_id = OLD.id; END",
]
# a catalog from before the index (migration): a key per product, then its text
BACKFILL = [
    "INSERT INTO product_text(product_text) VALUES ('delete-all')",
    "DELETE FROM product_keys",
    "INSERT INTO product_keys(product_id) SELECT id FROM products ORDER BY id",
    "INSERT INTO product_text(rowid, title, body) SELECT k.key, p.title, "
    + _BODY.format(p="p")
    + " FROM product_keys AS k JOIN products AS p ON p.id = k.product_id ORDER BY k.key",
]
_WORD = re.compile(r"[^\W_]+")  # letters and digits; everything else separates words, as in unicode61


def words(text: str) -> list[str]:
    """The distinct words of ``text`` (case-folded, NFKC-normalised), at most :data:`MAX_WORDS`."""
    found: dict[str, None] = {}
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
        found.setdefault(word, None)
    return list(found)[:MAX_WORDS]


def match_expression(text: str, every: bool = False) -> str | None:
    """An FTS5 query matching products that contain any word of ``text`` (``every``:
    all of them); None if it has none. Each word is an FTS5 string, so operators
    (``NOT``, ``NEAR``, ``*``, ``:``, quotes, parentheses) in shopper text are plain
    words or separators."""
    found = words(text)
    return (" AND " if every else " OR ").join('"' + w.replace('"', '""') + '"' for w in found) if found else None


def search(catalog: Catalog, options: SearchOptions, limit: int) -> list[Hit]:
    """Up to ``limit`` products matching ``options.text``, best first (those with every
    word, then those with some), under the options' category and attribute filters and
    excluded products; a hit's ``score`` is the match's relevance (bm25, sign flipped:
    higher is better) and its image is the product's first. Costs the matches (read
    from the FTS index), not the catalog."""
    every = match_expression(options.text, every=True)
    if every is None or limit <= 0:
        return []
    hits = _ranked(catalog, every, options, limit)
    if len(words(options.text)) > 1 and len(hits) < limit:
        seen = {hit.product_id for hit in hits}
        some = _ranked(catalog, match_expression(options.text) or every, options, limit + len(hits))
        hits += [hit for hit in some if hit.product_id not in seen][: limit - len(hits)]
    return hits


def _ranked(catalog: Catalog, expression: str, options: SearchOptions, limit: int) -> list[Hit]:
    """The first ``limit`` products matching an FTS5 ``expression`` under the options, by bm25."""
    tests, params = _filters(options)
    sql = (
        f"SELECT p.id, p.title, p.category, p.attributes, i.id, i.source, -bm25(product_text, {TITLE_WEIGHT}, 1.0) "
        "FROM product_text JOIN product_keys AS k ON k.key = product_text.rowid JOIN products AS p ON p.id = k.product_id "
        "JOIN images AS i ON i.id = (SELECT min(id) FROM images WHERE product_id = p.id) "
        f"WHERE product_text MATCH ?{tests} ORDER BY bm25(product_text, {TITLE_WEIGHT}, 1.0), p.id LIMIT ?"
    )
    rows = catalog.read(sql, [expression, *params, limit])
    return [
        Hit(pid, iid, float(relevance), title, category, _attributes(attrs), source)
        for pid, title, category, attrs, iid, source, relevance in rows
    ]


def _filters(options: SearchOptions) -> tuple[str, list[Any]]:
    """The options' filters as tests on each matched product ``p``: they cost the
    matches (each an indexed look-up of that product), not the filters' sets."""
    tests: list[str] = []
    params: list[Any] = []
    # vsearch.categories.matches_category in SQL: Fruit is Fruit and Fruit/..., not Fruitcake
    for patterns, negate in ((options.categories, False), (options.exclude_categories, True)):
        parts = []
        for pattern in (p.strip("/") for p in patterns):
            parts.append("(p.category = ? OR substr(p.category, 1, ?) = ?)")
            params += [pattern, len(pattern) + 1, pattern + "/"]
        if parts:
            tests.append(("NOT " if negate else "") + "(" + " OR ".join(parts) + ")")
    if options.where is not None:
        test, args = options.where.correlated("p.id")
        tests.append(test)
        params += args
    if options.exclude_products:
        tests.append(f"p.id NOT IN ({','.join('?' * len(options.exclude_products))})")
        params += list(options.exclude_products)
    return "".join(f" AND {t}" for t in tests), params


def _attributes(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
