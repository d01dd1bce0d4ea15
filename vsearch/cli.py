"""The ``vsearch`` command: parse arguments, call one library function, print.

User errors print one line and exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FinetuneConfig
from .errors import VsearchError
from .settings import settings

if TYPE_CHECKING:
    from .errors import NothingIngestedError
    from .ingest import IngestReport

__all__ = ["main", "build_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    from .malloc import tune_malloc

    tune_malloc()  # before torch allocates anything; see vsearch/malloc.py
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.image is None and not args.text:  # a usage error: exit 2
        parser.error("search needs an image, --text WORDS, or both")
    try:
        code: int = args.run(args)
        return code
    except VsearchError as exc:
        print(f"vsearch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vsearch: interrupted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from .fusion import DEFAULT_TEXT_WEIGHT

    env = settings()
    parser = argparse.ArgumentParser(prog="vsearch", description="Visual similarity search for product catalogs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command("ingest", _ingest, "Add a folder or CSV/JSONL manifest of product images to an index (incremental).")
    p.add_argument("source", help="folder (category = sub-folder) or manifest with columns id,image,category,title")
    _index_arg(p, env.index_dir)
    p.add_argument("--model", default=env.model, help="model for a new index (default: efficientnet-lite2); see `vsearch models`")
    p.add_argument("--layers", nargs="+", help="intermediate layers to pool (e.g. stage3 head)")
    p.add_argument(
        "--pooling", nargs="+", choices=["mean", "gem"], help="how the layers' maps are pooled: one for all, or one per layer"
    )
    p.add_argument("--gem-p", type=float, help="GeM exponent")
    p.add_argument("--pca", type=int, default=256, metavar="DIM", help="PCA dimension for a new index (default 256; 0: none)")
    p.add_argument("--no-center", action="store_true", help="do not centre vectors (new index only)")
    p.add_argument("--center-on", metavar="SOURCE", help="folder/manifest of unlabelled shopper photos to centre on")
    p.add_argument("--factory", help="faiss factory string (default: chosen by catalog size)")
    p.add_argument(
        "--raw-vectors",
        choices=["float16", "float32"],
        default="float16",
        help="how the catalog stores raw vectors (new index only; default float16: half the bytes, no recall lost)",
    )
    p.add_argument("--prune", action="store_true", help="remove products and images the source no longer lists")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="image decoding processes (default: by device and cores; 0 decodes in-process)")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="decode and embed on Ray (pip install 'vsearch[ray]'): a private local Ray without ADDRESS, "
        "'auto' for the cluster `ray start` made on this machine, or ray://HOST:10001",
    )
    p.add_argument("--actors", type=int, help="with --ray: model replicas (default: one per GPU, else one per CPU)")
    p.add_argument("--ray-cpus", type=int, metavar="N", help="with --ray and no ADDRESS: CPUs of the local Ray (default: all)")
    p.add_argument("--keep-shards", action="store_true", help="with --ray: keep the shards (DIR/ray-shards/) once imported")

    p = command(
        "import",
        _import,
        "Add precomputed embeddings from Parquet shards (id,image,sha256,vector[,category,title,...]); resumable.",
    )
    p.add_argument(
        "shards",
        nargs="+",
        type=Path,
        help="Parquet files; any column besides id,image,sha256,vector,category,title,width,height becomes an attribute",
    )
    _index_arg(p, env.index_dir)
    p.add_argument(
        "--model", default=env.model, help="model for a new index (default: the shards' vsearch.model, else efficientnet-lite2)"
    )
    p.add_argument("--pca", type=int, default=256, metavar="DIM", help="PCA dimension for a new index (default 256; 0: none)")
    p.add_argument("--no-center", action="store_true", help="do not centre vectors (new index only)")
    p.add_argument("--factory", help="faiss factory string (default: chosen by catalog size)")
    p.add_argument(
        "--raw-vectors",
        choices=["float16", "float32"],
        default="float16",
        help="how the catalog stores raw vectors (new index only; default float16: half the bytes, no recall lost)",
    )
    p.add_argument("--batch-size", type=int, default=4096, help="rows per transaction (default 4096)")
    p.add_argument("--device", default=env.device, help="where the model runs if a new index needs its dimension")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")

    p = command("export", _export, "Write an index's images, products and stored vectors to a Parquet file (for vsearch import).")
    _index_arg(p, env.index_dir)
    p.add_argument("out", type=Path, help="the Parquet file to write")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")

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
    _index_arg(p, env.index_dir)
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

    p = command("dups", _dups, "List variant groups (products with near-duplicate images) and images repeated within a product.")
    _index_arg(p, env.index_dir)
    p.add_argument("--link", action="store_true", help="first link the images not linked yet (e.g. after an upgrade)")
    p.add_argument("--json", action="store_true")

    p = command("info", _info, "Describe an index: counts, model, layers, dimension, faiss factory.")
    _index_arg(p, env.index_dir)
    p.add_argument("--json", action="store_true")

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

    tune = FinetuneConfig()  # the defaults, shown in --help
    p = command(
        "finetune",
        _finetune,
        "Train a new model version on labelled shopper photos: image,product_id pairs (tell products apart) "
        "or image,category pairs (class level: more of the same kind).",
    )
    _index_arg(p, env.index_dir)
    p.add_argument(
        "--pairs",
        required=True,
        type=Path,
        help="CSV/JSONL with columns image,product_id (products in the index), "
        "or image,category without product ids (class level)",
    )
    p.add_argument("--name", help="version name (default: ft-001, ft-002, ...; an interrupted run with the same data resumes)")
    p.add_argument("--epochs", type=int, default=tune.epochs, help="most epochs (default %(default)s; may stop sooner)")
    p.add_argument(
        "--train-from",
        default=tune.train_from,
        help="first retrained stage (default %(default)s); earlier ones stay frozen",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=tune.val_fraction,
        help="photos held out to validate (default %(default)s)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=tune.patience,
        help="epochs without a better val Recall@1 (default %(default)s)",
    )
    p.add_argument(
        "--zero-shot-weight",
        type=float,
        default=tune.zero_shot_weight,
        help="share of similarity kept from the pretrained model (default %(default)s)",
    )
    p.add_argument(
        "--untrained-weight",
        type=float,
        default=tune.untrained_weight,
        help="that share for catalog images of products without training photos (default %(default)s)",
    )
    p.add_argument("--views", type=int, default=tune.views, help="augmented views cached per photo (default %(default)s)")
    p.add_argument(
        "--feature-crop",
        type=float,
        default=tune.feature_crop,
        help="smallest side of a random crop of the cached activations, per batch (default %(default)s; 1 = none)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=tune.margin,
        help="cosine margin the true proxy must win by (CosFace; default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=tune.batch_size, help="default %(default)s")
    p.add_argument("--seed", type=int, default=tune.seed, help="default %(default)s")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")

    p = command("reindex", _reindex, "Embed the catalog with a model version (only what it lacks; resumable), then serve it.")
    _index_arg(p, env.index_dir)
    p.add_argument("--model", help="model version (default: the active one); see `vsearch model list`")
    p.add_argument("--workers", type=int, help="image decoding processes (default: by device and cores)")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")

    p = command("refit", _refit, "Refit the projection (centring/PCA) and rebuild the index with it; no catalog vector changes.")
    _index_arg(p, env.index_dir)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--from-queries", action="store_true", help="on the shoppers' query photos a server collected (query_vectors.npz)"
    )
    what.add_argument("--catalog", action="store_true", help="on a sample of the catalog's own vectors (the default fit)")
    what.add_argument("--center-on", metavar="SOURCE", help="on a folder/manifest of unlabelled in-domain photos")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")

    p = command("model", _model, "List an index's model versions, switch to one (rollback), or remove one.")
    _index_arg(p, env.index_dir)
    p.add_argument("action", choices=["list", "use", "remove"], help="list | use NAME | remove NAME")
    p.add_argument("name", nargs="?", help="version name (base = the pretrained model)")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")

    p = command("models", _models, "List the built-in models: layers, pooling and raw_dim (the length of their raw vectors).")
    p.add_argument("--json", action="store_true")

    p = command("serve", _serve, "Serve the HTTP API (/v1), the web page (/) and the OpenAPI docs (/docs).")
    _index_arg(p, env.index_dir)
    _serve_args(p)

    p = command("demo", _demo, "Build a demo index from a product-image folder, then serve it.")
    p.add_argument("--data", default=env.demo_data, help="data folder, e.g. ../shared/datasets/grocery-store")
    _index_arg(p, "indexes/demo")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-serve", action="store_true", help="build the index and exit")
    _serve_args(p)
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--config", help="JSON file of serve settings (API keys, limits); env VSEARCH_CONFIG")
    p.add_argument(
        "--batch-max", type=int, help="micro-batch size: concurrent queries share a forward (1: off; default 16 on GPU, 1 on CPU)"
    )


def _index_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--index", default=default, type=Path, help=f"index directory (default: {default}; env VSEARCH_INDEX)")


def _ingest(args: argparse.Namespace) -> int:
    from .config import IndexConfig, ProjectionConfig
    from .engine import DEFAULT_MODEL, Engine
    from .errors import ConfigError
    from .presets import resolve_model

    if args.ray is None and (args.actors or args.ray_cpus or args.keep_shards):
        raise ConfigError("--actors, --ray-cpus and --keep-shards go with --ray")
    if args.ray is not None:
        from .rayingest import require_ray

        if args.workers is not None:
            raise ConfigError("--workers sizes in-process decoding; with --ray, actors decode (see --actors)")
        require_ray()  # before anything is created
    model = None  # an existing index keeps the model it was built with
    if args.model or args.layers or args.pooling or args.gem_p:
        model = resolve_model(args.model or DEFAULT_MODEL, layers=args.layers, pooling=args.pooling, gem_p=args.gem_p)
    projection = ProjectionConfig(center=not args.no_center, pca_dim=args.pca or None)
    with Engine.open(
        args.index,
        model=model,
        projection=projection,
        index=IndexConfig(factory=args.factory, raw_vectors=args.raw_vectors),
        create=True,
        device=args.device,
    ) as engine:
        if args.ray is not None:
            from .rayingest import ray_ingest

            report: IngestReport = ray_ingest(
                engine,
                args.source,
                address=args.ray,
                actors=args.actors,
                num_cpus=args.ray_cpus,
                device=args.device,
                batch_size=args.batch_size,
                prune=args.prune,
                center_on=args.center_on,
                keep_shards=args.keep_shards,
                quiet=args.quiet,
            )
        else:
            report = engine.ingest(
                args.source,
                prune=args.prune,
                center_on=args.center_on,
                batch_size=args.batch_size,
                workers=args.workers,
                quiet=args.quiet,
            )
        info = engine.info()
    if args.json:
        _print_json({**report.to_dict(), "index": info})
    elif not report.failed:
        _print_ingest_summary(report, args.index, info)
        ray = report.to_dict().get("ray")
        if isinstance(ray, dict):  # a --ray run: where the time went
            print(
                f"ray: {ray['actors']} actors, {ray['computed']} vectors computed, {ray['reused']} reused; "
                f"start {ray['ray_start_s']:.1f} s, first result {ray['first_result_s']:.1f} s, "
                f"then {ray['steady_images_per_s']:.1f} images/s; import {ray['import_s']:.1f} s"
            )
    if report.failed:
        raise _nothing_ingested(report, args.source, args.index / "rejects.jsonl")
    return 0


def _print_ingest_summary(report: IngestReport, index: Path, info: dict[str, Any]) -> None:
    print(
        f"{report.items} items: {report.embedded} embedded, {report.unchanged} unchanged, "
        f"{len(report.rejected)} rejected, {report.removed_products} products removed "
        f"({report.images_per_s:.1f} images/s)"
    )
    for line in _ingest_notes(report):
        print(f"  {line}")
    for reject in report.rejected[:20]:
        print(f"  rejected {reject.source}: {reject.reason}")
    if len(report.rejected) > 20:
        print(f"  ... {len(report.rejected) - 20} more in {index / 'rejects.jsonl'}")
    print(f"index {index}: {info['products']} products, {info['images']} images, {info['vectors']} vectors")


def _ingest_notes(report: IngestReport) -> list[str]:
    """What the counts alone hide: products left out, and rows that were merged."""
    notes = []
    if report.products_skipped:
        n = len(report.products_skipped)
        notes.append(f"{_plural(n, 'product')} not created: none of {'its' if n == 1 else 'their'} images could be stored")
    if report.shared_id_rows:
        notes.append(
            f"{_plural(report.shared_id_rows, 'row')} {_verb(report.shared_id_rows, 'share')} a product id with an earlier row "
            f"({_plural(report.shared_id_products, 'product')}): treated as more images of that product"
        )
    if report.disagreements:
        pid, fields = next(iter(report.disagreements.items()))
        notes.append(
            f"the rows of {_plural(len(report.disagreements), 'product')} disagree on "
            f"{', '.join(sorted({f for fs in report.disagreements.values() for f in fs}))} "
            f"(e.g. {pid}: {', '.join(fields)}): the last row's non-empty value wins"
        )
    if report.duplicates:
        n = report.duplicates
        notes.append(f"{_plural(n, 'row')} {_verb(n, 'repeat')} an earlier row's id and image: ignored")
    return notes


def _nothing_ingested(report: IngestReport, source: str, rejects: Path) -> NothingIngestedError:
    from .errors import NothingIngestedError

    first = report.rejected[0]
    every = "its one item was" if report.items == 1 else f"all {report.items} items were"
    return NothingIngestedError(
        f"nothing ingested from {source}: {every} rejected, e.g. {first.source}: {first.reason} (every reject is in {rejects})"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _verb(n: int, verb: str) -> str:
    return f"{verb}s" if n == 1 else verb


def _import(args: argparse.Namespace) -> int:
    from .bulkimport import import_shards, open_index
    from .config import IndexConfig, ProjectionConfig
    from .errors import NothingIngestedError

    projection = ProjectionConfig(center=not args.no_center, pca_dim=args.pca or None)
    with open_index(
        args.index,
        args.shards,
        model=args.model,
        projection=projection,
        index=IndexConfig(factory=args.factory, raw_vectors=args.raw_vectors),
        device=args.device,
    ) as engine:
        report = import_shards(engine, args.shards, batch_size=args.batch_size, quiet=args.quiet)
        info = engine.info()
    if args.json:
        _print_json({**report.to_dict(), "index": info})
    elif not report.failed:
        print(
            f"{report.rows} rows from {_plural(report.shards, 'shard')}: {report.added} added, {report.unchanged} unchanged, "
            f"{len(report.rejected)} rejected ({report.rows_per_s:.0f} rows/s)"
        )
        for reject in report.rejected[:20]:
            print(f"  rejected {reject.shard} row {reject.row}: {reject.reason}")
        if len(report.rejected) > 20:
            print(f"  ... {len(report.rejected) - 20} more in {args.index / 'rejects.jsonl'}")
        print(f"index {args.index}: {info['products']} products, {info['images']} images, {info['vectors']} vectors")
    if report.failed:
        first = report.rejected[0]
        raise NothingIngestedError(
            f"nothing imported: all {report.rows} rows were rejected, e.g. {first.shard} row {first.row}: {first.reason} "
            f"(every reject is in {args.index / 'rejects.jsonl'})"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .bulkimport import export_parquet
    from .engine import Engine

    with Engine.open(args.index) as engine:
        rows = export_parquet(engine, args.out, batch_size=args.batch_size)
        model, version = engine.manifest.model.name, engine.active
    print(f"exported {rows} images with their {model} (version {version}) vectors to {args.out}")
    return 0


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
        _print_json({"results": [h.to_dict() for h in hits], **({"facets": facets_json(facets)} if facets else {})})
        return 0
    for rank, hit in enumerate(hits, start=1):
        more = f"  (+{_plural(hit.variant_count - 1, 'variant')})" if hit.variant_count > 1 else ""
        print(f"{rank:>3}  {hit.score:.4f}  {hit.product_id}  [{hit.category}]  {hit.title}{more}")
    for name, parts in facets.items():
        shown = ", ".join(f"{json.dumps(c.value, ensure_ascii=False)} ({c.count})" for c in parts["all"])
        print(f"{name}: {shown or '(none)'}")
    return 0


def _dups(args: argparse.Namespace) -> int:
    from .engine import Engine

    with Engine.open(args.index, mmap=not args.link) as engine:
        if args.link:
            engine.link_variants()
        groups, within = engine.variant_groups()
        pending = engine.catalog.read("SELECT count(*) FROM variant_pending", [])[0][0]
    if args.json:
        _print_json(
            {
                "groups": [g.to_dict() for g in groups],
                "within_products": [{"product_id": p, "images": [a, b]} for p, a, b in within],
                "images_not_yet_linked": pending,
            }
        )
        return 0
    for group in groups:
        print(f"{group.group_id}: {len(group.products)} products: {', '.join(group.products)}")
    for product, a, b in within:
        print(f"{product}: images {a} and {b} are near-duplicates")
    print(f"{_plural(len(groups), 'variant group')}, {_plural(len(within), 'repeated image')} within products")
    if pending:
        print(f"{_plural(pending, 'image')} not linked to their near-duplicates yet: vsearch dups --link")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .engine import Engine

    with Engine.open(args.index, mmap=True) as engine:  # mapped, not read into memory, where the file is current
        info = engine.info()
    if args.json:
        _print_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
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
        _print_json(metrics)
        return 0
    for key, value in metrics.items():
        print(f"{key:<22} {'-' if value is None else value}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .finetune import finetune

    config = FinetuneConfig(
        epochs=args.epochs,
        train_from=args.train_from,
        val_fraction=args.val_fraction,
        patience=args.patience,
        zero_shot_weight=args.zero_shot_weight,
        untrained_weight=args.untrained_weight,
        views=args.views,
        feature_crop=args.feature_crop,
        margin=args.margin,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    with Engine.open(args.index, device=args.device) as engine:
        report = finetune(engine, args.pairs, name=args.name, config=config, quiet=args.quiet)
    if args.json:
        _print_json(report.to_dict())
        return 0
    if report.level == "category":
        value, metric = report.val_precision_at_10, "val category precision@10"
    else:
        value, metric = report.val_recall_at_1, "val Recall@1"
    shown = "-" if value is None else f"{value:.3f}"
    print(
        f"model version {report.name}: best epoch {report.best_epoch}, {metric} {shown}, "
        f"{report.data['train_photos']} train photos, {report.seconds:.0f} s"
    )
    print(f"serve it with: vsearch reindex --index {args.index} --model {report.name}")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from .engine import Engine

    with Engine.open(args.index, device=args.device) as engine:
        report = engine.reindex(args.model, quiet=args.quiet, workers=args.workers)
    if args.json:
        _print_json(report.to_dict())
        return 0
    print(
        f"model {report.model}: {report.embedded} images embedded, {report.unreadable} unreadable, "
        f"{report.changed} changed on disk (re-ingest them); {report.vectors} vectors served"
        + (" (switched)" if report.switched else "")
    )
    return 0


def _refit(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .refit import fit_projection, refit_from_queries

    with Engine.open(args.index, device=args.device) as engine:
        if args.from_queries:
            refit_from_queries(engine)
        else:
            fit_projection(engine, args.center_on)
        projection = engine.info()["projection"]
    print(f"projection fitted on {projection['fitted_on']} vectors from {projection['fitted_from']}")
    return 0


def _model(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .errors import ConfigError

    if args.action != "list" and not args.name:
        raise ConfigError(f"vsearch model {args.action} needs a version name (see: vsearch model list)")
    with Engine.open(args.index, device=args.device) as engine:
        if args.action == "use":
            report = engine.use_model(args.name, quiet=args.quiet)
            print(f"serving model {args.name} ({report.embedded} images embedded, {report.vectors} vectors)")
            return 0
        if args.action == "remove":
            engine.remove_model(args.name)
            print(f"removed model version {args.name}")
            return 0
        versions = [v.to_dict() for v in engine.models()]
    if args.json:
        _print_json(versions)
        return 0
    for v in versions:
        r1 = v.get("val_recall_at_1")
        detail = v["kind"] + (f", val Recall@1 {r1:.3f}, {v.get('trained_on')} photos" if r1 is not None else "")
        print(f"{'*' if v['active'] else ' '} {v['name']:<12} {detail}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .embed import raw_dim
    from .presets import preset, preset_names

    configs = [{**preset(n).to_dict(), "raw_dim": raw_dim(preset(n))} for n in preset_names()]
    if args.json:
        _print_json(configs)
        return 0
    for c in configs:
        pooling = c["pooling"] if isinstance(c["pooling"], str) else ",".join(c["pooling"])
        layers = ",".join(c["layers"])
        print(f"{c['name']:<20} {c['arch']:<24} {c['image_size']}px  layers={layers}  pooling={pooling}  raw_dim={c['raw_dim']}")
    print("any open_clip model as MODEL:PRETRAINED, e.g. ViT-B-32:laion2b_s34b_b79k (downloads on first use)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_demo

    build_demo(args.data, args.index, quiet=args.quiet).close()
    return 0 if args.no_serve else _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app
    from .settings import serve_config

    config = serve_config(args.config, index_dir=str(args.index), batch_max=args.batch_max)
    if not Path(config.index_dir, "manifest.json").exists():
        from .errors import IndexNotFoundError

        raise IndexNotFoundError(
            f"no index at {config.index_dir} (build one with: vsearch ingest SOURCE --index {config.index_dir})"
        )
    print(f"vsearch: serving {config.index_dir} at http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _version() -> str:
    from .version import __version__

    return f"vsearch {__version__}"
