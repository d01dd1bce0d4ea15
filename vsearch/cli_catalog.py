"""``vsearch ingest``, ``import``, ``export``, ``dups``, ``info``: what goes into a catalog and what it holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import Command, index_arg, plural, print_json, verb

if TYPE_CHECKING:
    from .config import IndexConfig, ProjectionConfig
    from .errors import NothingIngestedError
    from .ingest import IngestReport
    from .settings import Settings

__all__ = ["add_dups", "add_export", "add_import", "add_info", "add_ingest"]


def add_ingest(command: Command, env: Settings) -> None:
    p = command("ingest", _ingest, "Add a folder or CSV/JSONL manifest of product images to an index (incremental).")
    p.add_argument("source", help="folder (category = sub-folder) or manifest with columns id,image,category,title")
    index_arg(p, env.index_dir)
    p.add_argument("--model", default=env.model, help="model for a new index (default: efficientnet-lite2); see `vsearch models`")
    p.add_argument("--layers", nargs="+", help="intermediate layers to pool (e.g. stage3 head)")
    p.add_argument(
        "--pooling", nargs="+", choices=["mean", "gem"], help="how the layers' maps are pooled: one for all, or one per layer"
    )
    p.add_argument("--gem-p", type=float, help="GeM exponent")
    p.add_argument("--center-on", metavar="SOURCE", help="folder/manifest of unlabelled shopper photos to centre on")
    _new_index_args(p)
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


def _new_index_args(p: argparse.ArgumentParser) -> None:
    """What shapes a new index (an existing one keeps its own): ingest's and import's."""
    p.add_argument("--pca", type=int, default=256, metavar="DIM", help="PCA dimension for a new index (default 256; 0: none)")
    p.add_argument("--no-center", action="store_true", help="do not centre vectors (new index only)")
    p.add_argument("--factory", help="faiss factory string (default: chosen by catalog size)")
    p.add_argument(
        "--raw-vectors",
        choices=["float16", "float32"],
        default="float16",
        help="how the catalog stores raw vectors (new index only; default float16: half the bytes, no recall lost)",
    )


def _new_index_configs(args: argparse.Namespace) -> tuple[ProjectionConfig, IndexConfig]:
    """The configs ``_new_index_args`` describe."""
    from .config import IndexConfig, ProjectionConfig

    projection = ProjectionConfig(center=not args.no_center, pca_dim=args.pca or None)
    return projection, IndexConfig(factory=args.factory, raw_vectors=args.raw_vectors)


def add_import(command: Command, env: Settings) -> None:
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
    index_arg(p, env.index_dir)
    p.add_argument(
        "--model", default=env.model, help="model for a new index (default: the shards' vsearch.model, else efficientnet-lite2)"
    )
    _new_index_args(p)
    p.add_argument("--batch-size", type=int, default=4096, help="rows per transaction (default 4096)")
    p.add_argument("--device", default=env.device, help="where the model runs if a new index needs its dimension")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def add_export(command: Command, env: Settings) -> None:
    p = command("export", _export, "Write an index's images, products and stored vectors to a Parquet file (for vsearch import).")
    index_arg(p, env.index_dir)
    p.add_argument("out", type=Path, help="the Parquet file to write")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")


def add_dups(command: Command, env: Settings) -> None:
    p = command("dups", _dups, "List variant groups (products with near-duplicate images) and images repeated within a product.")
    index_arg(p, env.index_dir)
    p.add_argument("--link", action="store_true", help="first link the images not linked yet (e.g. after an upgrade)")
    p.add_argument("--json", action="store_true")


def add_info(command: Command, env: Settings) -> None:
    p = command("info", _info, "Describe an index: counts, model, layers, dimension, faiss factory.")
    index_arg(p, env.index_dir)
    p.add_argument("--json", action="store_true")


def _ingest(args: argparse.Namespace) -> int:
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
    projection, index = _new_index_configs(args)
    with Engine.open(
        args.index,
        model=model,
        projection=projection,
        index=index,
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
        print_json({**report.to_dict(), "index": info})
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
    _print_not_linked(info)


def _print_not_linked(info: dict[str, Any]) -> None:
    if pending := info["duplicates"]["images_not_linked"]:
        print(
            f"{plural(pending, 'image')} not linked to their near-duplicates yet: "
            "vsearch serve links them in the background, or run vsearch dups --link"
        )


def _ingest_notes(report: IngestReport) -> list[str]:
    """What the counts alone hide: products left out, and rows that were merged."""
    notes = []
    if report.products_skipped:
        n = len(report.products_skipped)
        notes.append(f"{plural(n, 'product')} not created: none of {'its' if n == 1 else 'their'} images could be stored")
    if report.shared_id_rows:
        notes.append(
            f"{plural(report.shared_id_rows, 'row')} {verb(report.shared_id_rows, 'share')} a product id with an earlier row "
            f"({plural(report.shared_id_products, 'product')}): treated as more images of that product"
        )
    if report.disagreements:
        pid, fields = next(iter(report.disagreements.items()))
        notes.append(
            f"the rows of {plural(len(report.disagreements), 'product')} disagree on "
            f"{', '.join(sorted({f for fs in report.disagreements.values() for f in fs}))} "
            f"(e.g. {pid}: {', '.join(fields)}): the last row's non-empty value wins"
        )
    if report.duplicates:
        n = report.duplicates
        notes.append(f"{plural(n, 'row')} {verb(n, 'repeat')} an earlier row's id and image: ignored")
    return notes


def _nothing_ingested(report: IngestReport, source: str, rejects: Path) -> NothingIngestedError:
    from .errors import NothingIngestedError

    first = report.rejected[0]
    every = "its one item was" if report.items == 1 else f"all {report.items} items were"
    return NothingIngestedError(
        f"nothing ingested from {source}: {every} rejected, e.g. {first.source}: {first.reason} (every reject is in {rejects})"
    )


def _import(args: argparse.Namespace) -> int:
    from .bulkimport import import_shards, open_index
    from .errors import NothingIngestedError

    projection, index = _new_index_configs(args)
    with open_index(
        args.index,
        args.shards,
        model=args.model,
        projection=projection,
        index=index,
        device=args.device,
    ) as engine:
        report = import_shards(engine, args.shards, batch_size=args.batch_size, quiet=args.quiet)
        info = engine.info()
    if args.json:
        print_json({**report.to_dict(), "index": info})
    elif not report.failed:
        print(
            f"{report.rows} rows from {plural(report.shards, 'shard')}: {report.added} added, {report.unchanged} unchanged, "
            f"{len(report.rejected)} rejected ({report.rows_per_s:.0f} rows/s)"
        )
        for reject in report.rejected[:20]:
            print(f"  rejected {reject.shard} row {reject.row}: {reject.reason}")
        if len(report.rejected) > 20:
            print(f"  ... {len(report.rejected) - 20} more in {args.index / 'rejects.jsonl'}")
        print(f"index {args.index}: {info['products']} products, {info['images']} images, {info['vectors']} vectors")
        _print_not_linked(info)
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


def _dups(args: argparse.Namespace) -> int:
    from .engine import Engine

    with Engine.open(args.index, mmap=not args.link) as engine:
        if args.link:
            engine.link_variants()
        groups, within = engine.variant_groups()
        pending = engine.images_not_linked()
    if args.json:
        print_json(
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
    print(f"{plural(len(groups), 'variant group')}, {plural(len(within), 'repeated image')} within products")
    if pending:
        print(f"{plural(pending, 'image')} not linked to their near-duplicates yet: vsearch dups --link")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .engine import Engine

    with Engine.open(args.index, mmap=True) as engine:  # mapped, not read into memory, where the file is current
        info = engine.info()
    if args.json:
        print_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
