#!/usr/bin/env python3
"""Benchmark (not a test): which layers and pooling should the default model use? (issue 11, part 3)

Scores layer sets {head}, {stage4}, {stage4, head}, {stage3, stage4, head} x pooling
{mean, gem} (one pooling for every layer) of ``--model`` (default
efficientnet-lite2) on BOTH shared protocols (``scripts/make_protocols.py``):

  grocery   gallery = the 81 iconic images, queries = the 296 val photos; hit = the
            nearest product is (Recall@1) / the top 10 hold (Recall@10) the photo's
            product. Projection fitted as ``vsearch ingest`` does by default (on the
            catalog's own stored vectors: 81, so centring only) and as ``--center-on
            center.csv`` does (on unlabelled in-domain photos, query-side): all 2,640
            train photos would take another 15 minutes to embed, so a fixed sample of
            ``--center-sample`` (500, seed 0). 500 is under 2 x pca_dim, so centring
            only: it gives the default model 0.483 / 0.872, as bench_day_one.py's
            500-photo refit (0.480 / 0.875) and near ``vsearch eval --center-on`` on all
            2,640 (0.483 / 0.878, PCA). With 600 the 256-dim PCA applies, fitted on
            barely more photos than it has dimensions, and cost 2-4 points Recall@1.
  clothing  gallery = the 1,536 train photos, queries = the 341 validation photos;
            category precision@10 (share of the 10 nearest gallery images in the
            query's class, as ``vsearch.evaluate.score``); projection fitted on the
            catalog (centring + PCA 256, the default ``ProjectionConfig``).

The backbone runs once per image (layers stage3, stage4 and head at once); each
layer is pooled both ways and L2-normalised, and cached in ``--work`` as
``emb-*.npz``, so a rerun does no model work. Every combination is then built from
the parts exactly as ``vsearch.embed.Embedder`` does: parts L2-normalised,
concatenated, L2-normalised; query-side vectors (val/validation photos, centring
photos) average the full photo with its 0.8 centre crop (``query_tta``); decoding
and preprocessing are vsearch's (``decode_image`` at the model's decode side,
``Preprocess``); catalog vectors go through the float16 store (``IndexConfig``
default) before fitting and searching; search is exact inner product after the
projection. Writes ``--work/pooling.json`` too.

    .venv/bin/python scripts/bench_pooling.py --work /tmp/pooling
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = ("stage3", "stage4", "head")  # run once; every combination is a subset
POOLINGS = ("mean", "gem")  # "mean" is vsearch's name for average pooling
COMBOS = [("head",), ("stage4",), ("stage4", "head"), ("stage3", "stage4", "head")]
BATCH = 32


def protocols(data: Path, work: Path) -> Path:
    out = work / "protocols"
    if not ((out / "grocery" / "gallery.csv").exists() and (out / "clothing" / "gallery.csv").exists()):
        script = Path(__file__).with_name("make_protocols.py")
        subprocess.run([sys.executable, str(script), "--data", str(data), "--out", str(out)], check=True)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of ``path``, with ``image`` resolved against the CSV's folder (as ``vsearch eval``)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        image = row["image"].strip()
        row["image"] = image if "://" in image else str((path.parent / image).resolve())
    return rows


def embed_set(work: Path, name: str, paths: list[str], tta: bool, model: str, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per layer and pooling, the L2-normalised pooled part of every image in ``paths``
    (keys ``LAYER-POOLING``; with ``tta`` also ``LAYER-POOLING-crop`` for the 0.8 centre
    crop), in ``paths`` order. Cached per image in ``work/emb-NAME.npz``: only images
    the cache lacks are embedded (another ``--center-sample`` reuses the overlap)."""
    cache = work / f"emb-{name}.npz"
    known: dict[str, np.ndarray] = {}
    cached: list[str] = []
    if cache.exists():
        with np.load(cache) as data:
            if str(data["model"]) == model:
                cached = data["paths"].tolist()
                known = {k: data[k] for k in data.files if k not in ("paths", "model")}
    row_of = {p: i for i, p in enumerate(cached)}
    missing = [p for p in dict.fromkeys(paths) if p not in row_of]
    if missing:
        fresh = embed_images(name, missing, tta, model, state)
        known = {k: np.concatenate([known[k], v]) if k in known else v for k, v in fresh.items()}
        cached += missing
        row_of = {p: i for i, p in enumerate(cached)}
        np.savez(cache, model=np.array(model), paths=np.array(cached), **known)
    rows = np.array([row_of[p] for p in paths], dtype=np.int64)
    return {k: v[rows] for k, v in known.items()}


