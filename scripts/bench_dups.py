#!/usr/bin/env python3
"""Benchmark (not a test): calibrate near-duplicate detection (issue 12, part 4).

Originals: the 81 grocery iconic images, a seeded sample of grocery train photos
and of clothing-small photos. Copies: for a seeded subset of originals, one of each
kind in ``KINDS`` (JPEG re-encode at q60, resize to 50 %, 5 % crop from one side or
the centre, brightness and saturation shifted by +-10 %, and all four at once).

Truth: two images are near-duplicates iff they come from the same original (an
original and its copies, or two copies of one original). Every other pair is a
negative, counted two ways:

  any    every pair of different originals (two in-store photos of one product are
         two different photos, so a negative) and their copies
  xprod  only pairs whose products differ: pairs of two photos of the same grocery
         product are left out (neither positive nor negative); each clothing photo
         is its own product

Methods, on every pair of all images (originals and copies):

  emb_raw   cosine of the default model's raw vector as the catalog stores it
            (catalog side, no query TTA, rounded through float16)
  emb_proj  cosine after the index's projection (centring + PCA 256, fitted on the
            originals), i.e. the similarity a k-NN search in the index returns
  phash, dhash, whash   64-bit perceptual hashes (ImageHash), Hamming distance
  and:phash / or:phash  emb_raw combined with phash (2-D sweep)

For each method: the loosest threshold whose precision (flagged pairs that are true
near-duplicates / all flagged pairs) is >= 0.99, and the strictest-loosest with no
false pair at all, with recall per copy kind at each. Also: how many of the
(original, copy) pairs a top-k search in the projected space would even find.

Embeddings and hashes are cached in ``--work`` (one row per image key), so a rerun
skips the model. Prints a table and writes ``--work/bench_dups.json``.

    .venv/bin/python scripts/bench_dups.py --work /tmp/dups

Measured (seed 0; 881 originals = 81 iconic + 400 grocery + 400 clothing photos,
150 of them copied 5 ways = 750 copies; 1,329,265 pairs, 2,250 positive; about 5 min
of embedding at 6 images/s on 2 CPU cores, then 2 min): the loosest point with
precision >= 0.99 on "any" negatives, recall of (original, copy) pairs by kind:

  method          thresh  prec   fp  recall  jpeg60 resize50 crop5 colour10 combo
  emb_raw         0.9625  0.993  12  0.780   1.000  0.940   0.927  1.000   0.467
  emb_proj        0.9400  0.993  11  0.709   0.993  0.933   0.833  1.000   0.347
  phash           <= 8    0.996   8  0.800   1.000  1.000   0.713  0.993   0.693
  dhash           <= 0    0.994   4  0.309   0.833  0.860   0.013  0.660   0.020
  whash           none reaches 0.99 (distance 0 already links distinct white-background shots)
  emb AND phash   .935&10 0.990  19  0.842   1.000  1.000   0.847  1.000   0.660
  emb OR phash    .965|8  0.993  15  0.925   1.000  1.000   0.960  1.000   0.853
  OR            .970|8  0.994  13  0.906   1.000  1.000   0.947  1.000   0.827
  chosen: OR      .980|6  0.997   5  0.780   1.000  1.000   0.793  1.000   0.580

The last column of the OR grid, "wrongly grouped", is the share of originals linked
to an original of another product: 1.1 % at .970|8 (more than 1 % of products would
hide behind another when results collapse), 0.45 % at the chosen .980|6, 0 at .985|4
(recall 0.608). A false link hides a product while a missed one only shows a copy
twice, so the default leans to precision.

With "different product" negatives (two photos of one grocery product left out) the
points move little (emb_raw 0.9575, OR 0.960|8). The false pairs at .970|8 are
packaging variants among the iconic shots (Arla milks, Tropicana and God Morgon
juices, Alpro soyghurts: 6 original pairs, 10 with their copies), 2 burst-like pairs
of in-store photos of one product and 1 clothing pair; at the chosen .980|6, 5 pairs
of iconic shots (2 pairs of products and their copies). The projection (centring + PCA
256, fitted on the originals) separates worse than the raw vectors; a top-5 search in
the projected index finds every copy's original (top-1 0.985), so the index gives the
candidates and the raw cosine and phash decide. phash (even distances only: 32 bits
are always set) computed by vsearch.duplicates.phash equals imagehash.phash on all
1,631 images.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

try:
    import imagehash
except ImportError as exc:  # only this benchmark needs it
    raise SystemExit("scripts/bench_dups.py needs ImageHash: .venv/bin/pip install ImageHash") from exc

from vsearch import duplicates  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
KINDS = ("jpeg60", "resize50", "crop5", "colour10", "combo")
HASHES: dict[str, Callable[[Image.Image], Any]] = {
    "phash": duplicates.phash,  # vsearch's own, numpy only; checked against imagehash.phash below
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
}
TARGET_PRECISION = 0.99


@dataclass(frozen=True)
class Item:
    key: str  # unique image key; a copy is "<original key>|<kind>"
    source: str  # original's key for copies, its own key for originals
    product: str  # grocery fine id ("g12"), or the photo itself for clothing
    path: Path
    kind: str = "original"


def originals(data: Path, n_grocery: int, n_clothing: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    root = data / "grocery-store" / "dataset"
    items = []
    with open(root / "classes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            fine = int(row["Class ID (int)"])
            path = root / row["Iconic Image Path (str)"].lstrip("/")
            items.append(Item(f"iconic:{fine}", f"iconic:{fine}", f"g{fine}", path))
    lines = [line.split(",") for line in (root / "train.txt").read_text().splitlines() if line.strip()]
    for rel, fine, _ in rng.sample(lines, n_grocery):
        items.append(Item(f"grocery:{rel.strip()}", f"grocery:{rel.strip()}", f"g{int(fine)}", root / rel.strip()))
    clothing = sorted((data / "clothing-small").glob("*/*/*.jpg"))
    for path in rng.sample(clothing, n_clothing):
        key = f"clothing:{path.relative_to(data / 'clothing-small')}"
        items.append(Item(key, key, key, path))
    return items


def load(path: Path) -> Image.Image:
    """The original as an upright RGB image (what vsearch.images.decode gives)."""
    from vsearch.images import decode

    return decode(path.read_bytes(), str(path)).image


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def crop5(image: Image.Image, rng: random.Random) -> Image.Image:
    """5 % of the width and height cut away, from one side or evenly around the centre."""
    w, h = image.size
    dx, dy = round(0.05 * w), round(0.05 * h)
    side = rng.choice(("left", "right", "top", "bottom", "centre"))
    box = {
        "left": (dx, 0, w, h),
        "right": (0, 0, w - dx, h),
        "top": (0, dy, w, h),
        "bottom": (0, 0, w, h - dy),
        "centre": (dx // 2, dy // 2, w - (dx - dx // 2), h - (dy - dy // 2)),
    }[side]
    return image.crop(box)


def colour10(image: Image.Image, rng: random.Random) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(1 + rng.choice((-1, 1)) * 0.1)
    return ImageEnhance.Color(image).enhance(1 + rng.choice((-1, 1)) * 0.1)


def half(image: Image.Image) -> Image.Image:
    return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.BICUBIC)


def make_copy(image: Image.Image, kind: str, rng: random.Random) -> bytes:
    """The file a copier would upload: JPEG q60 for a re-encode, q95 for the others."""
    if kind == "jpeg60":
        return jpeg(image, 60)
    if kind == "resize50":
        return jpeg(half(image), 95)
    if kind == "crop5":
        return jpeg(crop5(image, rng), 95)
    if kind == "colour10":
        return jpeg(colour10(image, rng), 95)
    return jpeg(half(colour10(crop5(image, rng), rng)), 60)  # combo


def features(items: list[Item], n_copies: int, seed: int, work: Path) -> tuple[list[Item], dict[str, np.ndarray]]:
    """All images (originals, then copies) and per image its raw vector and hashes, cached."""
    import torch

    from vsearch.embed import Embedder
    from vsearch.images import decode
    from vsearch.presets import resolve_model

    rng = random.Random(seed + 1)
    copied = rng.sample(items, n_copies)
    images = list(items) + [Item(f"{o.key}|{k}", o.key, o.product, o.path, k) for o in copied for k in KINDS]
    cache_path = work / f"features-s{seed}.npz"
    cache: dict[str, dict[str, Any]] = {}
    if cache_path.exists():
        with np.load(cache_path, allow_pickle=False) as data:
            keys = data["keys"].tolist()
            for i, key in enumerate(keys):
                cache[key] = {name: data[name][i] for name in ("raw", *HASHES)}
    todo = [it for it in images if it.key not in cache]
    if todo:
        embedder = Embedder(resolve_model("efficientnet-lite2"), device="cpu")
        side = embedder.preprocess.max_side
        start = time.perf_counter()
        for b in range(0, len(todo), 16):
            batch = todo[b : b + 16]
            decoded = []
            for it in batch:
                decoded.append(decode(image_bytes(it, seed), it.key, max_side=side))  # as the catalog decodes it
            raws = embedder.embed_tensor(torch.stack([embedder.preprocess(d.image) for d in decoded]))
            for it, d, raw in zip(batch, decoded, raws):
                cache[it.key] = {"raw": raw, **{name: hash_bits(fn(d.image)) for name, fn in HASHES.items()}}
            done = b + len(batch)
            print(f"  embedded {done}/{len(todo)} ({done / (time.perf_counter() - start):.1f} images/s)", flush=True)
            if done % 160 == 0 or done == len(todo):
                save_cache(cache_path, cache)
    return images, {name: np.stack([cache[it.key][name] for it in images]) for name in ("raw", *HASHES)}


def hash_bits(h: Any) -> np.uint64:
    return np.uint64(h if isinstance(h, int) else int(str(h), 16))


def image_bytes(it: Item, seed: int) -> bytes:
    """The file of an original, or of a copy made afresh (its random choices depend
    only on the seed and its key)."""
    if it.kind == "original":
        return it.path.read_bytes()
    return make_copy(load(it.path), it.kind, random.Random(f"{seed}{it.key}"))


def check_phash(images: list[Item], cached: np.ndarray, seed: int, side: int) -> dict[str, int]:
    """vsearch.duplicates.phash against imagehash.phash and against the cache, on every image."""
    from vsearch.images import decode

    out = {"images": len(images), "differs_from_imagehash": 0, "differs_from_cache": 0}
    for it, old in zip(images, cached):
        image = decode(image_bytes(it, seed), it.key, max_side=side).image
        mine = duplicates.phash(image)
        out["differs_from_imagehash"] += int(mine != int(str(imagehash.phash(image)), 16))
        out["differs_from_cache"] += int(mine != int(old))
    return out


def or_grid(
    flat: dict[str, np.ndarray], same: np.ndarray, xneg: np.ndarray, orig_copy: np.ndarray, images: list[Item], pairs: np.ndarray
) -> list:
    """emb_raw >= t OR phash <= d (DuplicateConfig.matches) around the chosen point, and
    at DuplicateConfig()'s defaults. ``products_grouped``: the share of originals the
    rule links to an original of another product (what a variant group would merge
    wrongly: a product hidden behind another when results collapse)."""
    rows = []
    chosen = duplicates.DuplicateConfig()
    originals = np.array([it.kind == "original" for it in images])
    both = originals[pairs[0]] & originals[pairs[1]] & xneg
    points = [(t, d) for t in (0.96, 0.97, 0.975, 0.98, 0.985) for d in (None, 4, 6, 8)]
    for t, d in [*points, (chosen.threshold, chosen.phash_distance)]:
        hashed = -flat["phash"] <= d if d is not None else np.zeros_like(same)
        flagged = (flat["emb_raw"] >= t) | hashed
        tp, fp = int((flagged & same).sum()), int((flagged & ~same).sum())
        wrong = flagged & both
        grouped = len(set(pairs[0][wrong].tolist()) | set(pairs[1][wrong].tolist())) / int(originals.sum())
        rows.append(
            {
                "products_grouped": grouped,
                "threshold": t,
                "phash_distance": d,
                "precision": tp / max(tp + fp, 1),
                "fp": fp,
                "recall_all_pairs": tp / int(same.sum()),
                "recall": recall_by_kind(flagged, orig_copy, images, pairs),
                "false_pairs": false_pairs(flagged & ~same, images, pairs),
            }
        )
    return rows


def save_cache(path: Path, cache: dict[str, dict[str, Any]]) -> None:
    keys = sorted(cache)
    arrays = {name: np.stack([cache[k][name] for k in keys]) for name in ("raw", *HASHES)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(keys), **arrays)
    tmp.replace(path)


def pair_scores(feats: dict[str, np.ndarray], images: list[Item]) -> dict[str, np.ndarray]:
    """Per method, an n x n score matrix where larger means more similar."""
    from vsearch.config import ProjectionConfig
    from vsearch.projection import Projection

    raw = feats["raw"].astype(np.float16).astype(np.float32)  # as the catalog stores it
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    is_original = np.array([it.kind == "original" for it in images])
    projection = Projection.fit(raw[is_original], ProjectionConfig())
    proj = projection.apply(raw)
    scores = {"emb_raw": raw @ raw.T, "emb_proj": proj @ proj.T}
    for name in HASHES:
        h = feats[name]
        scores[name] = -np.bitwise_count(h[:, None] ^ h[None, :]).astype(np.float32)  # minus Hamming distance
    return scores


def truth(images: list[Item]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle pair indices (i<j), whether each is a near-duplicate, and whether
    it counts as a negative under ``xprod`` (products differ)."""
    n = len(images)
    i, j = np.triu_indices(n, k=1)
    source = np.array([it.source for it in images])
    product = np.array([it.product for it in images])
    same = source[i] == source[j]
    xprod_negative = ~same & (product[i] != product[j])
    return np.stack([i, j]), same, xprod_negative


