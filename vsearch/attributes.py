"""Attribute filters: "similar, but in stock, under 50, brand A or B".

A filter is a JSON object from attribute name to a condition; every condition must
hold (AND), and ``in`` is the OR within one attribute::

    {"brand": {"in": ["A", "B"]}, "price": {"lt": 50}, "in_stock": true}

A bare value is ``eq``; ``{"gte": 10, "lt": 50}`` is a range (numbers only);
``{"exists": true}`` / ``{"exists": false}`` test whether a product has the
attribute at all. Attributes keep their JSON types: ``"5"`` (text) does not equal
``5`` (a number), and ``true`` is not ``1``. A list-valued attribute (``"colors":
["red", "blue"]``) matches when any of its elements does. Nested objects and nulls
are not filterable (a null is a missing attribute).

The CLI writes the same conditions as ``--where`` clauses (:func:`parse_where`):
``price<50``, ``price>=10``, ``brand=A``, ``brand in (A, B)``, ``in_stock=true``,
``color exists``, ``color missing``; a value that reads as a number or true/false
is one, unless quoted (``sku='0042'``).

The catalog mirrors every product's scalar attributes into ``product_attributes``
(SQLite triggers, in the same transaction as the product: :data:`STATEMENTS`),
indexed by (key, kind, value), so a filter becomes one indexed SQL query
(:meth:`AttributeFilter.product_sql`): its cost follows the number of matching
rows, not the catalog's size (except ``exists: false``, a complement).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AttributeFilterError

__all__ = ["STATEMENTS", "BACKFILL", "AttributeFilter", "Condition", "parse_number", "parse_where", "value_kind"]

Scalar = str | int | float | bool
RANGE_OPS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
OPS = ("eq", "in", *RANGE_OPS, "exists")
MAX_CONDITIONS = 32
MAX_VALUES = 1000  # of one ``in``

_KIND = "CASE {t} WHEN 'text' THEN 'text' WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' ELSE 'bool' END"
_SCALAR_TYPES = "('text', 'integer', 'real', 'true', 'false')"
# Attributes that are not a valid JSON object (e.g. NaN written by an older release)
# mirror nothing rather than failing the write or the migration.
_OBJECT = "CASE WHEN json_valid({p}.attributes) AND json_type({p}.attributes) = 'object' THEN {p}.attributes ELSE '{{}}' END"
# A product's scalar attributes, and the elements of its list attributes, as rows
# (``{src}``: the products table for the backfill; triggers read NEW).
_ROWS = (
    "SELECT {p}.id, a.key, " + _KIND.format(t="a.type") + ", a.atom FROM {src}json_each(" + _OBJECT + ") AS a "
    f"WHERE a.type IN {_SCALAR_TYPES} "
    "UNION ALL SELECT {p}.id, a.key, " + _KIND.format(t="e.type") + ", e.atom "
    "FROM {src}json_each(" + _OBJECT + ") AS a, json_each(CASE a.type WHEN 'array' THEN a.value ELSE '[]' END) AS e "
    f"WHERE e.type IN {_SCALAR_TYPES}"
)
_FILL = "INSERT INTO product_attributes(product_id, key, kind, value) " + _ROWS
STATEMENTS = [
    # value has no declared type: it keeps the JSON scalar's (text, integer, real; booleans as 1/0)
    "CREATE TABLE IF NOT EXISTS product_attributes (product_id TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, value)",
    "CREATE INDEX IF NOT EXISTS product_attributes_value ON product_attributes(key, kind, value, product_id)",
    "CREATE INDEX IF NOT EXISTS product_attributes_product ON product_attributes(product_id)",
    f"CREATE TRIGGER IF NOT EXISTS attributes_insert AFTER INSERT ON products BEGIN {_FILL.format(p='NEW', src='')}; END",
    "CREATE TRIGGER IF NOT EXISTS attributes_update AFTER UPDATE OF id, attributes ON products "
    "WHEN OLD.attributes IS NOT NEW.attributes OR OLD.id IS NOT NEW.id BEGIN "
    f"DELETE FROM product_attributes WHERE product_id = OLD.id; {_FILL.format(p='NEW', src='')}; END",
    "CREATE TRIGGER IF NOT EXISTS attributes_delete AFTER DELETE ON products BEGIN "
    "DELETE FROM product_attributes WHERE product_id = OLD.id; END",
]
BACKFILL = _FILL.format(p="products", src="products, ")  # a catalog from before the table (migration)


@dataclass(frozen=True)
class Condition:
    """One test on one attribute: ``op`` is eq, in, lt, lte, gt, gte or exists."""

    key: str
    op: str
    value: Any  # a scalar (eq, ranges), a tuple of scalars (in), a bool (exists)

    def sql(self) -> tuple[str, list[Any]]:
        """The product ids it holds for, as one indexed SELECT."""
        test, params = self.row_test()
        rows = f"SELECT product_id FROM product_attributes WHERE {test}"
        if self.op == "exists" and not self.value:
            return f"SELECT id FROM products EXCEPT {rows}", params
        return rows, params

    def correlated(self, product_id: str) -> tuple[str, list[Any]]:
        """Whether it holds for the product ``product_id`` names (a column of an
        outer query): an EXISTS on that product's rows, for checking a few images."""
        test, params = self.row_test()
        # by the product's own rows: the (key, value) index would walk the filter's whole set
        rows = "product_attributes INDEXED BY product_attributes_product"
        exists = f"EXISTS (SELECT 1 FROM {rows} WHERE product_id = {product_id} AND {test})"
        return (exists if self.op != "exists" or self.value else f"NOT {exists}"), params

    def row_test(self) -> tuple[str, list[Any]]:
        """The test on one product_attributes row (``exists``: that the key is there)."""
        if self.op == "exists":
            return "key = ?", [self.key]
        if self.op in RANGE_OPS:
            return f"key = ? AND kind = 'number' AND value {RANGE_OPS[self.op]} ?", [self.key, self.value]
        values = self.value if self.op == "in" else (self.value,)
        parts: list[str] = []
        params: list[Any] = [self.key]
        for kind in ("text", "number", "bool"):
            same = [_stored(v) for v in values if value_kind(v) == kind]
            if same:
                parts.append(f"(kind = '{kind}' AND value IN ({','.join('?' * len(same))}))")
                params += same
        return f"key = ? AND ({' OR '.join(parts)})", params


