"""Facets: for each named field, its values and how many products have each.

``facets=["brand", "category"]`` on a search returns, per field, the counts among
every product the search's filters allow (``all``: what a shop shows as
"Brand A (12)") and among the results returned (``top``). ``category`` counts the
products' categories; any other name is an attribute (a list attribute counts a
product once under each of its values). Values keep their JSON types.

``all`` is one SQL aggregate restricted by the same conditions the search used:
with an attribute filter it walks the filter's products (their own attribute
rows), otherwise the field's entries in the (key, kind, value) index. Either way
it costs the set it counts, so a facet over half of a 1M catalog takes seconds
(``scripts/bench_attributes.py`` measures it); ``top`` costs nothing beyond the
results. The counts leave out the facet's own conditions (disjunctive facets: with
brand A picked, brand B keeps its count, so a shop can offer "A or B"), and are kept
until the catalog's next write (:class:`FacetCache`); the queries run on the
catalog's separate read connection, so a long count holds up no search.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from .attributes import AttributeFilter, value_kind
from .catalog import Catalog
from .errors import AttributeFilterError
from .query import Hit, SearchOptions

__all__ = ["FACET_VALUES", "MAX_FACETS", "FacetCache", "FacetCount", "attribute_names", "facet_counts", "facets_json"]

FACET_VALUES = 20  # values reported per facet, most frequent first
FACET_CACHE_ENTRIES = 256  # (facet, filters) counts kept until the next write
MAX_FACETS = 10  # fields one search may ask for
CATEGORY = "category"


@dataclass(frozen=True)
class FacetCount:
    value: Any
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count}


class FacetCache:
    """``all`` counts kept until the catalog's next write (keyed by its generation):
    a page that asks for the same facets on every search counts them once."""

    def __init__(self, entries: int = FACET_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._counts: OrderedDict[tuple[Any, ...], list[FacetCount]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], count: Callable[[], list[FacetCount]]) -> list[FacetCount]:
        with self._lock:
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key]
        found = count()
        with self._lock:
            self._counts[key] = found
            while len(self._counts) > self.entries:
                self._counts.popitem(last=False)
        return found


def facet_counts(
    catalog: Catalog, options: SearchOptions, hits: Sequence[Hit], cache: FacetCache | None = None
) -> dict[str, dict[str, list[FacetCount]]]:
    """``{field: {"all": [...], "top": [...]}}`` for each of ``options.facets``."""
    if len(options.facets) > MAX_FACETS:
        raise AttributeFilterError(f"at most {MAX_FACETS} facets per search")
    cache = cache or FacetCache()
    generation = catalog.generation
    out = {}
    for name in options.facets:
        scope = _own_conditions_left_out(name, options)
        where = scope.where.key if scope.where is not None else None
        key = (generation, name, tuple(scope.categories), tuple(scope.exclude_categories), tuple(scope.exclude_products), where)
        out[name] = {"all": cache.get(key, partial(_all, catalog, name, scope)), "top": _top(name, hits)}
    return out


def _top(name: str, hits: Sequence[Hit]) -> list[FacetCount]:
    counts: Counter[tuple[str, Any]] = Counter()
    for product in {h.product_id: h for h in hits}.values():  # a product once, however many images
        raw = product.category if name == CATEGORY else product.attributes.get(name)
        values = raw if isinstance(raw, list) else [raw]
        counts.update(
            {(value_kind(v), v) for v in values if isinstance(v, (str, int, float)) and not (name == CATEGORY and v == "")}
        )
    return [FacetCount(v, n) for (_, v), n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0][1])))[:FACET_VALUES]]


def facets_json(facets: dict[str, dict[str, list[FacetCount]]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``facet_counts``'s result as plain JSON (the API's ``facets``, ``--json``)."""
    return {name: {part: [c.to_dict() for c in counts] for part, counts in parts.items()} for name, parts in facets.items()}


def _own_conditions_left_out(name: str, options: SearchOptions) -> SearchOptions:
    """The options without the facet's own conditions: with one brand picked, the
    other brands keep their counts, so a second can be added (any of them)."""
    if name == CATEGORY:
        return replace(options, categories=(), exclude_categories=())
    if options.where is None:
        return options
    rest = tuple(c for c in options.where.conditions if c.key != name)
    return replace(options, where=AttributeFilter(rest) if rest else None)


def _all(catalog: Catalog, name: str, options: SearchOptions) -> list[FacetCount]:
    scope, params = _scope(options)
    if name == CATEGORY:
        where = f"category != '' AND {scope or '1'}"
        sql = f"SELECT 'text', category AS value, count(*) AS n FROM products WHERE {where} GROUP BY category"
    elif options.where is not None:  # driven from the filter's products: costs the set, not the catalog
        table = "product_attributes AS a INDEXED BY product_attributes_product"
        sql = (
            f"SELECT a.kind, a.value, count(DISTINCT a.product_id) AS n FROM products JOIN {table} "
            "ON a.product_id = products.id AND a.key = ? "
            f"WHERE {scope} GROUP BY a.kind, a.value"
        )
        params = [name, *params]
    else:  # the field's own index entries, restricted to the categories if any
        inner = f" AND product_id IN (SELECT id FROM products WHERE {scope})" if scope else ""
        counted = "kind, value, count(DISTINCT product_id) AS n"
        sql = f"SELECT {counted} FROM product_attributes WHERE key = ?{inner} GROUP BY kind, value"
        params = [name, *params]
    found = catalog.read(f"{sql} ORDER BY n DESC, value LIMIT {FACET_VALUES}", params)
    return [FacetCount(_value(kind, value), n) for kind, value, n in found]


def _scope(options: SearchOptions) -> tuple[str, list[Any]]:
    """The products the search's filters allow, as a condition on ``products``."""
    parts: list[str] = []
    params: list[Any] = []
    if options.where is not None:
        sql, args = options.where.product_sql()
        parts.append(f"id IN ({sql})")
        params += args
    for patterns, negate in ((options.categories, ""), (options.exclude_categories, "NOT ")):
        if patterns:
            tests = []
            for pattern in patterns:
                pattern = pattern.strip("/")
                tests.append("(category = ? OR substr(category, 1, ?) = ?)")
                params += [pattern, len(pattern) + 1, pattern + "/"]
            parts.append(f"{negate}({' OR '.join(tests)})")
    if options.exclude_products:
        parts.append(f"id NOT IN ({','.join('?' * len(options.exclude_products))})")
        params += list(options.exclude_products)
    return " AND ".join(parts), params


def _value(kind: str, value: Any) -> Any:
    return bool(value) if kind == "bool" else value


def attribute_names(catalog: Catalog) -> list[dict[str, Any]]:
    """Every filterable attribute: ``name`` and its number of distinct ``values``
    (what a page needs to pick facets). Reads the (key, kind, value) index once."""
    rows = catalog.read(
        "SELECT key, count(*) FROM (SELECT DISTINCT key, kind, value FROM product_attributes) GROUP BY key ORDER BY key", []
    )
    return [{"name": key, "values": n} for key, n in rows]