def sweep(score: np.ndarray, positive: np.ndarray, negative: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """True and false positives at each threshold (flagged: score >= threshold)."""
    pos = np.sort(score[positive])
    neg = np.sort(score[negative])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return tp, fp


def pick(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, target: float) -> int | None:
    """Index of the loosest threshold (most flagged) whose precision is >= target."""
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    ok = np.nonzero(precision >= target)[0]
    return None if len(ok) == 0 else int(ok[np.argmax(tp[ok])])


def recall_by_kind(flagged: np.ndarray, orig_copy: np.ndarray, images: list[Item], pairs: np.ndarray) -> dict[str, float]:
    """Recall of the (original, copy) pairs of each kind."""
    kinds = np.array([it.kind for it in images])
    out = {}
    for kind in KINDS:
        mask = orig_copy & (kinds[pairs[1]] == kind)
        out[kind] = float(flagged[mask].mean()) if mask.any() else float("nan")
    return out


def evaluate(images: list[Item], scores: dict[str, np.ndarray]) -> dict[str, Any]:
    pairs, same, xprod_negative = truth(images)
    i, j = pairs
    kinds = np.array([it.kind for it in images])
    orig_copy = (kinds[i] == "original") & (kinds[j] != "original") & same
    flat = {name: s[i, j] for name, s in scores.items()}
    grids = {
        "emb_raw": np.round(np.arange(0.80, 1.0001, 0.0025), 4),
        "emb_proj": np.round(np.arange(0.50, 1.0001, 0.005), 4),
        **{name: -np.arange(0, 33, dtype=np.float32) for name in HASHES},
    }
    results: dict[str, Any] = {
        "pairs": int(len(same)),
        "positives": int(same.sum()),
        "negatives_any": int((~same).sum()),
        "negatives_xprod": int(xprod_negative.sum()),
        "methods": {},
    }
    for name, thresholds in grids.items():
        results["methods"][name] = {}
        for negatives, neg_mask in (("any", ~same), ("xprod", xprod_negative)):
            tp, fp = sweep(flat[name], same, neg_mask, thresholds)
            entry: dict[str, Any] = {}
            for label, target in (("p99", TARGET_PRECISION), ("no_fp", 1.0)):
                k = pick(thresholds, tp, fp, target)
                if k is None:
                    entry[label] = None
                    continue
                flagged = flat[name] >= thresholds[k]
                entry[label] = {
                    "threshold": float(thresholds[k]) if not name.endswith("hash") else int(-thresholds[k]),
                    "precision": float(tp[k] / max(tp[k] + fp[k], 1)),
                    "tp": int(tp[k]),
                    "fp": int(fp[k]),
                    "recall_all_pairs": float(tp[k] / same.sum()),
                    "recall": recall_by_kind(flagged, orig_copy, images, pairs),
                    "false_pairs": false_pairs(flagged & neg_mask, images, pairs),
                }
            results["methods"][name][negatives] = entry
    results["methods"].update(combined(flat, same, xprod_negative, orig_copy, images, pairs))
    results["or_grid"] = or_grid(flat, same, xprod_negative, orig_copy, images, pairs)
    results["worst_negatives"] = worst_negatives(flat, same, images, pairs)
    return results


def combined(
    flat: dict[str, np.ndarray],
    same: np.ndarray,
    xprod_negative: np.ndarray,
    orig_copy: np.ndarray,
    images: list[Item],
    pairs: np.ndarray,
) -> dict[str, Any]:
    """emb_raw AND / OR phash: the best (most true pairs) grid point with precision >= 0.99."""
    out: dict[str, Any] = {}
    for op in ("and", "or"):
        entry: dict[str, Any] = {}
        for negatives, neg_mask in (("any", ~same), ("xprod", xprod_negative)):
            best = None
            for t_emb in np.round(np.arange(0.80, 1.0001, 0.005), 4):
                for t_hash in range(0, 25):
                    a, b = flat["emb_raw"] >= t_emb, flat["phash"] >= -t_hash
                    flagged = (a & b) if op == "and" else (a | b)
                    tp, fp = int((flagged & same).sum()), int((flagged & neg_mask).sum())
                    if tp + fp and tp / (tp + fp) >= TARGET_PRECISION and (best is None or tp > best["tp"]):
                        best = {
                            "threshold": [float(t_emb), t_hash],
                            "precision": tp / (tp + fp),
                            "tp": tp,
                            "fp": fp,
                            "recall_all_pairs": tp / int(same.sum()),
                            "recall": recall_by_kind(flagged, orig_copy, images, pairs),
                            "false_pairs": false_pairs(flagged & neg_mask, images, pairs),
                        }
            entry[negatives] = {"p99": best, "no_fp": None}
        out[f"{op}:phash"] = entry
    return out


def false_pairs(wrong: np.ndarray, images: list[Item], pairs: np.ndarray) -> dict[str, Any]:
    """The flagged negatives, counted by what their originals are, and listed (20 at most)."""
    kinds: dict[str, int] = {}
    listed = []
    for t in np.nonzero(wrong)[0]:
        a, b = images[pairs[0][t]], images[pairs[1][t]]
        what = "+".join(sorted(x.source.split(":")[0] for x in (a, b)))
        what += " same product" if a.product == b.product else ""
        kinds[what] = kinds.get(what, 0) + 1
        if len(listed) < 20:
            listed.append([a.key, b.key])
    return {"by_kind": kinds, "pairs": listed}


def worst_negatives(flat: dict[str, np.ndarray], same: np.ndarray, images: list[Item], pairs: np.ndarray) -> dict[str, Any]:
    """The 8 most similar different-original pairs per method, for a look by eye."""
    out = {}
    i, j = pairs
    neg = np.nonzero(~same)[0]
    for name in ("emb_raw", "phash"):
        top = neg[np.argsort(-flat[name][neg], kind="stable")[:8]]
        out[name] = [[images[i[t]].key, images[j[t]].key, float(flat[name][t])] for t in top]
    return out


def candidates(scores: dict[str, np.ndarray], images: list[Item], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Share of copies whose original is among their top-k by projected cosine (the
    index's k-NN) over all images, the copy's sibling copies left out of the ranking
    (they are near-duplicates too, so they would only fill the list with true links)."""
    index = {it.key: n for n, it in enumerate(images)}
    source = np.array([index[it.source] for it in images])
    found: dict[int, list[bool]] = {k: [] for k in ks}
    for copy, it in enumerate(images):
        if it.kind == "original":
            continue
        row = scores["emb_proj"][copy].copy()
        row[(source == source[copy]) & (np.arange(len(images)) != source[copy])] = -np.inf  # itself and siblings
        rank = int((row > row[source[copy]]).sum())
        for k in ks:
            found[k].append(rank < k)
    return {f"top{k}": float(np.mean(v)) for k, v in found.items()}


def table(results: dict[str, Any]) -> str:
    lines = [
        f"pairs {results['pairs']:,}: positives {results['positives']:,}, negatives any {results['negatives_any']:,}, "
        f"xprod {results['negatives_xprod']:,}",
        f"{'method':10} {'neg':5} {'target':6} {'thresh':>11} {'prec':>6} {'fp':>4} {'rec':>5}  "
        + " ".join(f"{k:>8}" for k in KINDS),
    ]
    for name, by_neg in results["methods"].items():
        for negatives, entry in by_neg.items():
            for label, row in entry.items():
                if row is None:
                    continue
                t = row["threshold"]
                thresh = f"{t[0]:.3f}&{t[1]}" if isinstance(t, list) else (f"{t:.4f}" if isinstance(t, float) else f"<= {t}")
                kinds = " ".join(f"{row['recall'][k]:8.3f}" for k in KINDS)
                lines.append(
                    f"{name:10} {negatives:5} {label:6} {thresh:>11} {row['precision']:6.3f} {row['fp']:4d} "
                    f"{row['recall_all_pairs']:5.3f}  {kinds}"
                )
    lines.append("emb_raw >= t OR phash <= d (negatives: any; last row: DuplicateConfig())")
    for row in results["or_grid"]:
        kinds = " ".join(f"{row['recall'][k]:8.3f}" for k in KINDS)
        lines.append(
            f"  t {row['threshold']:.3f} d {row['phash_distance']!s:>4}  prec {row['precision']:.4f} fp {row['fp']:3d} "
            f"wrongly grouped {row['products_grouped']:.4f} rec {row['recall_all_pairs']:.3f}  {kinds}"
        )
    lines.append(f"  false pairs at DuplicateConfig(): {results['or_grid'][-1]['false_pairs']['by_kind']}")
    lines.append(f"phash check: {results['phash_check']}")
    lines.append(f"candidates by projected k-NN (copy -> its original): {results['candidates']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="cache and output folder")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--grocery", type=int, default=400, help="grocery train photos sampled")
    parser.add_argument("--clothing", type=int, default=400, help="clothing photos sampled")
    parser.add_argument("--copies", type=int, default=150, help="originals copied (one copy per kind each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(args.seed)
    items = originals(args.data, args.grocery, args.clothing, args.seed)
    images, feats = features(items, args.copies, args.seed, args.work)
    scores = pair_scores(feats, images)
    results = evaluate(images, scores)
    results["candidates"] = candidates(scores, images)
    from vsearch.embed import decode_side
    from vsearch.presets import resolve_model

    side = decode_side(resolve_model("efficientnet-lite2").image_size)
    results["phash_check"] = check_phash(images, feats["phash"], args.seed, side)
    results["setup"] = {
        "originals": len(items),
        "copies": len(images) - len(items),
        "kinds": KINDS,
        "seed": args.seed,
        "model": "efficientnet-lite2 (catalog side, float16-stored raw vectors)",
    }
    print(table(results))
    (args.work / "bench_dups.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.work / 'bench_dups.json'}")


if __name__ == "__main__":
    main()
