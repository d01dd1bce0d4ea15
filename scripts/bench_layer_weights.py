#!/usr/bin/env python3
"""Benchmark (not a test): would weighting the model's layers help? (issue 11, part 1 lever)

A raw vector is the concatenation of each layer's pooled, L2-normalised part, so the
parts can be reweighted after the fact. From the grocery embeddings that
``scripts/bench_vector_dtype.py --work DIR`` caches in DIR (the 81 iconic images as
stored, the train and val photos as queries, default model), each weighting is
applied to gallery and queries, the projection fitted on the catalog (day one) or
on the train photos (after traffic), and the val photos scored: Recall@1/10.

    python scripts/bench_vector_dtype.py --work DIR      # once: embeds and caches
    python scripts/bench_layer_weights.py --work DIR
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

WEIGHTS = [
    (1, 1, 1),
    (0, 1, 1),
    (0.5, 1, 1),
    (1, 1, 0.5),
    (1, 1, 1.5),
    (1, 1.5, 1),
    (1, 0.7, 1),
    (0.5, 1, 1.5),
    (0, 0, 1),
    (0, 1, 0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="efficientnet-lite2")
    args = ap.parse_args()

    from vsearch.config import ProjectionConfig
    from vsearch.embed import raw_dim
    from vsearch.presets import resolve_model
    from vsearch.projection import Projection, l2_normalize

    config = resolve_model(args.model)
    sizes = [raw_dim(replace(config, layers=(layer,), pooling=config.poolings[0])) for layer in config.layers]
    bounds = np.cumsum([0, *sizes])
    with np.load(args.work / "gallery.npz") as data:
        gallery, owners = data["x"], np.array(data["ids"])
    train, val = np.load(args.work / "q-train.npy"), np.load(args.work / "q-val.npy")
    with open(args.work / "protocols" / "grocery" / "queries-val.csv", newline="") as fh:
        expected = np.array([r["expected_id"] for r in csv.DictReader(fh)])
    assert bounds[-1] == gallery.shape[1], f"layer sizes {sizes} do not add up to {gallery.shape[1]}"

    def weighted(x: np.ndarray, w: tuple[float, ...]) -> np.ndarray:
        return l2_normalize(np.concatenate([wi * l2_normalize(x[:, a:b]) for wi, a, b in zip(w, bounds, bounds[1:])], axis=1))

    print(f"layers {', '.join(f'{n} ({s})' for n, s in zip(config.layers, sizes))}\n")
    print("| weights | fitted on | Recall@1 | Recall@10 |\n|---|---|---:|---:|")
    for fit in ("catalog", "train photos"):
        for w in WEIGHTS:
            xb, xq = weighted(gallery, w), weighted(val, w)
            projection = Projection.fit(xb if fit == "catalog" else weighted(train, w), ProjectionConfig())
            order = np.argsort(-(projection.apply(xq) @ projection.apply(xb).T), axis=1)[:, :10]
            ranked = owners[order]
            r1, r10 = (ranked[:, 0] == expected).mean(), (ranked == expected[:, None]).any(axis=1).mean()
            print(f"| {' / '.join(f'{x:g}' for x in w)} | {fit} | {r1:.3f} | {r10:.3f} |", flush=True)


if __name__ == "__main__":
    main()