@dataclass(frozen=True)
class AttributeFilter:
    """Conditions that must all hold (AND); built by :meth:`from_json` or :func:`parse_where`."""

    conditions: tuple[Condition, ...]

    def __post_init__(self) -> None:
        if not self.conditions:
            raise AttributeFilterError("an attribute filter needs at least one condition")
        if len(self.conditions) > MAX_CONDITIONS:
            raise AttributeFilterError(f"at most {MAX_CONDITIONS} attribute conditions")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttributeFilter:
        """``{"brand": {"in": [...]}, "price": {"lt": 50}, "in_stock": true}``."""
        if not isinstance(data, Mapping):
            raise AttributeFilterError("filter must be a JSON object of attribute -> condition")
        conditions: list[Condition] = []
        for key, spec in data.items():
            if not isinstance(key, str) or not key:
                raise AttributeFilterError("filter attribute names must be non-empty strings")
            if isinstance(spec, Mapping):
                if not spec:
                    raise AttributeFilterError(f"filter {key!r}: empty condition (use one of {', '.join(OPS)})")
                conditions += [_condition(key, op, value) for op, value in spec.items()]
            else:
                conditions.append(_condition(key, "eq", spec))
        return cls(tuple(conditions))

    def to_json(self) -> dict[str, Any]:
        """The JSON form (conditions on one attribute merged into one object)."""
        out: dict[str, Any] = {}
        for c in self.conditions:
            spec = out.setdefault(c.key, {})
            spec[c.op] = list(c.value) if c.op == "in" else c.value
        return out

    @property
    def key(self) -> str:
        """A canonical text form: equal filters, equal keys (for caching)."""
        return json.dumps(sorted((c.key, c.op, _canonical(c.value)) for c in self.conditions), ensure_ascii=False)

    def product_sql(self) -> tuple[str, list[Any]]:
        """One SELECT of the ids of the products every condition holds for."""
        parts, params = [], []
        for condition in self.conditions:
            sql, args = condition.sql()
            parts.append(sql)
            params += args
        return " INTERSECT ".join(parts), params

    def correlated(self, product_id: str) -> tuple[str, list[Any]]:
        """Whether every condition holds for the product ``product_id`` names (a
        column of an outer query): costs the rows of that product, not the filter's."""
        parts, params = [], []
        for condition in self.conditions:
            sql, args = condition.correlated(product_id)
            parts.append(sql)
            params += args
        return " AND ".join(parts), params

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """The same test in Python, for one product (tests and small lists)."""
        return all(_holds(c, attributes) for c in self.conditions)


