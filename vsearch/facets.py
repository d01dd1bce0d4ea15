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
results.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .catalog import Catalog
from .errors import FilterError
from .query import Hit, SearchOptions

__all__ = ["FACET_VALUES", "MAX_FACETS", "FacetCount", "attribute_names", "facet_counts"]

FACET_VALUES = 20  # values reported per facet, most frequent first
MAX_FACETS = 10  # fields one search may ask for
CATEGORY = "category"


@dataclass(frozen=True)
class FacetCount:
    value: Any
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count}


def facet_counts(catalog: Catalog, options: SearchOptions, hits: Sequence[Hit]) -> dict[str, dict[str, list[FacetCount]]]:
    """``{field: {"all": [...], "top": [...]}}`` for each of ``options.facets``."""
    if len(options.facets) > MAX_FACETS:
        raise FilterError(f"at most {MAX_FACETS} facets per search")
    return {name: {"all": _all(catalog, name, options), "top": _top(name, hits)} for name in options.facets}


def _top(name: str, hits: Sequence[Hit]) -> list[FacetCount]:
    counts: Counter[tuple[str, Any]] = Counter()
    for product in {h.product_id: h for h in hits}.values():  # a product once, however many images
        raw = product.category if name == CATEGORY else product.attributes.get(name)
        values = raw if isinstance(raw, list) else [raw]
        counts.update({(_kind(v), v) for v in values if isinstance(v, (str, int, float)) and not (name == CATEGORY and v == "")})
    return [FacetCount(v, n) for (_, v), n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0][1])))[:FACET_VALUES]]


def _all(catalog: Catalog, name: str, options: SearchOptions) -> list[FacetCount]:
    scope, params = _scope(options)
    if name == CATEGORY:
        where = f"category != '' AND {scope or '1'}"
        sql = f"SELECT 'text', category AS value, count(*) AS n FROM products WHERE {where} GROUP BY category"
    elif options.where is not None:  # driven from the filter's products: costs the set, not the catalog
        table = "product_attributes AS a INDEXED BY product_attributes_product"
        sql = (
            f"SELECT a.kind, a.value, count(*) AS n FROM products JOIN {table} ON a.product_id = products.id AND a.key = ? "
            f"WHERE {scope} GROUP BY a.kind, a.value"
        )
        params = [name, *params]
    else:  # the field's own index entries, restricted to the categories if any
        inner = f" AND product_id IN (SELECT id FROM products WHERE {scope})" if scope else ""
        sql = f"SELECT kind, value, count(*) AS n FROM product_attributes WHERE key = ?{inner} GROUP BY kind, value"
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


def _kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "text" if isinstance(value, str) else "number"


def _value(kind: str, value: Any) -> Any:
    return bool(value) if kind == "bool" else value


def attribute_names(catalog: Catalog) -> list[dict[str, Any]]:
    """Every filterable attribute: ``name`` and its number of distinct ``values``
    (what a page needs to pick facets). Reads the (key, kind, value) index once."""
    rows = catalog.read(
        "SELECT key, count(*) FROM (SELECT DISTINCT key, kind, value FROM product_attributes) GROUP BY key ORDER BY key", []
    )
    return [{"name": key, "values": n} for key, n in rows]
