"""``vsearch finetune``, ``reindex``, ``refit``, ``model``, ``models``: an index's model versions and projection."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import Command, index_arg, print_json
from .config import FinetuneConfig

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["add_finetune", "add_model", "add_models", "add_refit", "add_reindex"]


def add_finetune(command: Command, env: Settings) -> None:
    tune = FinetuneConfig()  # the defaults, shown in --help
    p = command(
        "finetune",
        _finetune,
        "Train a new model version on labelled shopper photos: image,product_id pairs (tell products apart) "
        "or image,category pairs (class level: more of the same kind).",
    )
    index_arg(p, env.index_dir)
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
    p.add_argument(
        "--hue-jitter",
        type=float,
        default=tune.hue_jitter,
        help="largest hue shift of the augmented views, a share of the colour circle "
        "(default: 0 for product ids, where a colour can tell products apart; 0.05 for categories)",
    )
    p.add_argument("--batch-size", type=int, default=tune.batch_size, help="default %(default)s")
    p.add_argument("--seed", type=int, default=tune.seed, help="default %(default)s")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")


def add_reindex(command: Command, env: Settings) -> None:
    p = command("reindex", _reindex, "Embed the catalog with a model version (only what it lacks; resumable), then serve it.")
    index_arg(p, env.index_dir)
    p.add_argument("--model", help="model version (default: the active one); see `vsearch model list`")
    p.add_argument("--workers", type=int, help="image decoding processes (default: by device and cores)")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def add_refit(command: Command, env: Settings) -> None:
    p = command("refit", _refit, "Refit the projection (centring/PCA) and rebuild the index with it; no catalog vector changes.")
    index_arg(p, env.index_dir)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--from-queries", action="store_true", help="on the shoppers' query photos a server collected (query_vectors.npz)"
    )
    what.add_argument("--catalog", action="store_true", help="on a sample of the catalog's own vectors (the default fit)")
    what.add_argument("--center-on", metavar="SOURCE", help="on a folder/manifest of unlabelled in-domain photos")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")


def add_model(command: Command, env: Settings) -> None:
    p = command("model", _model, "List an index's model versions, switch to one (rollback), or remove one.")
    index_arg(p, env.index_dir)
    p.add_argument("action", choices=["list", "use", "remove"], help="list | use NAME | remove NAME")
    p.add_argument("name", nargs="?", help="version name (base = the pretrained model)")
    p.add_argument("--device", default=env.device, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")


def add_models(command: Command, env: Settings) -> None:
    p = command("models", _models, "List the built-in models: layers, pooling and raw_dim (the length of their raw vectors).")
    p.add_argument("--json", action="store_true")


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
        hue_jitter=args.hue_jitter,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    with Engine.open(args.index, device=args.device) as engine:
        report = finetune(engine, args.pairs, name=args.name, config=config, quiet=args.quiet)
    if args.json:
        print_json(report.to_dict())
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
        print_json(report.to_dict())
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
        print_json(versions)
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
        print_json(configs)
        return 0
    for c in configs:
        pooling = c["pooling"] if isinstance(c["pooling"], str) else ",".join(c["pooling"])
        layers = ",".join(c["layers"])
        print(f"{c['name']:<20} {c['arch']:<24} {c['image_size']}px  layers={layers}  pooling={pooling}  raw_dim={c['raw_dim']}")
    print("any open_clip model as MODEL:PRETRAINED, e.g. ViT-B-32:laion2b_s34b_b79k (downloads on first use)")
    return 0