def parse_where(clauses: Sequence[str]) -> AttributeFilter | None:
    """CLI clauses -> a filter (None for none): ``price<50``, ``brand in (A, B)``,
    ``in_stock=true``, ``color exists``, ``color missing``."""
    conditions: list[Condition] = []
    for clause in clauses:
        text = clause.strip()
        if m := re.fullmatch(r"([^<>=!]+?)\s+(exists|missing)", text, re.IGNORECASE):
            conditions.append(Condition(m[1].strip(), "exists", m[2].lower() == "exists"))
        elif m := re.fullmatch(r"([^<>=!]+?)\s+in\s*\((.*)\)", text, re.IGNORECASE):
            values = [_cli_value(v) for v in _split_list(m[2])]
            conditions.append(_condition(m[1].strip(), "in", values))
        elif m := re.fullmatch(r"([^<>=!]+?)\s*(<=|>=|<|>|==|=)\s*(.+)", text):
            op = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte", "=": "eq", "==": "eq"}[m[2]]
            conditions.append(_condition(m[1].strip(), op, _cli_value(m[3])))
        else:
            forms = "NAME<N, NAME>=N, NAME=VALUE, 'NAME in (A, B)', 'NAME exists' or 'NAME missing'"
            raise AttributeFilterError(f"cannot read --where {clause!r}: use {forms}")
    return AttributeFilter(tuple(conditions)) if conditions else None


def _condition(key: str, op: str, value: Any) -> Condition:
    if not key:
        raise AttributeFilterError("filter attribute names must be non-empty")
    if op == "exists":
        if not isinstance(value, bool):
            raise AttributeFilterError(f"filter {key!r}: exists takes true or false")
        return Condition(key, op, value)
    if op in RANGE_OPS:
        if not _is_number(value):
            raise AttributeFilterError(f"filter {key!r}: {op} compares numbers, not {json.dumps(value)}")
        return Condition(key, op, value)
    if op == "in":
        if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_VALUES:
            raise AttributeFilterError(f"filter {key!r}: in takes a list of 1 to {MAX_VALUES} values")
        for v in value:
            _check_scalar(key, v)
        unique = {(value_kind(v), v): v for v in value}  # True and 1 are equal in Python, not here
        return Condition(key, op, tuple(unique.values()))
    if op == "eq":
        _check_scalar(key, value)
        return Condition(key, op, value)
    raise AttributeFilterError(f"filter {key!r}: unknown condition {op!r} (use one of {', '.join(OPS)})")


def _check_scalar(key: str, value: Any) -> None:
    if not isinstance(value, (str, bool)) and not _is_number(value):  # also: NaN, inf, beyond 64-bit integers
        raise AttributeFilterError(f"filter {key!r}: values must be strings, numbers or booleans, not {json.dumps(value)}")


def _is_number(value: Any) -> bool:
    """A finite number SQLite can hold (an integer within 64 bits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -(2**63) <= value < 2**63 if isinstance(value, int) else math.isfinite(value)


def value_kind(value: Scalar) -> str:
    """How ``product_attributes.kind`` files a JSON scalar: text, number or bool."""
    return "bool" if isinstance(value, bool) else "text" if isinstance(value, str) else "number"


def _stored(value: Scalar) -> Scalar:
    return int(value) if isinstance(value, bool) else value


def _canonical(value: Any) -> Any:
    if isinstance(value, tuple):
        return sorted((value_kind(v), v) for v in value)
    return [value_kind(value), value]


def _holds(c: Condition, attributes: Mapping[str, Any]) -> bool:
    raw = attributes.get(c.key)
    present = [v for v in (raw if isinstance(raw, list) else [raw]) if isinstance(v, (str, bool, int, float))]
    if c.op == "exists":
        return bool(present) == c.value
    if c.op in RANGE_OPS:
        return any(_is_number(v) and _compare(float(v), c.op, c.value) for v in present)
    wanted = c.value if c.op == "in" else (c.value,)
    return any(value_kind(v) == value_kind(w) and v == w for v in present for w in wanted)


def _compare(a: float, op: str, b: float) -> bool:
    return {"lt": a < b, "lte": a <= b, "gt": a > b, "gte": a >= b}[op]


def _cli_value(text: str) -> Scalar:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    number = parse_number(text)
    return text if number is None else number


def parse_number(text: str) -> int | float | None:
    """An int for integer text (exact, however long), else a float; None if the
    text is not a finite number. Shared by ``--where`` values and typed CSV columns."""
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _split_list(text: str) -> list[str]:
    """``A, 'B, C', D`` -> three values (quotes keep commas)."""
    return [m.group(0) for m in re.finditer(r"'[^']*'|\"[^\"]*\"|[^,]+", text) if m.group(0).strip()]