def embed_images(name: str, paths: list[str], tta: bool, model: str, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """The parts of :func:`embed_set` for ``paths``, from one forward per image (two with ``tta``)."""
    import torch
    import torch.nn.functional as F

    from vsearch.embed import center_crop, decode_side, pool
    from vsearch.images import decode_image, read_source

    if "backbone" not in state:
        from vsearch.embed import Preprocess
        from vsearch.families import build_backbone
        from vsearch.presets import resolve_model

        torch.set_num_threads(2)
        config = replace(resolve_model(model), layers=LAYERS)
        state.update(config=config, backbone=build_backbone(config).eval(), preprocess=Preprocess(config))
    config, backbone, preprocess = state["config"], state["backbone"], state["preprocess"]
    side = decode_side(config.image_size)  # decoded reduced, as ingest and load_query do
    views = ("", "-crop") if tta else ("",)
    out: dict[str, list[np.ndarray]] = {f"{layer}-{how}{view}": [] for layer in LAYERS for how in POOLINGS for view in views}
    start = time.perf_counter()
    for lo in range(0, len(paths), BATCH):
        images = [decode_image(read_source(p), p, max_side=side) for p in paths[lo : lo + BATCH]]
        tensors = [preprocess(im) for im in images]
        if tta:  # as Embedder.embed_images: the photos, then their crops, in one forward
            tensors += [preprocess(center_crop(im, 0.8)) for im in images]
        with torch.inference_mode():
            maps = backbone(torch.stack(tensors), LAYERS)
            for layer, feature in zip(LAYERS, maps):
                for how in POOLINGS:
                    part = F.normalize(pool(feature.float(), how, config.gem_p), dim=1).numpy()
                    for n, view in enumerate(views):
                        out[f"{layer}-{how}{view}"].append(part[n * len(images) : (n + 1) * len(images)])
        done = min(lo + BATCH, len(paths))
        print(f"{name}: {done}/{len(paths)} ({done / (time.perf_counter() - start):.1f} images/s)", flush=True)
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def combined(parts: dict[str, np.ndarray], layers: tuple[str, ...], how: str, view: str = "") -> np.ndarray:
    from vsearch.projection import l2_normalize

    return l2_normalize(np.concatenate([parts[f"{layer}-{how}{view}"] for layer in layers], axis=1))


def query_side(parts: dict[str, np.ndarray], layers: tuple[str, ...], how: str) -> np.ndarray:
    """Query vectors with TTA: the photo's and its crop's vectors summed, renormalised."""
    from vsearch.projection import l2_normalize

    return l2_normalize(combined(parts, layers, how) + combined(parts, layers, how, "-crop"))


def stored(x: np.ndarray) -> np.ndarray:
    """What the catalog gives back (``IndexConfig.raw_vectors`` default float16)."""
    from vsearch.config import IndexConfig

    return x.astype(IndexConfig().raw_vectors).astype(np.float32)


def top10(gallery: np.ndarray, queries: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    from vsearch.config import ProjectionConfig
    from vsearch.projection import Projection

    projection = Projection.fit(fit_on, ProjectionConfig())
    scores = projection.apply(queries) @ projection.apply(gallery).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def image_sets(root: Path, center_sample: int) -> dict[str, tuple[list[dict[str, str]], bool]]:
    """The protocols' image lists (name -> (rows, query-side TTA)), in the order
    grocery gallery, val, centring sample; clothing gallery, queries."""
    g_center = read_csv(root / "grocery" / "center.csv")
    if len(g_center) > 2000:
        keep = np.sort(np.random.default_rng(0).choice(len(g_center), center_sample, replace=False))
        g_center = [g_center[i] for i in keep]
    return {
        "grocery-gallery": (read_csv(root / "grocery" / "gallery.csv"), False),
        "grocery-val": (read_csv(root / "grocery" / "queries-val.csv"), True),
        "grocery-center": (g_center, True),
        "clothing-gallery": (read_csv(root / "clothing" / "gallery.csv"), False),
        "clothing-queries": (read_csv(root / "clothing" / "queries.csv"), True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, required=True, help="where protocols and embeddings are cached (reused by a rerun)")
    ap.add_argument("--model", default="efficientnet-lite2")
    ap.add_argument(
        "--center-sample", type=int, default=500, help="centring photos used when there are over 2,000 (seed 0; see above)"
    )
    args = ap.parse_args()

    from vsearch.categories import matches_category
    from vsearch.embed import raw_dim
    from vsearch.presets import resolve_model

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    root = protocols(args.data.resolve(), args.work)
    sets = image_sets(root, args.center_sample)
    g_gallery, g_val, g_center, c_gallery, c_queries = (rows for rows, _ in sets.values())
    state: dict[str, Any] = {}
    parts = {
        name: embed_set(args.work, name, [r["image"] for r in rows], tta, args.model, state) for name, (rows, tta) in sets.items()
    }
    embedded = time.perf_counter()

    owners = np.array([r["id"] for r in g_gallery])
    expected = np.array([r["expected_id"] for r in g_val])
    c_categories = np.array([r["category"] for r in c_gallery])
    c_wanted = [r["category"] for r in c_queries]
    config = resolve_model(args.model)
    results = []
    for layers in COMBOS:
        for how in POOLINGS:
            row: dict[str, Any] = {"layers": list(layers), "pooling": how}
            row["default"] = tuple(layers) == tuple(config.layers) and config.poolings == (how,) * len(layers)
            g_cat = stored(combined(parts["grocery-gallery"], layers, how))
            row["raw_dim"] = int(g_cat.shape[1])
            q = query_side(parts["grocery-val"], layers, how)
            for fit, fit_on in (("catalog", g_cat), ("photos", query_side(parts["grocery-center"], layers, how))):
                ranked = owners[top10(g_cat, q, fit_on)]
                row[f"grocery_{fit}"] = {
                    "recall@1": float((ranked[:, 0] == expected).mean()),
                    "recall@5": float((ranked[:, :5] == expected[:, None]).any(axis=1).mean()),
                    "recall@10": float((ranked == expected[:, None]).any(axis=1).mean()),
                    "fitted_on": len(fit_on),
                }
            c_cat = stored(combined(parts["clothing-gallery"], layers, how))
            near = c_categories[top10(c_cat, query_side(parts["clothing-queries"], layers, how), c_cat)]
            precision = [sum(matches_category(c, want) for c in top) / 10 for top, want in zip(near, c_wanted)]
            row["clothing_catalog"] = {"category_precision@10": float(np.mean(precision)), "fitted_on": len(c_cat)}
            if row["default"]:
                assert row["raw_dim"] == raw_dim(config), f"raw dim {row['raw_dim']} is not the model's {raw_dim(config)}"
            results.append(row)

    n_center = len(g_center)
    print(
        f"\n{args.model}: grocery {len(g_gallery)} gallery / {len(g_val)} val queries / {n_center} centring photos; "
        f"clothing {len(c_gallery)} gallery / {len(c_queries)} queries (embedding {embedded - started:.0f} s)\n"
    )
    print(
        "| layers | pooling | raw dim | grocery R@1 (catalog fit) | R@10 (catalog fit) "
        f"| grocery R@1 ({n_center} photos fit) | R@10 (photos fit) | clothing P@10 (catalog fit) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in results:
        mark = " (default)" if row["default"] else ""
        gc, gp, cc = row["grocery_catalog"], row["grocery_photos"], row["clothing_catalog"]
        print(
            f"| {'+'.join(row['layers'])}{mark} | {row['pooling']} | {row['raw_dim']} "
            f"| {gc['recall@1']:.3f} | {gc['recall@10']:.3f} | {gp['recall@1']:.3f} | {gp['recall@10']:.3f} "
            f"| {cc['category_precision@10']:.3f} |"
        )
    report = {
        "model": args.model,
        "grocery": {"gallery": len(g_gallery), "queries": len(g_val), "center_photos": n_center},
        "clothing": {"gallery": len(c_gallery), "queries": len(c_queries)},
        "results": results,
    }
    (args.work / "pooling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.work / 'pooling.json'} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
