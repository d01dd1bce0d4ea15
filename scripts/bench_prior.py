#!/usr/bin/env python3
"""Benchmark (not a test): would a projection prior shipped with the model help a
catalog that has no photos of its own yet? (issue 11, part 1)

The prior here: centring/PCA fitted on unlabelled photos of an *unrelated* domain.
For each shared protocol, the default index (projection fitted on the catalog) is
scored, then refitted on the other domain's photos (``vsearch refit --center-on``)
and scored again, then refitted on its own domain's unlabelled photos for reference:

  grocery   gallery = 81 iconic images, queries = val photos (Recall@1/10);
            other domain = the clothing train photos; own = the grocery train photos
  clothing  gallery = clothing train photos, queries = validation photos (category
            precision@10); other domain = the grocery train photos; own = the
            clothing validation photos themselves (transductive: an upper bound)

    python scripts/make_protocols.py --data ../shared/datasets --out artifacts/protocols
    python scripts/bench_prior.py --protocols artifacts/protocols --work "$(mktemp -d)"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def scored(index: Path, queries: Path) -> dict[str, float]:
    from vsearch.evaluate import evaluate_index

    m = evaluate_index(index, queries, k=10)
    return {k: float("nan") if m[k] is None else float(m[k]) for k in ("recall@1", "recall@10", "category_precision@10")}


def with_ids(photos: Path, work: Path) -> Path:
    """``photos`` as a manifest ``--center-on`` reads (an ``id`` column; query CSVs have none)."""
    with open(photos, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "id" in rows[0]:
        return photos
    out = work / f"{photos.parent.name}-{photos.stem}-photos.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image"])
        writer.writerows([f"photo{n}", r["image"]] for n, r in enumerate(rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocols", type=Path, default=Path("artifacts/protocols"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="efficientnet-lite2")
    ap.add_argument("--only", nargs="+", choices=["grocery", "clothing"], default=["grocery", "clothing"])
    args = ap.parse_args()

    from vsearch import Engine
    from vsearch.refit import fit_projection

    grocery, clothing = args.protocols / "grocery", args.protocols / "clothing"
    setups = {
        "grocery": (grocery / "gallery.csv", grocery / "queries-val.csv", clothing / "gallery.csv", grocery / "center.csv"),
        "clothing": (clothing / "gallery.csv", clothing / "queries.csv", grocery / "center.csv", clothing / "queries.csv"),
    }
    rows = []
    for name in args.only:
        gallery, queries, other, own = setups[name]
        index = args.work / name
        with Engine.open(index, model=args.model, create=True) as engine:
            engine.ingest(gallery, quiet=True)  # a rerun embeds nothing
            fit_projection(engine)  # the default fit, whatever an earlier run left
        rows.append((name, "catalog (default)", scored(index, queries)))
        print(rows[-1], flush=True)
        for label, photos in (("other domain's photos (prior)", other), ("own domain's unlabelled photos", own)):
            with Engine.open(index) as engine:
                fit_projection(engine, with_ids(photos, args.work))
            rows.append((name, label, scored(index, queries)))
            print(rows[-1], flush=True)

    print("\n| protocol | projection fitted on | Recall@1 | Recall@10 | category P@10 |\n|---|---|---:|---:|---:|")
    for name, label, m in rows:
        print(f"| {name} | {label} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['category_precision@10']:.3f} |")


if __name__ == "__main__":
    main()
