"""``vsearch search`` and ``eval``: query an index, and score how well it retrieves."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import Command, index_arg, plural, print_json

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["add_eval", "add_search"]


def add_search(command: Command, env: Settings) -> None:
    from .fusion import DEFAULT_TEXT_WEIGHT

    p = command("search", _search, "Find the catalog products most similar to an image, or matching words, or both.")
    p.add_argument("image", nargs="?", help="image path or http(s) URL (optional with --text)")
    p.add_argument(
        "--text",
        default="",
        metavar="WORDS",
        help="words to match in titles and text attributes: alone, a keyword search; with an image, "
        "the photo's ranking fused with the keyword ranking",
    )
    p.add_argument(
        "--text-weight",
        type=float,
        default=DEFAULT_TEXT_WEIGHT,
        metavar="W",
        help=f"the keyword ranking's weight in the fusion, the photo's being 1 (default {DEFAULT_TEXT_WEIGHT}; 0: photo alone)",
    )
    index_arg(p, env.index_dir)
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--category", action="append", help="only this category or its sub-categories (repeatable)")
    p.add_argument("--exclude-category", action="append", help="never this category (repeatable)")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="CONDITION",
        help="only products whose attributes match: 'price<50', 'brand in (A, B)', 'in_stock=true', "
        "'color exists', 'color missing' (repeatable: all must hold)",
    )
    p.add_argument(
        "--facet", action="append", default=[], metavar="FIELD", help="count this attribute's (or category's) values (repeatable)"
    )
    p.add_argument("--no-group", action="store_true", help="list images, not products (a product may repeat)")
    p.add_argument(
        "--collapse",
        choices=["variant_group"],
        help="one result per variant group (products whose images are near-duplicates), its best",
    )
    p.add_argument("--device", default=env.device)
    p.add_argument("--json", action="store_true")


def add_eval(command: Command, env: Settings) -> None:
    p = command("eval", _eval, "Score retrieval: search a gallery (in a temporary index) or an existing --index with queries.")
    p.add_argument("--gallery", type=Path, help="CSV with columns id,image[,category]")
    p.add_argument("--index", type=Path, help="evaluate this existing index as it serves (instead of --gallery)")
    p.add_argument("--regions", action="store_true", help="score products by their best-matching region of the photo")
    p.add_argument("--queries", required=True, type=Path, help="CSV with columns image[,expected_id][,category]")
    p.add_argument("--model", default=env.model or "efficientnet-lite2")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--center-on", help="folder/CSV of unlabelled in-domain photos, or 'queries'")
    p.add_argument("--workers", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write DIR/index.html: one self-contained page (no external requests) with the summary, "
        "Recall@k per category, the most confused products and the worst misses as thumbnails",
    )


def _search(args: argparse.Namespace) -> int:
    from .attributes import parse_where
    from .engine import Engine
    from .facets import facets_json
    from .query import SearchOptions

    where = parse_where(args.where)
    with Engine.open(args.index, device=args.device) as engine:
        hits = engine.search(
            args.image,
            text=args.text,
            text_weight=args.text_weight,
            k=args.k,
            categories=args.category,
            exclude_categories=args.exclude_category,
            group_by_product=not args.no_group,
            where=where,
            collapse=args.collapse or "",
        )
        scope = SearchOptions(categories=args.category or (), exclude_categories=args.exclude_category or (), where=where)
        facets = engine.facets(replace(scope, facets=tuple(args.facet)), hits) if args.facet else {}
    if args.json:
        print_json({"results": [h.to_dict() for h in hits], **({"facets": facets_json(facets)} if facets else {})})
        return 0
    for rank, hit in enumerate(hits, start=1):
        more = f"  (+{plural(hit.variant_count - 1, 'variant')})" if hit.variant_count > 1 else ""
        print(f"{rank:>3}  {hit.score:.4f}  {hit.product_id}  [{hit.category}]  {hit.title}{more}")
    for name, parts in facets.items():
        shown = ", ".join(f"{json.dumps(c.value, ensure_ascii=False)} ({c.count})" for c in parts["all"])
        print(f"{name}: {shown or '(none)'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .evaluate import evaluate, evaluate_index

    if (args.gallery is None) == (args.index is None):
        raise ConfigError("give exactly one of --gallery or --index")
    if args.index is not None:
        metrics = evaluate_index(args.index, args.queries, k=args.k, regions=args.regions, report=args.report)
    else:
        metrics = evaluate(
            args.gallery,
            args.queries,
            model=args.model,
            k=args.k,
            center_on=args.center_on,
            workers=args.workers,
            regions=args.regions,
            report=args.report,
        )
    if args.report is not None:
        print(f"report: {args.report / 'index.html'}", file=sys.stderr)
    if args.json:
        print_json(metrics)
        return 0
    for key, value in metrics.items():
        print(f"{key:<22} {'-' if value is None else value}")
    return 0
